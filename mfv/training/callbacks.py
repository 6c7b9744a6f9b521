"""Lightning callbacks and plugins: AIE head selection at setup, atomic checkpoint writes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mfv.evaluation import plots
from mfv.io import atomic_write, atomic_write_text
from mfv.method.extraction import (
    DEFAULT_K,
    DEFAULT_SELECTION,
    Extraction,
    ExtractionSettings,
    extract,
    validate_head_choice,
)
from mfv.models.base import BackboneAdapter

_DEFAULTS = ExtractionSettings()


class AIEHeadSelection(L.Callback):
    """Runs causal mediation analysis at setup and initialises the module's FVs.

    Uses the datamodule's ``eval`` split (N-shot clean prompts for the means, corrupted
    prompts for the AIE). Sharded across ranks; cached and resumable (see
    :mod:`mfv.method.extraction`). Logs the AIE heatmaps (pooled and per relation, selected
    heads outlined; TensorBoard figure and PNG) and the chosen heads.

    Args:
        num_mean_prompts: Clean prompts for the mean activations.
        num_aie_prompts: Corrupted prompts for the AIE.
        k: Heads per FV.
        selection: ``per_relation`` (the authors': top-K of each relation's AIE) or
            ``pooled`` (one head set from the AIE pooled over relations).
        algorithm: ``fast`` or ``reference`` (exact) or ``attribution`` (gradient estimate).
        aie_filter: ``clean_correct`` (the authors') or ``all`` corrupted prompts.
        batch_size: Prompts per chunk.
        cache_dir: Cache folder of extraction results.
    """

    def __init__(
        self,
        num_mean_prompts: int = _DEFAULTS.num_mean_prompts,
        num_aie_prompts: int = _DEFAULTS.num_aie_prompts,
        k: int = DEFAULT_K,
        selection: Literal["per_relation", "pooled"] = DEFAULT_SELECTION,
        algorithm: Literal["fast", "reference", "attribution"] = _DEFAULTS.algorithm,
        aie_filter: Literal["clean_correct", "all"] = _DEFAULTS.aie_filter,
        batch_size: int = _DEFAULTS.batch_size,
        cache_dir: str = "runs/aie_cache",
    ) -> None:
        self.num_mean_prompts = num_mean_prompts
        self.num_aie_prompts = num_aie_prompts
        self.k = k
        self.selection = selection
        self.algorithm = algorithm
        self.aie_filter = aie_filter
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.result: Extraction | None = None

    def settings(self, relations: list[str], datamodule) -> ExtractionSettings:
        return ExtractionSettings(
            relations=list(relations), shots=datamodule.shots, num_mean_prompts=self.num_mean_prompts,
            num_aie_prompts=self.num_aie_prompts, algorithm=self.algorithm, aie_filter=self.aie_filter,
            batch_size=self.batch_size, seed=datamodule.seed,
        )

    def validate(self, adapter: BackboneAdapter, relations: list[str], datamodule) -> ExtractionSettings:
        """Every setting checked against the backbone and data before any compute."""
        settings = self.settings(relations, datamodule)
        settings.validate()
        validate_head_choice(self.k, self.selection, adapter)
        return settings

    def extract(self, adapter: BackboneAdapter, relations: list[str], datamodule, progress: bool = True) -> Extraction:
        """Cached means and AIE of the datamodule's eval split (computed, resumed or loaded)."""
        settings = self.validate(adapter, relations, datamodule)
        datamodule.attach(adapter)
        datamodule.prepare_data()
        self.result = extract(adapter, datamodule.sampler("eval"), settings, self.cache_dir,
                              datamodule.fingerprint("eval"), progress=progress)
        return self.result

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or pl_module.fv_initialized:
            return
        datamodule = trainer.datamodule
        pl_module.adapter.model.to(trainer.strategy.root_device)
        result = self.extract(pl_module.adapter, list(pl_module.relations), datamodule, trainer.is_global_zero)
        if pl_module.hparams.injection == "distributed":
            pl_module.set_distributed_vectors(result.distributed_vectors(pl_module.adapter, self.k, self.selection),
                                              result.heads(self.k, self.selection))
        else:
            pl_module.set_function_vectors(result.function_vectors(pl_module.adapter, self.k, pl_module.layer,
                                                                   self.selection))
        # trainer.log_dir is a collective under DDP: every rank must ask for it.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero and not trainer.fast_dev_run:
            self._report(trainer, result, log_dir)

    def _report(self, trainer: L.Trainer, result: Extraction, log_dir: Path) -> None:
        heads = result.heads(self.k, self.selection)
        figure = plots.aie_grid(result.aie_pooled, {r: result.aie(r) for r in result.relations}, heads,
                                result.heads(self.k, "pooled")[result.relations[0]])
        log_dir.mkdir(parents=True, exist_ok=True)
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure("aie/heatmap", figure, global_step=0, close=False)
            logger.experiment.add_text("aie/heads", json.dumps({r: [list(h) for h in hs] for r, hs in heads.items()}),
                                       global_step=0)
        plots.save(figure, log_dir / "aie_heatmap.png")
        settings = self.settings(result.relations, trainer.datamodule)
        summary = {"settings": asdict(settings), **result.summary(self.k, self.selection)}
        atomic_write_text(log_dir / "aie_summary.json", json.dumps(summary, indent=2))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: a full disk or a kill mid-write leaves the
    previous checkpoint (or none), never a 0-byte or truncated ``.ckpt``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))
