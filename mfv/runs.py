"""Run folders are owned: one run at a time in a folder, version folders claimed atomically,
no command writing over another's results, and a resumed run checked against what it resumes.

* :func:`hold` takes an OS lock (``flock``) on ``FOLDER/.mfv.lock`` for the whole run; the
  OS releases it when the process ends, however it ends (no stale locks). A second run into a
  folder in use is refused in one line naming the folder.
* :func:`claim_version` allocates ``version_N`` by ``mkdir`` (atomic): two runs started
  together with one logger name get two folders.
* :func:`check_results` / :func:`record_results`: a folder holds one command's results
  (``.mfv-run.json`` records which, with the settings that shape them); evaluate.py never
  writes into a training run's folder, nor over an evaluation with other settings unless
  told to (``--overwrite true``).
* :func:`check_resume`: ``--ckpt_path`` resumes only the run it was written by: same data
  (content fingerprints) and same settings, unless changed data is explicitly allowed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mfv.errors import ConfigError
from mfv.io import atomic_write_text, ensure_writable_dir

LOCK_FILE = ".mfv.lock"
RECORD_FILE = ".mfv-run.json"
# What train.py leaves in its run folder (any one marks the folder as a training run's).
TRAIN_MARKERS = ("checkpoints", "hparams.yaml", "function_vectors_finetuned.safetensors", "aie_summary.json")
# Settings that change where or how fast a run computes, not what it computes.
_NOT_SHAPING = ("data.num_workers", "aie.batch_size")


def rank_zero() -> bool:
    """Whether this process writes (the only one of a multi-process run that takes locks)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


class FolderLock:
    """An exclusive lock on a run folder, held until :meth:`release` or the process ends."""

    def __init__(self, path: Path | None = None, fd: int | None = None) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        """Removes the lock file (if still this lock's) and releases the lock."""
        if self.fd is None:
            return
        try:
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(folder: str | Path, field: str, command: str) -> FolderLock:
    """Creates ``folder`` if needed and locks it for this process (other ranks of a
    multi-process run share rank zero's lock).

    Raises:
        ConfigError: another run holds the folder (one line: the folder, the holder, what to do).
    """
    folder = Path(folder)
    if not rank_zero():
        return FolderLock()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 400).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{field} {folder} is in use by another run ({holder}); wait until it ends or choose "
                              f"another {field}") from None
        # The previous holder may have removed the file between our open and flock: lock the file that is there.
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{command}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return FolderLock(path, fd)


def claim_version(parent: str | Path, prefix: str = "version_") -> int:
    """The next free ``<prefix>N`` under ``parent``, created here (``mkdir`` is atomic, so two
    runs claiming at once get two numbers)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[len(prefix):]) for p in parent.glob(f"{prefix}*") if p.name[len(prefix):].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (parent / f"{prefix}{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def training_run_marker(folder: str | Path) -> str | None:
    """What marks ``folder`` as a train.py run folder, if anything does."""
    folder = Path(folder)
    found = next((name for name in TRAIN_MARKERS if (folder / name).exists()), None)
    record = _record(folder)
    return found or (RECORD_FILE if record is not None and record.get("command") == "train" else None)


def _record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def differences(before: dict, now: dict) -> list[str]:
    """``key: before -> now`` for every setting that differs (missing: ``unset``)."""
    return [f"{key}: {before.get(key, 'unset')!r} -> {now.get(key, 'unset')!r}"
            for key in sorted(set(before) | set(now), key=str) if before.get(key) != now.get(key)]


def check_results(folder: str | Path, field: str, command: str, settings: dict, overwrite: bool = False) -> None:
    """``folder`` may receive ``command``'s results with ``settings``: it is not a training
    run's folder, and holds no other command's results, nor this command's with other
    settings (unless ``overwrite``), nor files no mfv command recorded (unless ``overwrite``).

    Raises:
        ConfigError: one line naming the folder, what it holds and what to do.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    marker = training_run_marker(folder)
    if marker is not None and command != "train":
        raise ConfigError(f"{field} {folder} is a train.py run folder (it holds {marker}); {command} never writes "
                          f"there: give {field} {folder.parent / (folder.name + '-' + command)} beside it")
    record = _record(folder)
    if record is None:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if others and not overwrite:
            shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
            raise ConfigError(f"{field} {folder} holds files no mfv {command} recorded ({shown}); choose a new "
                              f"{field}, or give --overwrite true to replace them")
        return
    if record.get("command") != command:
        raise ConfigError(f"{field} {folder} holds the results of mfv {record.get('command')}; choose another {field}")
    changed = differences(record.get("settings") or {}, settings)
    if changed and not overwrite:
        shown = "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "")
        raise ConfigError(f"{field} {folder} holds the results of an mfv {command} with other settings ({shown}); "
                          f"choose another {field}, or give --overwrite true to replace them")


def own_results_folder(folder: str | Path, field: str, command: str, settings: dict, overwrite: bool = False,
                       room: int = 0, holder: str | None = None) -> tuple[Path, FolderLock]:
    """``folder`` for ``command``'s results: checked (:func:`check_results`) before anything is
    created, created writable with ``room`` bytes, locked (:func:`hold`, named ``holder``) and
    checked again under the lock, since a run may have finished there meanwhile.

    Returns:
        The folder and its lock (released here if the second check fails).
    """
    check_results(folder, field, command, settings, overwrite)
    out = ensure_writable_dir(folder, field, room)
    lock = hold(out, field, holder or command)
    try:
        check_results(out, field, command, settings, overwrite)
    except BaseException:
        lock.release()
        raise
    return out, lock


def record_results(folder: str | Path, command: str, settings: dict, files: list[str] | None = None) -> None:
    """Records which command's results ``folder`` holds, with their settings and ``files``
    (names); files the previous record listed that this one does not are removed, so a
    replaced evaluation leaves none of its figures behind."""
    folder = Path(folder)
    previous = _record(folder) or {}
    for name in set(previous.get("files") or []) - set(files or []):
        stale = folder / Path(name).name  # only the folder's own entries
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    record = {"command": command, "settings": settings, "files": sorted(files or [])}
    atomic_write_text(folder / RECORD_FILE, json.dumps(record, indent=2, default=str))


def run_settings(config: dict) -> dict[str, Any]:
    """Every setting of a run (model, data, aie, seed), flattened to ``section.key``."""
    data = config.get("data") or {}
    flat: dict[str, Any] = {"seed": config.get("seed_everything"), "data": data.get("class_path")}
    for section, values in (("model", config.get("model") or {}), ("data", data.get("init_args") or {}),
                            ("aie", config.get("aie") or {})):
        for key, value in values.items():
            plain = isinstance(value, (int, float, str, bool)) or value is None
            flat[f"{section}.{key}"] = value if plain else str(value)
    return flat


def shaping_settings(config: dict) -> dict[str, Any]:
    """The settings that shape what a run computes: :func:`run_settings` less folders
    (``*_dir``: the fingerprints cover their content) and speed settings."""
    return {k: v for k, v in run_settings(config).items() if not k.endswith("_dir") and k not in _NOT_SHAPING}


def check_resume(checkpoint: dict, path: str | Path, settings: dict, fingerprints: dict[str, str],
                 allow_changed_data: bool = False) -> dict[str, list[str]]:
    """``checkpoint`` (``--ckpt_path``) was written by a run with these ``settings`` on data
    with these ``fingerprints`` (what :class:`~mfv.training.callbacks.RunRecord` stores).

    Returns:
        What differs, allowed by ``allow_changed_data`` (``{}`` when nothing does), to record.

    Raises:
        ConfigError: one line naming what differs and how to allow it.
    """
    recorded = checkpoint.get("mfv_run")
    if not isinstance(recorded, dict):
        return {}  # a checkpoint from before runs were recorded: the module's own checks apply
    before = recorded.get("data_fingerprints") or {}
    common = [split for split in fingerprints if split in before]  # the splits both runs read
    changed = {"settings": differences(recorded.get("settings") or {}, settings),
               "data_fingerprints": differences({s: before[s] for s in common}, {s: fingerprints[s] for s in common})}
    changed = {k: v for k, v in changed.items() if v}
    if changed and not allow_changed_data:
        shown = "; ".join(changed.get("data_fingerprints", []) + changed.get("settings", []))
        what = " and ".join(("the data" if k == "data_fingerprints" else "the settings") for k in changed)
        shown = shown if len(shown) <= 600 else shown[:597] + "..."
        raise ConfigError(f"--ckpt_path {path}: {what} differ from the run it resumes ({shown}); "
                          f"resume with that run's config and data, start a new run, or give "
                          f"--allow_changed_data true to continue anyway (recorded in metrics.json)")
    return changed
