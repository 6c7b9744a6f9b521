"""Lightning callbacks and plugins: AIE head selection at setup, atomic checkpoint writes."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mfv.evaluation import plots
from mfv.io import atomic_write, atomic_write_text, load_checkpoint
from mfv.method.extraction import AIESettings, Extraction, extract_from_datamodule


class AIEHeadSelection(L.Callback):
    """Runs causal mediation analysis at setup and initialises the module's FVs.

    Uses the datamodule's ``eval`` split (N-shot clean prompts for the means, corrupted
    prompts for the AIE). Sharded across ranks; cached and resumable (see
    :mod:`mfv.method.extraction`). Logs the AIE heatmaps (pooled and per relation, selected
    heads outlined; TensorBoard figure and PNG) and the chosen heads.

    Args:
        settings: The config's ``aie:`` section, parsed once by the CLI (the callback owns
            no options of its own; it is pickled with them under ``ddp_spawn``).
    """

    def __init__(self, settings: AIESettings) -> None:
        self.settings = settings
        self.result: Extraction | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or pl_module.fv_initialized:
            return
        datamodule = trainer.datamodule
        pl_module.adapter.model.to(trainer.strategy.root_device)
        k, selection = self.settings.k, self.settings.selection
        result = extract_from_datamodule(pl_module.adapter, list(pl_module.relations), datamodule, self.settings,
                                         progress=trainer.is_global_zero)
        self.result = result
        if pl_module.hparams.injection == "distributed":
            pl_module.set_distributed_vectors(result.distributed_vectors(pl_module.adapter, k, selection),
                                              result.heads(k, selection))
        else:
            pl_module.set_function_vectors(result.function_vectors(pl_module.adapter, k, pl_module.layer, selection))
        # trainer.log_dir is a collective under DDP: every rank must ask for it.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero and not trainer.fast_dev_run:
            self._report(trainer, result, log_dir)

    def _report(self, trainer: L.Trainer, result: Extraction, log_dir: Path) -> None:
        k, selection = self.settings.k, self.settings.selection
        heads = result.heads(k, selection)
        figure = plots.aie_grid(result.aie_pooled, {r: result.aie(r) for r in result.relations}, heads,
                                result.heads(k, "pooled")[result.relations[0]])
        log_dir.mkdir(parents=True, exist_ok=True)
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure("aie/heatmap", figure, global_step=0, close=False)
            logger.experiment.add_text("aie/heads", json.dumps({r: [list(h) for h in hs] for r, hs in heads.items()}),
                                       global_step=0)
        plots.save(figure, log_dir / "aie_heatmap.png")
        datamodule = trainer.datamodule
        settings = self.settings.extraction_settings(result.relations, datamodule.shots, datamodule.seed)
        summary = {"settings": asdict(settings), **result.summary(k, selection)}
        atomic_write_text(log_dir / "aie_summary.json", json.dumps(summary, indent=2))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: a full disk or a kill mid-write leaves the
    previous checkpoint (or none), never a 0-byte or truncated ``.ckpt``; and its reader,
    made safe: tensors and plain data only (:func:`mfv.io.load_checkpoint`), whatever a
    caller asks for, so no checkpoint given to ``--ckpt_path`` ever runs code."""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))


def safe_restore() -> dict:
    """``trainer.fit`` options that restore a checkpoint without running code from it:
    ``weights_only=True`` where Lightning takes it (2.6+); before that, the
    :class:`AtomicCheckpointIO` plugin's reader is the only one."""
    return {"weights_only": True} if "weights_only" in inspect.signature(L.Trainer.fit).parameters else {}


class RunRecord(L.Callback):
    """Stores in every checkpoint what a resume is checked against
    (:func:`mfv.runs.check_resume`): the settings that shape the run and the content
    fingerprints of the data it reads.

    Args:
        settings: :func:`mfv.runs.shaping_settings` of the run's config.
        fingerprints: split -> content fingerprint (from the preflight).
    """

    def __init__(self, settings: dict, fingerprints: dict[str, str]) -> None:
        self.record = {"settings": dict(settings), "data_fingerprints": dict(fingerprints)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["mfv_run"] = self.record
