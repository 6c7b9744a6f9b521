"""``python evaluate.py --config configs/X.yaml [--fv PATH] --out DIR [--limit N]``.

The same config file, parser, overrides and defaults as ``train.py`` (LightningCLI:
``--model.layer 2``, ``--aie.k 6``, ``--print_config``), plus ``--fv``, ``--out``,
``--limit`` and the ``evaluation`` section (:class:`~mfv.evaluation.EvaluationSettings`).
Runs every condition of :mod:`mfv.evaluation.protocol` as Lightning test loops on the
config's trainer devices and strategy; writes ``metrics.json``, ``report.md``, figures
and TensorBoard logs into ``--out`` (see :mod:`mfv.evaluation.report`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import lightning as L

from mfv.commands.train import FunctionVectorCLI, build_cli
from mfv.errors import MfvError
from mfv.evaluation.protocol import EvaluationSettings, evaluate
from mfv.evaluation.report import report_markdown, write_report
from mfv.io import ensure_writable_dir
from mfv.method.function_vector import FunctionVectorSet
from mfv.training.callbacks import AIEHeadSelection

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


def evaluation_trainer(trainer_config) -> L.Trainer:
    """A trainer with the config's devices and strategy, no logger or checkpoints."""
    options = {k: trainer_config[k] for k in _COMPUTE_KEYS if trainer_config.get(k) is not None}
    return L.Trainer(**options, logger=False, enable_checkpointing=False, enable_model_summary=False)


def tensorboard_dir(fv: str | None, out: Path) -> Path:
    """The training run's folder when ``fv`` was exported there (one TensorBoard run for
    training and evaluation), else ``out/tensorboard``."""
    if fv is not None and any(Path(fv).parent.glob("events.out.tfevents.*")):
        return Path(fv).parent
    return Path(out) / "tensorboard"


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
        aie = next(c for c in cli.trainer.callbacks if isinstance(c, AIEHeadSelection))
        extraction = aie.extract(module.adapter, list(module.relations), datamodule)
        result = evaluate(evaluation_trainer(config.trainer), module, datamodule, extraction, settings,
                          aie.k, aie.selection, finetuned)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir(config.fv, out)))
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
