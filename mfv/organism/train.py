"""Train the model organism with Lightning: ``python -m mfv.organism.train [--out DIR] [overrides]``.

LightningCLI over :class:`~mfv.organism.module.OrganismModule` and
:class:`~mfv.organism.data.OrganismDataModule` (``--model.num_layers 8``,
``--data.batch_size 32``, ``--trainer.max_time 00:01:00:00``, ``--print_config``). One epoch
is ``data.steps_per_epoch`` steps; the cosine schedule spans ``model.total_steps`` whatever
``trainer.max_epochs`` stops at. Each epoch ends with a validation on held-out scenes (the
paper's prompts, trained and novel objects) and a checkpoint in ``WORK/checkpoints``; running
the same command again resumes from its ``last.ckpt``; ``WORK/curves.jsonl`` collects every
validation. At the end the model (no training heads) is saved to ``--out`` with
``training.json`` and ``reference.json``. An ``--out`` that exists and holds anything but
this run's own earlier output (same work folder, being continued) is refused before any
compute: the bundled ``checkpoints/organism`` is never overwritten by accident.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from mfv.errors import ConfigError
from mfv.io import atomic_write_text, exit_on_full_disk
from mfv.models.openflamingo import save_tiny_openflamingo
from mfv.organism.data import OrganismDataModule
from mfv.organism.module import OrganismModule
from mfv.organism.reference import write_reference
from mfv.preflight import exit_on_bad_input
from mfv.runs import hold
from mfv.training.callbacks import safe_restore
from mfv.threads import set_threads


class _Curves(Callback):
    """Appends every validation's accuracies to ``curves.jsonl`` (kept across resumes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        record = {"step": int(trainer.global_step),
                  **{k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class OrganismCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out", type=str, default="checkpoints/organism", help="where the trained model is saved: a new or empty folder (or this run's own, continued)")
        parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: the cores this process may use, or MFV_THREADS)")
        # Everything a run writes (its config, Lightning's own checkpoints) goes to the work folder, not the cwd.
        parser.link_arguments("data.work_dir", "trainer.default_root_dir")


def check_out(out: str | Path, work: Path) -> None:
    """Refuses an ``--out`` that exists and holds anything but this recipe's own earlier
    output from the same work folder (the run being continued, whose ``last.ckpt`` is
    there): the bundled ``checkpoints/organism`` is never overwritten by accident.

    Raises:
        ConfigError: one line naming ``--out`` and what to do.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a new folder")
    contents = sorted(p.name for p in out.iterdir())
    if not contents:
        return
    try:
        record = json.loads((out / "training.json").read_text())
        previous = Path(record.get("work_dir") or record["config"]["data"]["work_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if previous is not None and previous.resolve() == work.resolve() and (work / "checkpoints" / "last.ckpt").is_file():
        return  # the same recipe run, continued: its output is refreshed
    shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    raise ConfigError(f"--out {out} exists and holds files this run did not write ({shown}); choose a new --out "
                      f"folder (checkpoints/organism is the bundled model organism) or move it away")


def main(args: Sequence[str] | None = None) -> Path:
    cli = OrganismCLI(
        OrganismModule, OrganismDataModule, run=False, args=args, save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "max_epochs": 20, "gradient_clip_val": 1.0, "log_every_n_steps": 25, "num_sanity_val_steps": 0,
            # Checkpoints written atomically and read back as tensors and plain data only.
            "plugins": [{"class_path": "mfv.training.callbacks.AtomicCheckpointIO"}],
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "data/organism", "name": "logs", "version": "run"}},
        },
    )
    with exit_on_bad_input():
        set_threads(cli.config.threads)  # mfv.threads: the usable cores unless given
    work = Path(cli.datamodule.work_dir)
    with exit_on_bad_input():
        check_out(cli.config.out, work)
        lock = hold(work, "data.work_dir", "train-organism")  # one run at a time continues a work folder
    with lock, exit_on_full_disk(work, "data.work_dir"), exit_on_bad_input():  # e.g. a hostile last.ckpt
        return _train(cli, work, args)


def _train(cli: OrganismCLI, work: Path, args: Sequence[str] | None) -> Path:
    """Fits (resuming the work folder's ``last.ckpt``), then saves the model and its records to ``--out``."""
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    # One file rewritten after every validation (Lightning 2.6 refreshes save_last only on top-k changes).
    checkpoints = ModelCheckpoint(dirpath=work / "checkpoints", filename="last", monitor=None, save_top_k=1,
                                  enable_version_counter=False, save_on_train_epoch_end=False)
    trainer.callbacks.extend([checkpoints, _Curves(work / "curves.jsonl")])
    last = work / "checkpoints" / "last.ckpt"
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None, **safe_restore())
    module.model.eval()
    module.to("cpu")
    out = save_tiny_openflamingo(module.adapter, cli.config.out)
    record = {
        "command": "python -m mfv.organism.train " + " ".join(sys.argv[1:] if args is None else args),
        "work_dir": str(work.resolve()),
        "config": json.loads(json.dumps(cli.config.as_dict(), default=str)),
        "steps_done": int(trainer.global_step),
        "epochs_done": int(trainer.current_epoch),
        "seconds_this_session": round(time.time() - started, 1),
        "device": str(trainer.strategy.root_device), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "final_validation": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    atomic_write_text(out / "training.json", json.dumps(record, indent=2))
    print(json.dumps(write_reference(out)["accuracy"]))
    print(f"saved {out}")
    return out


if __name__ == "__main__":
    main()
