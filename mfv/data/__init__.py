"""Relation datasets: the synthetic scenes, GQA and your own data; episodes and DataModules.

What a user needs is importable from here (loaded on first use, so ``import mfv.data`` stays
cheap): ``SyntheticData``, ``GQAData``, ``OwnData`` (the DataModules), ``Scene``, ``Episode``,
``EpisodeSampler`` and ``read_examples`` (your own examples file, checked).
"""

from __future__ import annotations

_EXPORTS = {
    "SyntheticData": ("mfv.data.datamodule", "SyntheticRelationDataModule"),
    "SyntheticRelationDataModule": ("mfv.data.datamodule", "SyntheticRelationDataModule"),
    "GQAData": ("mfv.data.gqa", "GQARelationDataModule"),
    "GQARelationDataModule": ("mfv.data.gqa", "GQARelationDataModule"),
    "OwnData": ("mfv.data.own", "OwnRelationDataModule"),
    "OwnRelationDataModule": ("mfv.data.own", "OwnRelationDataModule"),
    "OwnExample": ("mfv.data.own", "OwnExample"),
    "read_examples": ("mfv.data.own", "read_examples"),
    "Scene": ("mfv.data.episodes", "Scene"),
    "Episode": ("mfv.data.episodes", "Episode"),
    "EpisodeSampler": ("mfv.data.episodes", "EpisodeSampler"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    import importlib

    if name not in _EXPORTS:
        raise AttributeError(f"module 'mfv.data' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)
