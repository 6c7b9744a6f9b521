"""Atomic writes and early writability checks: no 0-byte or half-written file ever survives."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import torch

from mfv.errors import ConfigError


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


def ensure_writable_dir(path: str | Path, field: str) -> Path:
    """Creates ``path`` if needed and proves a file can be written there, before any compute.

    Raises:
        ConfigError: naming ``field`` and the folder.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _temporary(path / "write-check")
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot write into {path} ({exc.strerror or exc}); choose a writable folder") from exc
    return path
