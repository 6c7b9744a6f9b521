"""``python evaluate.py --config configs/X.yaml [--fv PATH] --out DIR [--limit N]``.

The same config file, parser, overrides and defaults as ``train.py`` (LightningCLI:
``--model.layer 2``, ``--aie.k 6``, ``--print_config``), plus ``--fv``, ``--out``,
``--limit`` and the ``evaluation`` section (:class:`~mfv.evaluation.EvaluationSettings`).
Runs every condition of :mod:`mfv.evaluation.protocol` over the config's backbone, on the
trainer's devices (several devices: one process per device through Lightning Fabric's
``ddp``, outcomes gathered); writes ``metrics.json``, ``report.md``, figures and TensorBoard
logs into ``--out``, nowhere else (see :mod:`mfv.evaluation.report`). Bad input stops
before any compute with one ``error: ...`` line and exit status 2 (:mod:`mfv.preflight`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from mfv.commands.train import FunctionVectorCLI, build_cli
from mfv.errors import ConfigError
from mfv.evaluation.engine import score_conditions
from mfv.evaluation.protocol import EvaluationSettings, Scorer, Vectors, evaluate
from mfv.evaluation.report import report_markdown, write_report
from mfv.io import exit_on_full_disk, stage_dir, staged
from mfv.method.extraction import extract_from_datamodule
from mfv.models.base import BackboneAdapter
from mfv.preflight import EVALUATION_OUTPUT_BYTES, RunPlan, exit_on_bad_input, plan_evaluation
from mfv.runs import FolderLock, own_results_folder, record_results, shaping_settings

# Trainer settings that describe where to compute; the rest (epochs, loggers) is training's.
_COMPUTE_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")


class EvaluateCLI(FunctionVectorCLI):
    """train.py's parser plus the evaluation options."""

    prog = "mfv evaluate"

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--fv", type=str | None, default=None,
                            help="fine-tuned FV file (safetensors) from train.py, e.g. RUN/function_vectors_finetuned.safetensors")
        parser.add_argument("--out", type=str, default="runs/eval", help="output folder (metrics, report, figures)")
        parser.add_argument("--limit", type=int | None, default=None,
                            help="prompts per condition (>= 1); unset: every prompt of each split")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace an --out holding an evaluation with other settings (refused otherwise)")


def _device_count(devices) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return int(devices) if str(devices).lstrip("-").isdigit() else 1


def evaluation_scorer(trainer_config, adapter: BackboneAdapter, settings: EvaluationSettings, datamodule
                      ) -> Scorer:
    """Scores conditions on the config's devices: in this process on one device, else one
    process per device (Fabric's ``ddp``: each rank re-runs this command up to here and scores
    its share; the outcomes are gathered)."""
    batch_size = settings.batch_size or datamodule.batch_size
    options = {k: trainer_config[k] for k in _COMPUTE_KEYS if trainer_config.get(k) is not None}
    fabric = None
    if _device_count(options.get("devices", 1)) * int(options.get("num_nodes") or 1) > 1:
        import lightning as L

        strategy = options.pop("strategy", "ddp")
        if strategy not in ("ddp", "ddp_spawn", "auto"):
            raise ConfigError(f"trainer.strategy = {strategy!r}: evaluate.py runs several devices with 'ddp'")
        options.pop("precision", None)  # the backbone's dtype is the model's setting
        fabric = L.Fabric(**options, strategy="ddp")
        fabric.launch()
        adapter.model.to(fabric.device)
    # One labelled bar per condition and sweep point, on rank 0, unless the config turns bars off.
    progress = trainer_config.get("enable_progress_bar") is not False and (fabric is None or fabric.global_rank == 0)
    return lambda conditions: score_conditions(adapter, conditions, batch_size, datamodule.num_workers,
                                               settings.reuse, fabric, progress)


def _own_out(cli: EvaluateCLI, plan: RunPlan) -> tuple[Path, FolderLock, dict]:
    """``--out``, created and locked for this evaluation: refused (one line) when another run
    uses it, when it is a training run's folder, or when it holds an evaluation with other
    settings (unless ``--overwrite true``); checked before creating anything, and again under
    the lock.

    Returns:
        The folder, its lock and the settings recorded with the results.
    """
    config = cli.config
    # What shapes the results (batch size and reuse change only the speed).
    evaluation = {f"evaluation.{k}": v for k, v in dict(config.evaluation).items() if k not in ("batch_size", "reuse")}
    owner = {**shaping_settings(config.as_dict()), **evaluation, "fv": config.fv, "limit": config.limit,
             **{f"data fingerprint {split}": value for split, value in plan.fingerprints.items()}}
    out, lock = own_results_folder(config.out, "--out", "evaluate", owner, config.overwrite, EVALUATION_OUTPUT_BYTES,
                                   holder="evaluate.py")
    return out, lock, owner


def main(args: Sequence[str] | None = None) -> dict:
    """Runs the evaluation and returns the metrics written to ``metrics.json``.

    The preflight (:func:`mfv.preflight.plan_evaluation`) checks settings, the ``--fv``
    file, ``--out``, the cache and the data before any compute."""
    cli = build_cli(EvaluateCLI, args)
    config = cli.config
    with exit_on_bad_input(FileNotFoundError):
        settings = EvaluationSettings(limit=config.limit, **config.evaluation)
        plan = plan_evaluation(cli, settings)
        out, lock, owner = _own_out(cli, plan)
        module, datamodule = cli.model, cli.datamodule
    with lock, exit_on_full_disk(out, "--out", EVALUATION_OUTPUT_BYTES), exit_on_bad_input(FileNotFoundError):
        for split, (recorded, now) in plan.fv_data_mismatch.items():
            print(f"warning: --fv {config.fv} records data fingerprint {recorded} for the {split} split, this run's is "
                  f"{now}: it was trained on other data (or the images changed since)", file=sys.stderr)
        aie = settings.aie_settings(cli.aie_settings, datamodule)  # the authors' protocol: every eval prompt
        extraction = extract_from_datamodule(module.adapter, list(module.relations), datamodule, aie)
        vectors = Vectors.from_extraction(module.adapter, extraction, aie.k, module.layer, aie.selection,
                                          plan.finetuned)
        scorer = evaluation_scorer(config.trainer, module.adapter, settings, datamodule)
        result = evaluate(module.adapter, datamodule, vectors, settings, scorer)
        result.settings["data_fingerprints"] = plan.fingerprints
        if plan.fv_data_mismatch:
            result.settings["fv_data_mismatch"] = plan.fv_data_mismatch
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank != 0:  # other ranks of a multi-device run: rank 0 writes
            return result.to_dict()
        for name, reason in result.not_run.items():
            print(f"not run: {name}: {reason}", file=sys.stderr)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        from torch.utils.tensorboard import SummaryWriter

        with staged() as landed:  # report, figures and TensorBoard (replaced whole, never mixed) land together
            writer = SummaryWriter(str(stage_dir(out / "tensorboard")))
            try:
                metrics = write_report(result, out, extraction, writer)
            finally:
                writer.close()
        record_results(out, "evaluate", owner, [path.name for path in landed])
    print(report_markdown(metrics))
    print(f"wrote {out}/metrics.json, report.md and figures")
    return metrics
