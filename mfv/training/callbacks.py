"""Lightning callbacks: AIE head selection at setup."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L

from mfv import plots
from mfv.method.extraction import ExtractionResult, ExtractionSettings, extract_function_vectors


def data_fingerprint(split_dir: str | Path) -> str:
    """Identifies a generated split by its folder name and generation metadata."""
    split_dir = Path(split_dir)
    meta = (split_dir / "meta.json").read_bytes() if (split_dir / "meta.json").is_file() else b""
    return f"{split_dir.name}:{hashlib.sha256(meta).hexdigest()[:12]}"


class AIEHeadSelection(L.Callback):
    """Runs causal mediation analysis at setup and initialises the module's FVs.

    Uses the datamodule's ``eval`` split (N-shot clean prompts for the means, corrupted
    prompts for the AIE). Sharded across ranks; cached and resumable (see
    :mod:`mfv.method.extraction`). Logs the layer x head AIE heatmap (TensorBoard image
    and PNG) and the chosen heads.

    Args:
        num_mean_prompts: Clean prompts for the mean activations.
        num_aie_prompts: Corrupted prompts for the AIE.
        k: Heads per FV.
        selection: ``pooled`` or ``per_relation`` head choice.
        algorithm: ``fast`` or ``reference``.
        batch_size: Prompts per chunk.
        cache_dir: Cache folder of extraction results.
    """

    def __init__(
        self,
        num_mean_prompts: int = 200,
        num_aie_prompts: int = 100,
        k: int = 10,
        selection: Literal["pooled", "per_relation"] = "pooled",
        algorithm: Literal["fast", "reference"] = "fast",
        batch_size: int = 8,
        cache_dir: str = "runs/aie_cache",
    ) -> None:
        self.num_mean_prompts = num_mean_prompts
        self.num_aie_prompts = num_aie_prompts
        self.k = k
        self.selection = selection
        self.algorithm = algorithm
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.result: ExtractionResult | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or pl_module.fv_initialized:
            return
        datamodule = trainer.datamodule
        datamodule.attach(pl_module.adapter)
        pl_module.adapter.model.to(trainer.strategy.root_device)
        settings = ExtractionSettings(
            relations=list(pl_module.relations),
            shots=datamodule.shots,
            num_mean_prompts=self.num_mean_prompts,
            num_aie_prompts=self.num_aie_prompts,
            k=self.k,
            layer=pl_module.layer,
            selection=self.selection,
            algorithm=self.algorithm,
            batch_size=self.batch_size,
            seed=datamodule.seed,
        )
        self.result = extract_function_vectors(
            pl_module.adapter,
            datamodule.sampler("eval"),
            settings,
            self.cache_dir,
            data_fingerprint(datamodule.split_dir("eval")),
            progress=trainer.is_global_zero,
        )
        pl_module.set_function_vectors(self.result.fvs)
        # trainer.log_dir is a collective under DDP: every rank must ask for it.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._report(trainer, settings, log_dir)

    def _report(self, trainer: L.Trainer, settings: ExtractionSettings, log_dir: Path) -> None:
        result = self.result
        chosen = next(iter(result.fvs.heads.values()))
        figure = plots.aie_heatmap(result.aie_pooled, "AIE pooled over relations", chosen)
        log_dir.mkdir(parents=True, exist_ok=True)
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure("aie/heatmap", figure, global_step=0, close=False)
            logger.experiment.add_text("aie/heads", json.dumps(result.summary()["heads"]), global_step=0)
        plots.save(figure, log_dir / "aie_heatmap.png")
        summary = {"settings": asdict(settings), **result.summary(), "cache_dir": str(result.cache_dir)}
        (log_dir / "aie_summary.json").write_text(json.dumps(summary, indent=2))
