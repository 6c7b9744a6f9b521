"""GQA relation set: preparation from scene graphs (:mod:`mfv.data.gqa.prepare`, ``mfv prepare-gqa``)
and episodes (:mod:`mfv.data.gqa.datamodule`)."""

from mfv.data.gqa.datamodule import GQAEpisodeSampler, GQARelationDataModule, scenes_of
from mfv.data.gqa.prepare import (
    AGENTIC,
    BLACKLIST,
    SPATIAL,
    FilterSettings,
    iter_scene_graphs,
    normalise_relation,
    prepare,
    resolve_relations,
)

__all__ = ["AGENTIC", "BLACKLIST", "SPATIAL", "FilterSettings", "GQAEpisodeSampler", "GQARelationDataModule",
           "iter_scene_graphs", "normalise_relation", "prepare", "resolve_relations", "scenes_of"]
