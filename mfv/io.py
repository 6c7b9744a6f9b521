"""Atomic writes and early writability checks: no 0-byte or half-written file ever survives."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch

from mfv.errors import ConfigError


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


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Calls ``write(tmp)`` and renames ``tmp`` onto ``path`` only if it succeeded.

    Args:
        mode: File permissions; default: what the umask gives a new file.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode() if mode is None else mode)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
