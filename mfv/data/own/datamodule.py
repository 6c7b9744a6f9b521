"""Your own relation data as a DataModule: every experiment of the synthetic and GQA sets.

``data.class_path: mfv.data.own.OwnRelationDataModule`` in a ``train.py`` / ``evaluate.py``
config (``configs/own_data_example.yaml``), or ``mfv.data.OwnData(...)`` in Python. The file
is read and checked when the module is built (:func:`~mfv.data.own.reader.read_examples`),
so bad input stops before any model work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mfv.data.datamodule import RelationDataModule, hash_files, split_seed, validate_data_settings
from mfv.data.episodes import Scene, images_digest, scan_images
from mfv.data.gqa.datamodule import GQAEpisodeSampler
from mfv.data.own.reader import OwnExample, read_examples, select_relations
from mfv.data.own.splits import assign_splits
from mfv.errors import ConfigError, DataError


class OwnEpisodeSampler(GQAEpisodeSampler):
    """Episodes over your examples, as over GQA tasks: each demonstration from another image
    of its relation (never the query's), corrupted and shuffled labels from mixed relations."""

    source = "own-data"


def scenes_of(examples: Sequence[OwnExample]) -> list[Scene]:
    """One scene per example: the query is the anchor, the answer the relation's object."""
    return [Scene(e.image_path, e.query, {e.relation: e.answer}, e.relation) for e in examples]


class OwnRelationDataModule(RelationDataModule):
    """Batches of episodes over your own examples (a folder of images and a JSONL or CSV file).

    ``mfv.data.OwnData`` is this class. Format: :mod:`mfv.data.own.reader` and the README,
    "Your own data". Splits: the ``split`` field, or image-disjoint cuts by ``split_seed``
    (:func:`~mfv.data.own.splits.assign_splits`); ``eval`` (AIE and FV extraction) is
    ``train`` with ``val`` unless the file names its own.

    Args:
        data_dir: The image folder (``image`` fields are relative to it).
        annotations: The examples file, ``.jsonl`` or ``.csv`` (relative to ``data_dir``, or a path).
        relations: Relations to use (default: every relation of the file, in order of first use);
            ``train.py`` passes ``model.relations``.
        shots: Demonstrations per N-shot prompt (extraction, ICL); each from another image.
        batch_size: Prompts per batch.
        num_workers: DataLoader workers.
        seed: Episode seed.
        split_seed: Seed of the image-disjoint cuts (kept apart from ``seed``, so that runs over
            several episode seeds share their splits).
        test_fraction: Part of each relation's examples cut into ``test`` (no ``split`` field).
        val_fraction: Part of ``train`` cut into ``val`` (to pick the best epoch and the sweeps).
        shuffle_train: Shuffle training prompts each epoch.
        tasks_per_relation: Query examples per relation per split, from distinct images;
            ``None`` keeps every example.
    """

    answers_closed = False  # open-vocabulary names, scored on the first token as the authors do
    input_paths = ("data_dir",)  # the data is read from it (a config's relative path: against the config)

    def __init__(self, data_dir: str = "data/own", annotations: str = "examples.jsonl",
                 relations: Sequence[str] | None = None, shots: int = 4, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0, split_seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.2,
                 shuffle_train: bool = True, tasks_per_relation: int | None = None) -> None:
        super().__init__()
        validate_data_settings(type(self).__name__, shots, batch_size, num_workers, val_fraction)
        if not 0 < test_fraction < 1:
            raise ConfigError(f"data.init_args.test_fraction = {test_fraction}: must be in (0, 1) "
                              f"({type(self).__name__})")
        if tasks_per_relation is not None and tasks_per_relation < 1:
            raise ConfigError(f"data.init_args.tasks_per_relation = {tasks_per_relation} must be >= 1 (or unset)")
        self.data_dir = Path(data_dir)
        self.annotations = self.data_dir / annotations
        self.examples = read_examples(self.annotations, self.data_dir)
        self.relations = select_relations(self.examples, relations, self.annotations)
        self.shots, self.batch_size, self.num_workers = shots, batch_size, num_workers
        self.seed, self.split_seed, self.shuffle_train = seed, split_seed, shuffle_train
        self.test_fraction, self.val_fraction, self.tasks_per_relation = test_fraction, val_fraction, tasks_per_relation
        self.splits = assign_splits(self.examples, self.annotations, test_fraction, val_fraction, split_seed)
        self._samplers: dict[str, OwnEpisodeSampler] = {}

    def has_split(self, split: str) -> bool:
        """``train``, ``val``, ``test`` and ``eval`` always; ``novel`` when the file has one."""
        return split in self.splits

    def split_dir(self, split: str) -> Path:
        return self.data_dir

    def data_relations(self, split: str) -> list[str]:
        """Every relation of ``split``'s examples (whatever ``relations`` asks for)."""
        return sorted({e.relation for e in self.splits.get(split, [])})

    def fingerprint(self, split: str) -> str:
        """Hash of the examples file, how ``split`` is cut and sampled, and the bytes of every
        image of its episodes (content-addressed: replacing an image changes it)."""
        images = images_digest(self.sampler(split).image_paths())
        cut = (self.test_fraction, self.val_fraction, self.split_seed)
        return hash_files([self.annotations], split, cut, self.tasks_per_relation, "own", images)

    def prepare_data(self) -> None:
        """Checks that every image of the used relations opens and decodes (nothing to generate).

        Raises:
            DataError: naming the examples file, the line and the image that fails.
        """
        used = [e for e in self.examples if e.relation in self.relations]
        records = scan_images(e.image_path for e in used)
        for example in used:
            problem = records[example.image_path].problem
            if problem:
                name = Path(example.image_path).relative_to(self.data_dir)
                raise DataError(f"{self.annotations}:{example.line}: field 'image': {name} {problem}")

    def sampler(self, split: str) -> OwnEpisodeSampler:
        """Episode sampler of ``split`` (deterministic in the file, the seeds and the settings)."""
        if split not in self._samplers:
            self.check_split(split)
            examples = [e for e in self.splits[split] if e.relation in self.relations]
            if not examples:
                raise DataError(f"{self.annotations}: the {split} split has no example of relations {self.relations}")
            self._samplers[split] = OwnEpisodeSampler(scenes_of(examples), self.relations, self.shots,
                                                      seed=split_seed(self.seed, split),
                                                      tasks_per_relation=self.tasks_per_relation)
            self._samplers[split].split = split
        return self._samplers[split]
