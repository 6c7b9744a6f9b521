"""``python evaluate.py --config configs/X.yaml [--fv PATH] --out DIR [--limit N]``.

The same config file, parser, overrides and defaults as ``train.py`` (LightningCLI:
``--model.layer 2``, ``--aie.k 6``, ``--print_config``), plus ``--fv``, ``--out``,
``--limit`` and the ``evaluation`` section (:class:`~mfv.evaluation.EvaluationSettings`).
Runs every condition of :mod:`mfv.evaluation.protocol` over the config's backbone, on the
trainer's devices (several devices: one process per device through Lightning Fabric's
``ddp``, outcomes gathered); writes ``metrics.json``, ``report.md``, figures and TensorBoard
logs into ``--out``, nowhere else (see :mod:`mfv.evaluation.report`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from mfv.commands.train import FunctionVectorCLI, build_cli
from mfv.errors import ConfigError, MfvError
from mfv.evaluation.engine import score_conditions
from mfv.evaluation.protocol import EvaluationSettings, Scorer, Vectors, evaluate
from mfv.evaluation.report import report_markdown, write_report
from mfv.io import ensure_writable_dir
from mfv.method.extraction import extract_from_datamodule
from mfv.method.function_vector import FunctionVectorSet
from mfv.models.base import BackboneAdapter

# Trainer settings that describe where to compute; the rest (epochs, loggers) is training's.
_COMPUTE_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")


class EvaluateCLI(FunctionVectorCLI):
    """train.py's parser plus the evaluation options."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--fv", type=str | None, default=None,
                            help="fine-tuned FV file (safetensors) from train.py, e.g. RUN/function_vectors_finetuned.safetensors")
        parser.add_argument("--out", type=str, default="runs/eval", help="output folder (metrics, report, figures)")
        parser.add_argument("--limit", type=int | None, default=None,
                            help="prompts per condition (>= 1); unset: every prompt of each split")


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
    return lambda conditions: score_conditions(adapter, conditions, batch_size, datamodule.num_workers,
                                               settings.reuse, fabric)


def main(args: Sequence[str] | None = None) -> dict:
    """Runs the evaluation and returns the metrics written to ``metrics.json``."""
    cli = build_cli(EvaluateCLI, args)
    config = cli.config
    try:
        settings = EvaluationSettings(limit=config.limit, **config.evaluation)
        settings.validate()
        out = ensure_writable_dir(config.out, "--out")
        module, datamodule = cli.model, cli.datamodule
        finetuned = FunctionVectorSet.load(config.fv, module.adapter) if config.fv else None
        aie = cli.aie_settings
        extraction = extract_from_datamodule(module.adapter, list(module.relations), datamodule, aie)
        vectors = Vectors.from_extraction(module.adapter, extraction, aie.k, module.layer, aie.selection, finetuned)
        scorer = evaluation_scorer(config.trainer, module.adapter, settings, datamodule)
        result = evaluate(module.adapter, datamodule, vectors, settings, scorer)
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank != 0:  # other ranks of a multi-device run: rank 0 writes
            return result.to_dict()
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
        try:
            metrics = write_report(result, out, extraction, writer)
        finally:
            writer.close()
    except (MfvError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(report_markdown(metrics))
    print(f"wrote {out}/metrics.json, report.md and figures")
    return metrics
