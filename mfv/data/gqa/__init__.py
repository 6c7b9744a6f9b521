"""GQA relation set: preparation from scene graphs (:mod:`mfv.data.gqa.prepare`, ``mfv prepare-gqa``;
files streamed by :mod:`mfv.data.gqa.scene_graphs`) and episodes (:mod:`mfv.data.gqa.datamodule`)."""

from mfv.data.gqa.datamodule import GQAEpisodeSampler, GQARelationDataModule, scenes_of
from mfv.data.gqa.prepare import (
    AGENTIC,
    BLACKLIST,
    SPATIAL,
    FilterSettings,
    normalise_relation,
    prepare,
    resolve_relations,
)
from mfv.data.gqa.scene_graphs import iter_scene_graphs

__all__ = ["AGENTIC", "BLACKLIST", "SPATIAL", "FilterSettings", "GQAEpisodeSampler", "GQARelationDataModule",
           "iter_scene_graphs", "normalise_relation", "prepare", "resolve_relations", "scenes_of"]
