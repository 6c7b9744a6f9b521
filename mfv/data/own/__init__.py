"""Your own relation data: a folder of images and a JSONL or CSV file of examples
(format: :mod:`mfv.data.own.reader`; README, "Your own data")."""

from mfv.data.own.datamodule import OwnEpisodeSampler, OwnRelationDataModule, scenes_of
from mfv.data.own.reader import FORMATS, REQUIRED, SPLITS, OwnExample, read_examples, select_relations
from mfv.data.own.splits import assign_splits, cut_by_image

__all__ = ["FORMATS", "REQUIRED", "SPLITS", "OwnEpisodeSampler", "OwnExample", "OwnRelationDataModule",
           "assign_splits", "cut_by_image", "read_examples", "scenes_of", "select_relations"]
