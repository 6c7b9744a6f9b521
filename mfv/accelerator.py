"""The trainer's accelerator against this machine: a GPU config on a machine without one (or
with fewer GPUs) is one line naming where it was set and how to run instead, before any
model is built (Lightning itself fails later, with a traceback)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mfv.errors import ConfigError

# Lightning accelerator names that need a GPU, and whether this machine has one of that kind.
GPU_ACCELERATORS = {
    "gpu": lambda: torch.cuda.is_available() or torch.backends.mps.is_available(),
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: torch.backends.mps.is_available(),
}
CPU_ADVICE = "--trainer.accelerator cpu --trainer.devices 1"


def setting_source(key: str, config_files: Sequence[str], argv: Sequence[str]) -> str:
    """Where ``trainer.<key>`` was set: the command line (``--trainer.<key>``), else the last
    config file that sets it, else ``trainer.<key>`` (a default)."""
    import yaml

    if any(a == f"--trainer.{key}" or a.startswith(f"--trainer.{key}=") for a in argv):
        return "the command line"
    for path in reversed(config_files):
        try:
            trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # not a readable mapping: the parser already accepted or refused it
        if isinstance(trainer, dict) and key in trainer:
            return path
    return f"trainer.{key}"


def check_accelerator(trainer, config_files: Sequence[str] = (), argv: Sequence[str] = ()) -> None:
    """A GPU accelerator on a machine without one (or more GPUs than it has) is one line
    saying how to run on CPU, before any model is built; Lightning itself would fail later
    with "No supported gpu backend found!" and a traceback.

    Args:
        trainer: The parsed ``trainer:`` section (``accelerator``, ``devices``, ``strategy``).
        config_files: The ``--config`` files in order, as given (named in the message).
        argv: The command's arguments (an override there is named instead of a file).
    """
    accelerator = trainer.get("accelerator")
    if not isinstance(accelerator, str) or accelerator.lower() not in GPU_ACCELERATORS:
        return  # cpu, auto, tpu or an Accelerator object: Lightning's own choice and checks
    strategy = trainer.get("strategy")
    advice = CPU_ADVICE + ("" if strategy in (None, "auto") else " --trainer.strategy auto")
    if not GPU_ACCELERATORS[accelerator.lower()]():
        source = setting_source("accelerator", config_files, argv)
        raise ConfigError(f"{source} asks for trainer.accelerator={accelerator} but this machine has no GPU: run "
                          f"with {advice}")
    devices = trainer.get("devices")
    wanted = len(devices) if isinstance(devices, (list, tuple)) else devices
    wanted = int(wanted) if isinstance(wanted, str) and wanted.isdigit() else wanted
    have = torch.cuda.device_count() if accelerator.lower() != "mps" else 1
    if isinstance(wanted, int) and wanted > have:
        source = setting_source("devices", config_files, argv)
        raise ConfigError(f"{source} asks for trainer.devices={devices} but this machine has {have} GPU"
                          f"{'s' if have != 1 else ''}: run with --trainer.devices {have}")
