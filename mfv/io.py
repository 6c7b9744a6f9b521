"""Atomic writes, safe checkpoint reads and early writability checks: no 0-byte or
half-written file ever survives, and nothing read from a file runs code.

Writes inside :func:`staged` are all or nothing: each lands under a temporary name and all
are renamed into place only when the block ends without error (a full disk partway leaves
the previous outputs, never a mix). :func:`exit_on_full_disk` turns a full disk anywhere in
a command into one line and exit status 2.
"""

from __future__ import annotations

import contextvars
import errno
import os
import pickle
import re
import shutil
import sys
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mfv.errors import ConfigError, MfvError


# Free space every output folder must have besides what a run estimates it writes: a full
# disk is refused before compute, not found after it.
MIN_FREE_BYTES = 64 * 2**20


def _temporary(path: Path) -> Path:
    # Unique per process and call: concurrent writers never share a temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def new_file_mode() -> int:
    """The permissions the umask gives a new file (some writers, e.g. safetensors, use 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# The renames an enclosing :func:`staged` block still owes: (temporary, final) pairs.
_STAGE: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("mfv_stage", default=None)


def _discard(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged() -> Iterator[list[Path]]:
    """Every :func:`atomic_write` (and :func:`stage_dir`) inside the block lands only when the
    whole block succeeds; on an error every temporary file is removed and nothing is renamed.
    Files written inside the block cannot be read back before it ends. A block inside
    another joins it (its writes land with the outer block's).

    Yields:
        A list that holds, once the block has ended, the paths that landed (outermost block).
    """
    if _STAGE.get() is not None:
        yield []
        return
    landed: list[Path] = []
    pending: list[tuple[Path, Path]] = []
    token = _STAGE.set(pending)
    try:
        yield landed
    except BaseException:
        for tmp, _ in pending:
            _discard(tmp)
        raise
    finally:
        _STAGE.reset(token)
    for tmp, path in pending:
        if tmp.is_dir():  # a folder replaces the previous one whole (no mix of old and new files)
            old = _temporary(path) if path.exists() else None
            if old is not None:
                path.replace(old)
            tmp.replace(path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(path)
        landed.append(path)


def stage_dir(path: str | Path) -> Path:
    """A new temporary folder (write into it) that replaces ``path`` whole when the enclosing
    :func:`staged` block succeeds; only for use inside one."""
    path = Path(path)
    pending = _STAGE.get()
    if pending is None:
        raise RuntimeError("stage_dir is only for use inside mfv.io.staged()")
    tmp = _temporary(path)
    tmp.mkdir(parents=True)
    pending.append((tmp, path))
    return tmp


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Calls ``write(tmp)`` and renames ``tmp`` onto ``path`` only if it succeeded (inside
    :func:`staged`: when the whole block succeeds).

    Args:
        mode: File permissions; default: what the umask gives a new file.
    """
    path = Path(path)
    tmp = _temporary(path)
    pending = _STAGE.get()
    kept = False
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode() if mode is None else mode)
        if pending is not None:  # renamed when the staged block ends
            pending.append((tmp, path))
            kept = True
        else:
            tmp.replace(path)
    finally:
        if not kept:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class UnsafeFileError(MfvError, pickle.UnpicklingError):
    """A checkpoint or tensor file holds objects other than tensors and plain data (bad input:
    one line wherever it is met, naming the file)."""


def load_checkpoint(path: str | Path) -> Any:
    """Reads a ``torch.save`` file (a Lightning checkpoint, a cache chunk) with
    ``weights_only=True``: tensors and plain data only, so a file that would run code when
    unpickled (``__reduce__``) is refused, never executed.

    Raises:
        UnsafeFileError: the file names something else (the message says what).
        Exception: whatever ``torch.load`` raises for a truncated or foreign file.
    """
    with warnings.catch_warnings():  # a foreign pickle protocol is refused or read either way
        warnings.simplefilter("ignore", UserWarning)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"(?:unsupported GLOBAL|Unsupported global:)\s*(?:GLOBAL\s*)?([\w.]+)", str(exc))
            if found is None:
                raise  # no foreign object named (random bytes, a damaged file): unreadable, not unsafe
            raise UnsafeFileError(f"{path}: it holds objects other than tensors and plain data ({found.group(1)}), "
                                  f"which could run code; it was refused, not loaded") from None


# errno values that mean the disk (or the user's quota on it) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> OSError | None:
    """The full-disk ``OSError`` that caused ``exc`` (itself or a cause), if any."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def exit_on_full_disk(folder: str | Path | Callable[[], Any], field: str = "--out",
                      needed_bytes: int = 0) -> Iterator[None]:
    """A full disk anywhere in the block becomes one line naming the disk's folder and what to
    do on stderr, and exit status 2 (never a traceback); atomic writes left nothing partial.

    Args:
        folder: The folder being written (or a callable giving it, once known).
        field: The option that chooses it (named in the advice).
        needed_bytes: About what the command still writes there.
    """
    try:
        yield
    except BaseException as exc:
        full = disk_full(exc)
        if full is None:
            raise
        where = Path(folder() if callable(folder) else folder)
        if full.filename and not Path(str(full.filename)).resolve().is_relative_to(where.resolve()):
            where, field = Path(str(full.filename)).parent, "folder"  # another output (a cache, a checkpoint folder)
        needed = (MIN_FREE_BYTES + needed_bytes) / 2**20
        print(f"error: the disk holding {where} is full ({full.strerror or 'no space left on device'}): free "
              f"{needed:.0f} MB or choose another {field}; nothing partial was written", file=sys.stderr)
        raise SystemExit(2) from None


def check_writable(path: str | Path, field: str, needed_bytes: int = 0) -> Path:
    """Proves, creating nothing, that the folder ``path`` (existing or not yet) can be
    written and that its disk has room: a probe file in ``path`` or its nearest existing
    ancestor (removed again), and ``MIN_FREE_BYTES + needed_bytes`` free.

    Raises:
        ConfigError: one line naming ``field``, the folder and what to do.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}: cannot write into {path} ({existing} is not a folder); choose a writable folder")
    try:
        probe = _temporary(existing / "write-check")
        probe.write_bytes(b"\0")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot write into {path} ({exc.strerror or exc}); choose a writable folder") from exc
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES + needed_bytes:
        raise ConfigError(f"{field}: the disk of {path} has {free / 2**20:.1f} MiB free, this run needs about "
                          f"{(MIN_FREE_BYTES + needed_bytes) / 2**20:.0f} MiB there; free space or choose another folder")
    return path


def ensure_writable_dir(path: str | Path, field: str, needed_bytes: int = 0) -> Path:
    """Creates ``path`` if needed and proves a file can be written there (and that its disk
    has room, :func:`check_writable`), before any compute.

    Raises:
        ConfigError: naming ``field`` and the folder.
    """
    path = check_writable(path, field, needed_bytes)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot write into {path} ({exc.strerror or exc}); choose a writable folder") from exc
    return check_writable(path, field, needed_bytes)
