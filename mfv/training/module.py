"""The LightningModule: a frozen backbone whose only trainable parameters are FVs."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import torch
from torch import nn

from mfv.data.episodes import EncodedBatch
from mfv.errors import ConfigError
from mfv.evaluation.engine import Outcomes
from mfv.evaluation.scoring import Score
from mfv.io import check_writable
from mfv.method.function_vector import FunctionVectorSet, non_finite
from mfv.models import load_backbone
from mfv.models.base import BackboneAdapter
from mfv.models.weights import cast_weights
from mfv.steering import Steer, steered_logits
from mfv.training.checkpoint import FV_PARAMETER, check_checkpoint
from mfv.training.optim import RowwiseAdam
from mfv.training.prompt_store import PromptStore, check_budget, print_note


def _check_options(init: str, scheduler_interval: str, relation_training: str, injection: str, lr: float,
                   backbone_dtype: str) -> None:
    """Raises :class:`ConfigError` naming the first bad ``model.*`` option."""
    choices = {"init": (init, ("extracted", "zeros", "random")),
               "scheduler_interval": (scheduler_interval, ("step", "epoch")),
               "relation_training": (relation_training, ("joint", "separate")),
               "injection": (injection, ("single", "distributed")),
               "backbone_dtype": (backbone_dtype, ("float32", "bfloat16", "auto"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
    if lr <= 0:
        raise ConfigError(f"model.lr = {lr} must be > 0")


class FunctionVectorModule(L.LightningModule):
    """Fine-tunes one function vector per relation inside a frozen backbone.

    The FV of a row's relation is added after ``layer`` at the last prompt position of a
    zero-shot prompt; the loss is cross-entropy on the answer's first token. Validation and
    test score the current FVs on their split with the evaluation library
    (:mod:`mfv.evaluation.engine`); the evaluation protocol itself needs no module.

    Args:
        backbone: Registered backbone name (see ``mfv.models.BACKBONES``).
        backbone_options: Keyword options of that backbone's builder.
        relations: Relations, one FV each.
        layer: Injection layer (default: the middle layer).
        init: ``extracted`` (set by the AIE callback or ``fv_path``), ``zeros`` or ``random``.
        fv_path: An FV file to start from (overrides the callback).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        scheduler_interval: Cosine annealing stepped per ``step`` (mfv's batched recipe) or per
            ``epoch`` (the authors': ``T_max`` = epochs).
        relation_training: ``joint`` (one Adam over all FVs) or ``separate`` (each relation's
            FV with its own Adam state and steps, as if trained alone: the authors').
        injection: ``single`` (one summed vector after ``layer``) or ``distributed`` (each
            selected head's projected mean at its own layer, one trainable vector per layer
            that holds a selected head).
        backbone_dtype: ``float32``, ``bfloat16`` or ``auto`` (:func:`mfv.hardware.resolve_dtype`:
            bf16 where the host multiplies it natively) for the frozen weights (the one dtype
            setting: builders that take a ``dtype`` build in it); FVs stay fp32.
        export_dir: Optional extra export folder (``<backbone>-finetuned.safetensors`` there);
            the best FVs always go to the run folder. An existing file there is an error at
            start, never silently replaced.
        prompt_store_gb: Gigabytes for the fit's prompt store (:mod:`mfv.training.prompt_store`):
            each training and validation prompt's pass runs once, later steps only the last
            position from the injection layer up; beyond it, prompts are recomputed (one line says so).
    """

    def __init__(
        self,
        backbone: str = "openflamingo-tiny",
        backbone_options: dict[str, Any] | None = None,
        relations: Sequence[str] = ("above", "below", "left", "right"),
        layer: int | None = None,
        init: Literal["extracted", "zeros", "random"] = "extracted",
        fv_path: str | None = None,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        scheduler_interval: Literal["step", "epoch"] = "step",
        relation_training: Literal["joint", "separate"] = "joint",
        injection: Literal["single", "distributed"] = "single",
        backbone_dtype: Literal["float32", "bfloat16", "auto"] = "float32",
        export_dir: str | None = None,
        prompt_store_gb: float = 2.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_options(init, scheduler_interval, relation_training, injection, lr, backbone_dtype)
        check_budget(prompt_store_gb)
        # Which names are valid depends on the data (synthetic or GQA); the datamodule
        # checks them (train.py links model.relations into it).
        self.relations = list(relations)
        if not self.relations or len(set(self.relations)) != len(self.relations):
            raise ConfigError(f"model.relations must be a non-empty list of distinct names, got {self.relations}")
        self.adapter: BackboneAdapter
        self._build_backbone()
        # Registered as a submodule so Lightning moves it to the device; it is frozen
        # and filtered out of every checkpoint.
        self.backbone = self.adapter.model
        self.layer = self.adapter.num_layers // 2 if layer is None else layer
        if not 0 <= self.layer < self.adapter.num_layers:
            raise ConfigError(
                f"model.layer = {self.layer} is out of range; valid layers: 0..{self.adapter.num_layers - 1}"
            )
        width = self.adapter.hidden_size * (self.adapter.num_layers if injection == "distributed" else 1)
        initial = torch.zeros(len(self.relations), width)  # distributed: (relations, layers * hidden)
        self.active_layers = list(range(self.adapter.num_layers)) if injection == "distributed" else [self.layer]
        if init == "random":
            initial.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
        self.function_vectors = nn.Parameter(initial)  # always fp32
        self.fv_initialized = init != "extracted"
        self.source_heads: dict[str, list[tuple[int, int]]] = {}
        if fv_path is not None:
            self.set_function_vectors(FunctionVectorSet.load(fv_path, self.adapter))
        self.exported_epoch: int | None = None
        if export_dir:
            target = self.export_path()
            if target.exists():
                raise ConfigError(f"model.export_dir: {target} exists; move it away or choose another export_dir "
                                  f"(the run folder always gets the FVs)")
            check_writable(export_dir, "model.export_dir")  # created when the FVs are exported
        # Where the data came from (split -> content fingerprint), recorded in exports; set by train.py.
        self.provenance: dict[str, Any] = {}
        self.strict_loading = False  # checkpoints hold only the FVs
        # Per-image work of the frozen vision tower, kept for a whole fit (every epoch sees the same images).
        self._image_store: dict | None = None
        self._prompt_store: PromptStore | None = None  # per-prompt last-position state, for a fit
        self._outcomes: Outcomes | None = None
        self.scores: dict[int, Score] = {}

    def _build_backbone(self) -> None:
        """The frozen backbone in ``model.backbone_dtype``, the one dtype setting: built in it
        where the builder takes a ``dtype`` (no float32 copy of a 4B model), else cast."""
        from mfv.models import backbone_spec

        options = dict(self.hparams.backbone_options or {})
        if "dtype" in options:
            raise ConfigError("model.backbone_options.dtype: set model.backbone_dtype instead (the one dtype "
                              "setting of the frozen weights)")
        from mfv.hardware import resolve_dtype

        dtype = resolve_dtype(self.hparams.backbone_dtype, options.get("device"), options)
        if backbone_spec(self.hparams.backbone).takes("dtype"):
            options["dtype"] = dtype
        self.adapter = load_backbone(self.hparams.backbone, **options)
        self.adapter.freeze()
        if self.adapter.dtype != getattr(torch, dtype):
            cast_weights(self.adapter.model, getattr(torch, dtype))  # rotary inv_freq stays fp32

    def __getstate__(self) -> dict[str, Any]:
        # open_flamingo mixes classes at run time, which pickle cannot name: ddp_spawn
        # ships the module without its frozen backbone and each process rebuilds it.
        state = self.__dict__.copy()
        state["_modules"] = {k: v for k, v in state["_modules"].items() if k != "backbone"}
        state.pop("adapter", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_backbone()
        self._modules["backbone"] = self.adapter.model

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "attach"):
            datamodule.attach(self.adapter)

    def train(self, mode: bool = True) -> "FunctionVectorModule":
        """Keeps the frozen backbone in eval mode (no dropout) whatever Lightning asks."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ----- FVs ---------------------------------------------------------------------
    def set_function_vectors(self, fvs: FunctionVectorSet) -> None:
        """Initialises the trainable FVs from an extracted set (same relations)."""
        fvs.check_compatible(self.adapter)
        missing = [r for r in self.relations if r not in fvs.vectors]
        if missing:
            raise ConfigError(f"the FV set has no vector for {missing}; it has {fvs.relations}")
        if fvs.distributed != (self.hparams.injection == "distributed"):
            raise ConfigError(f"the FV file is {'distributed' if fvs.distributed else 'single-layer'} but "
                              f"model.injection = {self.hparams.injection!r}")
        with torch.no_grad():
            self.function_vectors.copy_(fvs.stacked(self.relations).reshape(len(self.relations), -1))
        if fvs.distributed:
            self.active_layers = list(fvs.metadata.get("layers", range(self.adapter.num_layers)))
        if fvs.layer != self.layer:
            raise ConfigError(f"the FVs were extracted for layer {fvs.layer} but model.layer = {self.layer}")
        self.source_heads = {r: fvs.heads.get(r, []) for r in self.relations}
        self.fv_initialized = True

    def set_distributed_vectors(self, vectors: torch.Tensor, heads: dict[str, list[tuple[int, int]]]) -> None:
        """Initialises distributed FVs from ``(layers, relations, hidden)`` per-layer vectors
        (:meth:`mfv.method.extraction.Extraction.distributed_vectors`); only layers holding a
        selected head are injected (and so trained)."""
        with torch.no_grad():
            self.function_vectors.copy_(vectors.permute(1, 0, 2).reshape(len(self.relations), -1))
        self.active_layers = sorted({layer for hs in heads.values() for layer, _ in hs})
        self.source_heads = {r: list(heads.get(r, [])) for r in self.relations}
        self.fv_initialized = True

    def _per_layer(self) -> torch.Tensor:
        """Distributed FVs as ``(relations, layers, hidden)``."""
        return self.function_vectors.view(len(self.relations), self.adapter.num_layers, self.adapter.hidden_size)

    def function_vector_set(self, kind: str = "finetuned") -> FunctionVectorSet:
        """The current FVs as a saveable set (distributed: one ``(layers, hidden)`` tensor each)."""
        distributed = self.hparams.injection == "distributed"
        source = self._per_layer() if distributed else self.function_vectors
        return FunctionVectorSet(
            vectors={r: source[i].detach().float().cpu().clone() for i, r in enumerate(self.relations)},
            layer=self.layer,
            heads=self.source_heads or {r: [] for r in self.relations},
            backbone_id=self.adapter.backbone_id,
            shape=self.adapter.shape_signature(),
            metadata={"kind": kind, "epoch": self.exported_epoch, **self.provenance,
                      **({"injection": "distributed", "layers": self.active_layers} if distributed else {})},
        )

    # ----- steps -------------------------------------------------------------------
    def steer(self) -> Steer:
        """The trainable FVs as a relation-indexed :class:`~mfv.steering.Steer` (gradients flow
        into the parameter)."""
        if self.hparams.injection == "distributed":
            return Steer.per_layer(self._per_layer(), self.active_layers)
        return Steer.at(self.layer, self.function_vectors)

    def forward(self, batch: EncodedBatch, split: str | None = None) -> torch.Tensor:
        """Last-position logits, with each row's relation FV injected (:func:`mfv.steering.steered_logits`);
        with ``split`` (the dataset the rows index) inside a fit, from the fit's prompt store."""
        injection = self.steer().injection(batch.relation_ids, batch.indices)
        if split is None or self._prompt_store is None:
            return steered_logits(self.adapter, batch.prompts, injection)
        return self._prompt_store.logits(self.adapter, batch, injection, split)

    def reusing(self):
        """The backbone's reuse context over the fit's image store (a no-op outside a fit).
        Entered per step, so that nothing stays installed on the backbone if a run stops."""
        return self.adapter.reuse_context(self._image_store) if self._image_store is not None else nullcontext()

    def on_fit_start(self) -> None:
        self._image_store = {}
        budget = self.hparams.get("prompt_store_gb", 2.0)
        self._prompt_store = PromptStore(budget, say=None if self.global_rank else print_note) if budget else None

    def on_fit_end(self) -> None:
        self._image_store = self._prompt_store = None

    def training_step(self, batch: EncodedBatch, batch_idx: int) -> torch.Tensor:
        with self.reusing():
            logits = self(batch, "train")
        loss = nn.functional.cross_entropy(logits.float(), batch.answer_ids)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        optimizer = self.optimizers().optimizer if self._trainer is not None else None
        if isinstance(optimizer, RowwiseAdam):
            optimizer.present_rows = torch.zeros(len(self.relations), dtype=torch.bool).index_fill_(
                0, batch.relation_ids.cpu().unique(), True)
        return loss

    def configure_optimizers(self):
        optimizer_class = RowwiseAdam if self.hparams.relation_training == "separate" else torch.optim.Adam
        optimizer = optimizer_class([self.function_vectors], lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        interval = self.hparams.scheduler_interval
        periods = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(periods)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # ----- validation and test: the current FVs on the split -------------------------
    def _start(self, loaders) -> None:
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        self._outcomes = Outcomes([len(loader.dataset) for loader in loaders], self.device)

    def _record(self, batch: EncodedBatch, dataloader_idx: int, split: str | None = None) -> torch.Tensor:
        with torch.no_grad(), self.reusing():
            logits = self(batch, split)
        self._outcomes.record(dataloader_idx, batch, logits)
        return logits

    def _finish(self, stage: str) -> dict[int, Score]:
        outcomes, self._outcomes = self._outcomes, None
        scores = dict(enumerate(outcomes.scores([self.relations] * len(outcomes.tables), self.all_gather)))
        # Identical on every rank after the gather: no further reduction.
        for relation, entry in scores[0].per_relation().items():
            self.log(f"{stage}/acc_{relation}", entry["accuracy"], sync_dist=False)
        self.log(f"{stage}/acc", scores[0].accuracy, prog_bar=True, sync_dist=False)
        return scores

    def on_validation_epoch_start(self) -> None:
        self._start(self.trainer.val_dataloaders)

    def validation_step(self, batch: EncodedBatch, batch_idx: int) -> None:
        logits = self._record(batch, 0, "val")
        loss = nn.functional.cross_entropy(logits.float(), batch.answer_ids.to(logits.device))
        self.log("val/loss", loss, batch_size=len(batch), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish("val")
            return
        # The sanity check runs the FVs as initialised (extracted, before any step). When it
        # covers the whole split (num_sanity_val_steps -1, train.py's default), its accuracy is
        # logged at step 0, so TensorBoard shows what fine-tuning starts from.
        outcomes, self._outcomes = self._outcomes, None
        score = outcomes.scores([self.relations], self.all_gather)[0]  # gathered: the same on every rank
        if score.n == outcomes.tables[0].shape[1]:
            for logger in self.loggers:
                logger.log_metrics({"val/acc": score.accuracy}, step=0)

    def on_test_epoch_start(self) -> None:
        self._start(self.trainer.test_dataloaders)

    def test_step(self, batch: EncodedBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._record(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self.scores = self._finish("test")

    # ----- checkpoints -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps only the FVs: a checkpoint of the 4B run is kilobytes."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k == FV_PARAMETER}
        checkpoint["mfv"] = {
            "relations": self.relations,
            "layer": self.layer,
            "injection": self.hparams.injection,
            "backbone_id": self.adapter.backbone_id,
            "shape": self.adapter.shape_signature(),
            "source_heads": {r: [list(h) for h in hs] for r, hs in self.source_heads.items()},
            "active_layers": self.active_layers,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the FVs' provenance after :meth:`check_checkpoint` (a checkpoint of
        another backbone, relations, relation order, layer or injection is refused: its rows
        would be injected for the wrong relations or at the wrong layer)."""
        self.check_checkpoint(checkpoint, require_finite=False)  # a diverged fit is refused at export
        meta = checkpoint["mfv"]
        self.source_heads = {r: [tuple(h) for h in hs] for r, hs in meta.get("source_heads", {}).items()}
        self.active_layers = meta.get("active_layers", self.active_layers)
        self.fv_initialized = True

    def check_checkpoint(self, checkpoint: Any, source: str | Path = "checkpoint", require_finite: bool = True) -> None:
        """Raises :class:`ConfigError` (one line naming ``source`` and the field) unless
        ``checkpoint`` fits this run (:func:`mfv.training.checkpoint.check_checkpoint`)."""
        check_checkpoint(self, checkpoint, source, require_finite)

    def export_path(self, kind: str = "finetuned") -> Path:
        return Path(self.hparams.export_dir) / f"{self.adapter.backbone_id}-{kind}.safetensors"

    def export(self, path: str | Path | None = None, kind: str = "finetuned") -> Path:
        """Saves the current FVs as safetensors (default: :meth:`export_path`).

        Raises:
            ConfigError: an FV holds NaN or inf (the fit diverged); nothing is written.
        """
        fvs = self.function_vector_set(kind)
        bad = non_finite(fvs.vectors)
        if bad:
            epoch = "" if self.exported_epoch is None else f" (epoch {self.exported_epoch})"
            raise ConfigError(f"the fine-tuned FVs of {bad} hold NaN or inf{epoch}: the fit diverged and nothing "
                              f"was exported; train again with a lower model.lr (now {self.hparams.lr:g})")
        return fvs.save(Path(path) if path else self.export_path(kind))
