"""Checkpoint checks of FV fine-tuning: a checkpoint holds only the FVs and their record."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mfv.errors import ConfigError

if TYPE_CHECKING:
    from mfv.training.module import FunctionVectorModule

FV_PARAMETER = "function_vectors"


def check_checkpoint(module: "FunctionVectorModule", checkpoint: Any, source: str | Path = "checkpoint",
                     require_finite: bool = True) -> None:
    """Raises :class:`ConfigError` (one line naming ``source`` and the field) unless
    ``checkpoint`` is a train.py checkpoint of ``module``'s backbone, relations in this order,
    layer and injection, holding FVs of the right shape (finite, with ``require_finite``)."""
    fix = "resume with the settings it was saved with, or start a new run without --ckpt_path"
    meta = checkpoint.get("mfv") if isinstance(checkpoint, dict) else None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    vectors = state.get(FV_PARAMETER) if isinstance(state, dict) else None
    if not isinstance(meta, dict) or not isinstance(vectors, torch.Tensor):
        raise ConfigError(f"{source}: not a train.py checkpoint (no function vectors and 'mfv' record); "
                          f"give --ckpt_path RUN/checkpoints/last.ckpt of a train.py run")
    shape = module.adapter.shape_signature()
    if meta.get("shape") != shape or meta.get("backbone_id", module.adapter.backbone_id) != module.adapter.backbone_id:
        raise ConfigError(f"{source}: saved for backbone {meta.get('backbone_id')!r} with shape {meta.get('shape')}, "
                          f"this run's model.backbone is {module.adapter.backbone_id!r} with shape {shape}; {fix}")
    stored = list(meta.get("relations", []))
    if stored != module.relations:
        what = "the same relations in another order" if sorted(stored) == sorted(module.relations) else "other relations"
        raise ConfigError(f"{source}: holds FVs for model.relations = {stored}, this run has {what}: "
                          f"{module.relations} (each row would steer another relation); {fix}")
    if meta.get("layer") != module.layer:
        raise ConfigError(f"{source}: holds FVs for model.layer = {meta.get('layer')}, this run injects after "
                          f"layer {module.layer}; {fix}")
    injection = meta.get("injection") or ("distributed" if vectors.dim() == 2 and module.adapter.num_layers > 1 and
                                          vectors.shape[1] == shape["hidden_size"] * module.adapter.num_layers
                                          else "single")
    if injection != module.hparams.injection:
        raise ConfigError(f"{source}: holds FVs for model.injection = {injection!r}, this run has "
                          f"{module.hparams.injection!r}; {fix}")
    if tuple(vectors.shape) != tuple(module.function_vectors.shape):
        raise ConfigError(f"{source}: its FVs have shape {tuple(vectors.shape)}, this run's "
                          f"{tuple(module.function_vectors.shape)}; {fix}")
    if require_finite and not bool(torch.isfinite(vectors).all()):
        raise ConfigError(f"{source}: its FVs hold NaN or inf (the fit diverged); resume from an earlier "
                          f"checkpoint or train again with a lower model.lr")
