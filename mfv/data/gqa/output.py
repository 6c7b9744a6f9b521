"""The ``--out`` folder of a GQA preparation: refused when it holds one already (unless
``--overwrite true``), and written whole or not at all.

A preparation is ``dataset/`` (a ``datasets`` DatasetDict) and ``summary.json``. Both are
written into a hidden folder beside ``--out`` and renamed into place at the end, so an
interrupted run leaves the earlier preparation (or nothing) at ``--out``, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from mfv.errors import ConfigError
from mfv.io import atomic_write_text, check_writable

PREPARATION = ("dataset", "summary.json")  # everything a preparation writes into --out


def check_out(out: Path, overwrite: bool) -> None:
    """Refuses, before any scene graph is read, an ``--out`` that cannot take this preparation.

    ``out`` may be absent, an empty folder, or (with ``overwrite``) a folder holding an earlier
    preparation and nothing else; its parent must be writable (the preparation is staged there).

    Raises:
        ConfigError: one line naming ``--out`` and what to do.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder for the preparation")
    contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in contents if name not in PREPARATION]
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise ConfigError(f"--out {out} exists and holds files a preparation does not write ({shown}); choose a new "
                          f"--out folder (--overwrite replaces only a folder holding a preparation)")
    if contents and not overwrite:
        raise ConfigError(f"--out {out} holds a preparation already ({', '.join(contents)}); give --overwrite true to "
                          f"replace it, or choose a new --out folder")
    check_writable(out.parent, "--out")


def write_preparation(out: Path, train: list[dict], test: list[dict], summary: dict[str, Any]) -> None:
    """Writes ``out/dataset`` (train and test) and ``out/summary.json`` as one folder swap.

    The folder is staged beside ``out`` and renamed onto it; an earlier preparation is moved
    aside first and removed only once the new one is in place (put back if the swap fails).
    """
    from datasets import Dataset, DatasetDict

    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    staging, old = out.parent / f".{out.name}.{tag}.tmp", out.parent / f".{out.name}.{tag}.old"
    try:
        DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(
            str(staging / "dataset"))
        atomic_write_text(staging / "summary.json", json.dumps(summary, indent=2))
        if out.is_dir() and any(out.iterdir()):
            out.rename(old)
        os.replace(staging, out)  # onto an absent or empty folder: one rename
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)  # the earlier preparation, back in place
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
