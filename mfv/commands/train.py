"""``python train.py --config configs/X.yaml``: AIE at setup, FV fine-tuning, test, export.

LightningCLI without subcommands (``run=False``); dotted overrides such as
``--model.lr 0.001 --trainer.max_epochs 5`` work as usual. After fit, the best FVs are
tested on the test split, exported as safetensors and ``metrics.json`` is written into
the run directory. Before any compute the preflight (:func:`mfv.preflight.plan_training`)
checks settings, ``--ckpt_path``, outputs and data; bad input is one ``error: ...`` line and
exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from mfv.arguments import bracket_lists
from mfv.console import quiet
from mfv.evaluation.protocol import EvaluationSettings
from mfv.errors import ConfigError
from mfv.io import atomic_write_text, exit_on_full_disk, load_checkpoint, staged
from mfv.method.extraction import AIESettings, extract_from_datamodule
from mfv.accelerator import check_accelerator
from mfv.preflight import RUN_OUTPUT_BYTES, RunPlan, exit_on_bad_input, plan_training
from mfv.runs import (FolderLock, claim_version, hold, rank_zero, record_results, run_settings, shaping_settings,
                      training_run_marker)
from mfv.resources import resolve_configs
from mfv.threads import set_threads
from mfv.threads import summary as threads_summary
from mfv.usage import strict_parsers
from mfv.training.callbacks import AIEHeadSelection, RunRecord, safe_restore
from mfv.training.module import FV_PARAMETER, FunctionVectorModule


class FunctionVectorCLI(LightningCLI):
    """LightningCLI with the checkpoint and AIE callbacks always present.

    The ``aie:`` section is parsed once into an :class:`AIESettings` (:attr:`aie_settings`);
    the trainer gets an :class:`AIEHeadSelection` built from it (:attr:`aie_callback`).
    """

    prog = "mfv train"

    def init_parser(self, **kwargs):
        """The parser, its usage line naming the subcommand."""
        return super().init_parser(**{"prog": self.prog, **kwargs})

    aie_callback: AIEHeadSelection | None = None
    unversioned_root: Path | None = None  # runs/train when the run has no logger: its version_N is claimed

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Lightning 2.6 refreshes save_last only when the top-k improves, so the
        # checkpoint to resume from is a second callback rewritten every epoch.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.save_last": False,
             "checkpoint.filename": "best-{epoch:02d}",
             "last_checkpoint.monitor": None, "last_checkpoint.save_top_k": 1, "last_checkpoint.filename": "last",
             "last_checkpoint.enable_version_counter": False}
        )
        parser.add_class_arguments(AIESettings, "aie")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume this run from a checkpoint")
        parser.add_argument("--allow_changed_data", type=bool, default=False,
                            help="resume (--ckpt_path) even though the data or the settings that shape the run changed "
                                 "(recorded in metrics.json)")
        # The evaluation section lives in the same config file (used by evaluate.py; train.py ignores it).
        parser.add_class_arguments(EvaluationSettings, "evaluation", skip={"limit"})
        parser.link_arguments("model.relations", "data.init_args.relations")

    arguments: list[str] = []

    def parse_arguments(self, parser, args) -> None:
        """Parses ``args``, keeping them (the preflight names an override given there)."""
        self.arguments = [str(a) for a in (sys.argv[1:] if args is None else args)] \
            if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Checks the trainer's accelerator (:func:`mfv.accelerator.check_accelerator`: a GPU
        config on a machine without one fails here, before the backbone is loaded), then sets
        the run folder and the TensorBoard logger's own options before they are built:
        ``hp_metric`` is logged once (with the final test accuracy), a resumed run continues in
        its checkpoint's folder (``<save_dir>/<name>/<version>/checkpoints/last.ckpt``), and a
        run without a logger gets a run folder too (:meth:`_run_folder_without_logger`)."""
        config_files = [str(path) for path in self.config.get("config") or []]
        check_accelerator(self.config.get("trainer") or {}, config_files, self.arguments)
        logger = self.config.get("trainer", {}).get("logger")
        ckpt_path = self.config.get("ckpt_path")
        self._run_folder_without_logger(logger, ckpt_path)
        for entry in logger if isinstance(logger, list) else [logger]:
            if not str(getattr(entry, "class_path", "")).endswith("TensorBoardLogger"):
                continue
            options = entry.init_args
            options.default_hp_metric = False
            if ckpt_path is not None:
                run = Path(ckpt_path).resolve().parents[1]
                if run.parent == (Path(options.save_dir) / (options.name or "")).resolve():
                    options.version = run.name

    def _run_folder_without_logger(self, logger, ckpt_path: str | None) -> None:
        """``--trainer.logger false`` without ``--trainer.default_root_dir``: Lightning would
        write checkpoints into ``./checkpoints`` and the run's files into the working
        directory. The run gets ``runs/train/version_N`` instead (the next free one; a
        resumed run, its checkpoint's folder)."""
        trainer = self.config.get("trainer")
        if trainer is None or not (logger is False or logger == []) or trainer.get("default_root_dir"):
            return
        if ckpt_path is not None and Path(ckpt_path).resolve().parent.name == "checkpoints":
            trainer.default_root_dir = str(Path(ckpt_path).resolve().parents[1])
            return
        # The version is claimed after the preflight (mfv.runs.claim_version); this one is checked.
        self.unversioned_root = Path(RUNS_DIR) / TRAINER_DEFAULTS["logger"]["init_args"]["name"]
        trainer.default_root_dir = str(self.unversioned_root / "version_0")

    @property
    def aie_settings(self) -> AIESettings:
        """The parsed ``aie:`` section (one object for the callback and the commands)."""
        return self._get(self.config_init, "aie")

    def _instantiate_trainer(self, config: dict, callbacks: list[L.Callback]) -> L.Trainer:
        """The trainer with the AIE callback built from the parsed settings (checked first,
        so a bad ``aie.*`` value fails before any compute)."""
        settings = self.aie_settings
        settings.validate()
        self.aie_callback = AIEHeadSelection(settings)
        return super()._instantiate_trainer(config, [*callbacks, self.aie_callback])


RUNS_DIR = "runs"
TRAINER_DEFAULTS = {
    # hp_metric is logged once with the final test accuracy (not Lightning's placeholder -1).
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": RUNS_DIR, "name": "train", "default_hp_metric": False}},
    "log_every_n_steps": 5,
    # The sanity check covers the whole validation split: its accuracy (the FVs as extracted,
    # before any step) is logged at step 0 (FunctionVectorModule.on_validation_epoch_end).
    "num_sanity_val_steps": -1,
}


def build_cli(cli_class: type[LightningCLI], args: Sequence[str] | None, trainer_defaults: dict | None = None):
    """Parses the config and overrides and builds model, datamodule and trainer (no run).

    Bad input exits with status 2 and one line naming the field, never a traceback.
    """
    quiet()  # the known Lightning / jsonargparse / litlogger noise, at its source
    strict_parsers()  # no abbreviated options; a parse error is one line with suggestions
    torch.set_float32_matmul_precision("high")
    args = bracket_lists(sys.argv[1:] if args is None else args, model=FunctionVectorModule, aie=AIESettings,
                         evaluation=EvaluationSettings)
    with exit_on_bad_input():
        args = resolve_configs(args)  # --config toy: the bundled config, from any folder
        set_threads()  # the cores this process may use (MFV_THREADS / --threads overrides)
    # jsonargparse wraps errors raised while instantiating classes in ValueError; either way
    # the message names the field and the valid values.
    with exit_on_bad_input(ValueError):
        cli = cli_class(
            FunctionVectorModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            run=False,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={**TRAINER_DEFAULTS, **(trainer_defaults or {})},
        )
    quiet(cli.trainer)  # a progress bar without v_num
    # After parsing: --print_config (which exits there) stays pure YAML, bad options one line.
    print(threads_summary())
    return cli


def _hparams(cli: "FunctionVectorCLI") -> dict:
    """Every setting of the run for TensorBoard's hparams (model, data, aie, seed), flattened,
    and whether a resume was allowed on changed data or settings."""
    return {**run_settings(cli.config.as_dict()), "allow_changed_data": bool(cli.config.get("allow_changed_data"))}


def _unversioned(trainer: L.Trainer) -> list[TensorBoardLogger]:
    """The TensorBoard loggers whose version is not set (the next free one is claimed)."""
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger) and logger._version is None]


def _own_run_folder(cli: FunctionVectorCLI, unversioned: list[TensorBoardLogger]) -> tuple[Path, FolderLock]:
    """One run, one folder: claims the next free version (``mkdir``, atomic: two runs started
    together get two; fixed before fit so that spawned processes agree on it), locks the run
    folder and refuses one that holds another training run (a resume continues its own).

    Returns:
        The run folder and its lock (held until the run ends).
    """
    trainer = cli.trainer
    if rank_zero():
        for logger in unversioned:
            logger._version = claim_version(logger.root_dir)
        if cli.unversioned_root is not None:
            trainer._default_root_dir = str(cli.unversioned_root / f"version_{claim_version(cli.unversioned_root)}")
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    if trainer.fast_dev_run:  # a smoke test writes no run folder
        return run_dir, FolderLock()
    lock = hold(run_dir, "run folder", "train.py")
    try:
        marker = training_run_marker(run_dir)
        ckpt_path = cli.config.get("ckpt_path")
        if marker is not None and not (ckpt_path and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())):
            raise ConfigError(f"run folder {run_dir} holds another training run (its {marker}); resume it with "
                              f"--ckpt_path {run_dir / 'checkpoints' / 'last.ckpt'}, or leave trainer.logger's version "
                              f"unset for a new folder")
        if rank_zero():
            record_results(run_dir, "train", shaping_settings(cli.config.as_dict()))
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def _aie_summary(cli: FunctionVectorCLI, model: FunctionVectorModule, datamodule) -> dict | None:
    """The AIE facts for ``metrics.json`` (``None`` when the FVs were not extracted)."""
    settings = cli.aie_settings
    extraction = cli.aie_callback.result if cli.aie_callback is not None else None
    if extraction is None and model.hparams.init == "extracted":
        # Under ddp_spawn the extraction ran in other processes; its cache makes this a load.
        extraction = extract_from_datamodule(model.adapter, list(model.relations), datamodule, settings, progress=False)
    return extraction.summary(settings.k, settings.selection) if extraction is not None else None


def main(args: Sequence[str] | None = None) -> dict:
    """Runs the training job and returns the metrics written to ``metrics.json``."""
    cli = build_cli(FunctionVectorCLI, args, {"callbacks": [LearningRateMonitor(logging_interval="step")],
                                              "plugins": [{"class_path": "mfv.training.callbacks.AtomicCheckpointIO"}]})
    model: FunctionVectorModule = cli.model
    datamodule = cli.datamodule
    datamodule.attach(model.adapter)
    trainer = cli.trainer
    if not trainer.loggers:  # --trainer.logger false: nothing to log the learning rate to
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
    unversioned = _unversioned(trainer)
    with exit_on_bad_input():
        plan = plan_training(cli)  # everything checked before the AIE and the fit
        run_dir, lock = _own_run_folder(cli, unversioned)
    with lock, exit_on_full_disk(run_dir, "trainer.logger.init_args.save_dir", RUN_OUTPUT_BYTES):
        return _train(cli, plan, run_dir)


def _train(cli: FunctionVectorCLI, plan: RunPlan, run_dir: Path) -> dict:
    """Fit, test and export into ``run_dir`` (checked and owned); returns the metrics."""
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    ckpt_path = cli.config.get("ckpt_path")
    model.provenance = plan.provenance()
    trainer.callbacks.append(RunRecord(shaping_settings(cli.config.as_dict()), plan.fingerprints))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **safe_restore())  # never runs code from a file

    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
    best = checkpoint.best_model_path or None
    if best:
        saved = load_checkpoint(best)
        with torch.no_grad():
            model.function_vectors.copy_(saved["state_dict"][FV_PARAMETER])
        model.on_load_checkpoint(saved)  # the heads the FVs came from (set in another process under spawn)
        model.exported_epoch = int(saved.get("epoch", -1))
        if checkpoint.best_model_score is None:
            # ddp_spawn hands back the best path but not its score: read it from the checkpoint.
            state = saved.get("callbacks", {}).get(checkpoint.state_key, {})
            if state.get("best_model_score") is not None:
                checkpoint.best_model_score = torch.as_tensor(state["best_model_score"])
    test = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics: dict = {}
    if trainer.fast_dev_run:
        # A smoke test: like Lightning's own loggers, write nothing (no export, no metrics).
        print(json.dumps(test[0] if test else {}, indent=2))
        return {"test": test[0] if test else {}, "fast_dev_run": True}
    if trainer.is_global_zero:
        aie = _aie_summary(cli, model, datamodule)
        metrics = {
            "test": test[0] if test else {},
            "best_val_acc": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
            "best_checkpoint": best,
            "exported_fv": str(run_dir / "function_vectors_finetuned.safetensors"),
            "layer": model.layer,
            "relations": model.relations,
            "data_fingerprints": plan.fingerprints,
            "aie": aie,
        }
        if plan.resume_changes:
            metrics["resumed_with_changes"] = plan.resume_changes  # allowed by --allow_changed_data
        # Non-finite FVs (a diverged fit) are refused, nothing exported; FVs and metrics land together or not at all.
        with exit_on_bad_input(), staged():
            model.export(run_dir / "function_vectors_finetuned.safetensors")
            if model.hparams.export_dir:
                model.export()
            atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        if test and trainer.logger is not None:
            trainer.logger.log_hyperparams(_hparams(cli), {"hp_metric": test[0]["test/acc"]})
        print(json.dumps(metrics["test"], indent=2))
        print(f"run directory: {run_dir}")
    return metrics
