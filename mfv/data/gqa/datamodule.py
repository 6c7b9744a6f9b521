"""GQA relation episodes and their DataModule.

Episodes follow the authors' protocol: a K-shot task uses K+1 distinct images (the query's
and K other ones, one per demonstration); a relation with fewer images than that is skipped
with a warning naming it and its counts; optionally a fixed number of tasks per relation,
each from a distinct image, is sampled (``tasks_per_relation``).
"""

from __future__ import annotations

import warnings
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from mfv.data.datamodule import RelationDataModule, hash_files, split_seed, validate_data_settings
from mfv.data.episodes import Episode, EpisodeSampler, Mode, Scene, images_digest
from mfv.data.gqa.prepare import resolve_relations
from mfv.errors import ConfigError, DataError
from mfv.models.base import Example


def scenes_of(rows: Sequence[dict]) -> list[Scene]:
    """One scene per task: the subject is the anchor, the relation's object the answer."""
    return [Scene(r["image_path"], r["subject"], {r["relation"]: r["object"]}, r["relation"]) for r in rows]


class GQAEpisodeSampler(EpisodeSampler):
    """Episodes over GQA tasks with distinct demonstration images.

    Clean prompts take each demonstration from a different image of the query's relation
    (never the query's image); corrupted and shuffled prompts take each demonstration from a
    different image, labelled with mixed relations.

    Args:
        tasks_per_relation: Keep at most this many query tasks per relation, each from a
            distinct image (seeded choice); ``None`` keeps every task.
    """

    source = "GQA"  # how messages name the data (your own data's sampler is this one)

    def __init__(self, scenes, relations, shots=4, seed=0, demo_scenes=None, tasks_per_relation=None) -> None:
        self.images_of: dict[str, dict[str, list[Scene]]] = defaultdict(lambda: defaultdict(list))
        for scene in (demo_scenes if demo_scenes is not None else scenes):
            self.images_of[scene.relation][scene.image_path].append(scene)
        # A K-shot task needs K demonstration images besides the query's.
        counts = {r: len(self.images_of.get(r, {})) for r in relations}
        self.skipped = {r: n for r, n in counts.items() if n < shots + 1}
        if self.skipped:
            warnings.warn(f"{self.source} relations skipped: fewer than {shots + 1} distinct images for a "
                          f"{shots}-shot task (relation: images) {self.skipped}", stacklevel=2)
        self.image_counts = counts
        usable = [s for s in scenes if s.relation not in self.skipped]
        if tasks_per_relation is not None:
            usable = self._one_task_per_image(usable, tasks_per_relation, seed)
        if not usable:
            raise DataError(f"no {self.source} relation has the {shots + 1} distinct images a {shots}-shot task needs "
                            f"(relation: images) {counts}: lower data.init_args.shots or prepare more images")
        super().__init__(self._interleaved(usable, relations), relations, shots, seed, demo_scenes)

    @staticmethod
    def _interleaved(scenes: list[Scene], relations: Sequence[str]) -> list[Scene]:
        """The tasks taken in turn from each relation (each keeping its order), so that the
        first N prompts (``--limit``, the AIE's prompt counts) cover every relation evenly."""
        by_relation: dict[str, list[Scene]] = defaultdict(list)
        for scene in scenes:
            by_relation[scene.relation].append(scene)
        order = [r for r in relations if r in by_relation] + sorted(set(by_relation) - set(relations))
        columns = [by_relation[r] for r in order]
        return [column[i] for i in range(max(map(len, columns), default=0)) for column in columns if i < len(column)]

    def scenes(self) -> list[Scene]:
        """Every scene an episode can show: the queries and every demonstration image's scenes."""
        seen = {id(s): s for s in super().scenes()}
        for by_image in self.images_of.values():
            for group in by_image.values():
                for scene in group:
                    seen.setdefault(id(scene), scene)
        return list(seen.values())

    def max_shots(self) -> int:
        """A K-shot task takes K images besides the query's, each showing the demonstrated
        relation: at most the smallest image count of a relation in use, minus one."""
        counts = [n for r, n in self.image_counts.items() if r not in self.skipped]
        return min(counts) - 1 if counts else 0

    @staticmethod
    def _one_task_per_image(scenes: list[Scene], limit: int, seed: int) -> list[Scene]:
        rng = np.random.default_rng([seed, 7])
        kept: list[Scene] = []
        by_relation: dict[str, list[Scene]] = defaultdict(list)
        for scene in scenes:
            by_relation[scene.relation].append(scene)
        for relation in sorted(by_relation):
            seen: set[str] = set()
            for index in rng.permutation(len(by_relation[relation])):
                scene = by_relation[relation][index]
                if scene.image_path not in seen and len(seen) < limit:
                    seen.add(scene.image_path)
                    kept.append(scene)
        return kept

    def draw(self, index: int, mode: Mode = "clean", shots: int | None = None, relation: str | None = None) -> Episode:
        """Episode ``index`` of the endless stream (:meth:`EpisodeSampler.draw`): each
        demonstration from another image of its relation, never the query's."""
        index, shots, query, relation = self.request(index, mode, shots, relation)
        rng = np.random.default_rng([self.seed, index])
        demos, labels = [], []
        if mode != "zero_shot" and shots > 0:
            if mode == "clean":
                labels = [relation] * shots
            else:  # corrupted / shuffled: labels from mixed relations
                present = [r for r in self.relations if r not in self.skipped and self.images_of.get(r)]
                labels = [present[i % len(present)] for i in rng.permutation(max(shots, len(present)))][:shots]
            used = {query.image_path}
            for label in labels:
                images = [p for p in self.images_of[label] if p not in used]
                if not images:
                    raise DataError(f"a {shots}-shot {self.source} prompt needs {shots} distinct images of relation "
                                    f"{label!r} besides the query's; this split has {len(self.images_of[label])} "
                                    f"images of it: lower the shots (data.init_args.shots, evaluation.shots) or "
                                    f"prepare more images")
                path = images[int(rng.integers(len(images)))]
                used.add(path)
                choices = self.images_of[label][path]
                scene = choices[int(rng.integers(len(choices)))]
                demos.append(Example(scene.load_image(), scene.anchor, scene.neighbours[label]))
            if mode == "shuffled" and len(demos) > 1:
                order = rng.permutation(len(demos))
                answers = {int(order[i]): demos[int(order[(i + 1) % len(demos)])].answer for i in range(len(demos))}
                demos = [Example(d.image, d.question, answers[i]) for i, d in enumerate(demos)]
        return Episode(relation, tuple(demos), Example(query.load_image(), query.anchor),
                       query.neighbours[relation], mode, tuple(labels))


class GQARelationDataModule(RelationDataModule):
    """Batches of GQA relation episodes, images loaded lazily with the adapter's preprocessing.

    ``mfv.GQAData`` is this class. ``dataset_dir`` is written beforehand by ``mfv prepare-gqa``
    (= ``python -m mfv.data.gqa prepare``; lists are jsonargparse lists)::

        mfv prepare-gqa --scene_graphs [train_sceneGraphs.json,val_sceneGraphs.json] \\
            --images /path/to/gqa/images --relations [spatial] --out data/gqa

    Args:
        dataset_dir: The ``--out`` folder of ``mfv prepare-gqa`` (holds ``dataset/``).
        relations: Relations to use (``spatial``, ``agentic`` or names).
        shots: Demonstrations per N-shot prompt.
        batch_size: Prompts per batch.
        num_workers: DataLoader workers.
        seed: Episode seed.
        val_fraction: Part of the train split (by image) held out to pick the best epoch.
        shuffle_train: Shuffle training prompts each epoch.
        tasks_per_relation: Query tasks per relation per split, from distinct images
            (the authors sample 200); ``None`` keeps every task.
    """

    answers_closed = False  # open-vocabulary object names, scored on the first token as the authors do
    input_paths = ("dataset_dir",)  # the data is read from it (a config's relative path: against the config)

    def __init__(self, dataset_dir: str = "data/gqa", relations: Sequence[str] = ("spatial",), shots: int = 4,
                 batch_size: int = 16, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.2,
                 shuffle_train: bool = True, tasks_per_relation: int | None = None) -> None:
        super().__init__()
        validate_data_settings(type(self).__name__, shots, batch_size, num_workers, val_fraction)
        if tasks_per_relation is not None and tasks_per_relation < 1:
            raise ConfigError(f"data.init_args.tasks_per_relation = {tasks_per_relation} must be >= 1 (or unset)")
        self.dataset_dir = Path(dataset_dir)
        self.relations = resolve_relations(relations)
        self.shots, self.batch_size, self.num_workers = shots, batch_size, num_workers
        self.seed, self.val_fraction, self.shuffle_train = seed, val_fraction, shuffle_train
        self.tasks_per_relation = tasks_per_relation
        self._samplers: dict[str, GQAEpisodeSampler] = {}

    def has_split(self, split: str) -> bool:
        return split in ("train", "val", "test", "eval")

    def split_dir(self, split: str) -> Path:
        return self.dataset_dir / "dataset"

    def fingerprint(self, split: str) -> str:
        """Hash of the prepared task table the split is drawn from (any other filter or
        seed at prepare time gives other bytes) and how the split is sampled."""
        source = "test" if split == "test" else "train"
        folder = self.dataset_dir / "dataset" / source
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        if not files:
            raise DataError(f"{folder} is missing or empty: run `python -m mfv.data.gqa prepare` again")
        images = images_digest(self.sampler(split).image_paths())
        return hash_files(files, split, self.val_fraction, self.tasks_per_relation, "interleaved", images)

    def data_relations(self, split: str) -> list[str]:
        """The relations of the prepared tasks of ``split``'s source (train or test)."""
        from datasets import load_from_disk

        source = "test" if split == "test" else "train"
        return sorted(set(load_from_disk(str(self.dataset_dir / "dataset"))[source]["relation"]))

    def prepare_data(self) -> None:
        if not (self.dataset_dir / "dataset").is_dir():
            raise DataError(f"{self.dataset_dir}/dataset not found: run `python -m mfv.data.gqa prepare ...` first")

    def sampler(self, split: str) -> GQAEpisodeSampler:
        if split not in self._samplers:
            from datasets import load_from_disk

            self.check_split(split)
            self.prepare_data()  # a missing preparation is one line, not load_from_disk's traceback
            data = load_from_disk(str(self.dataset_dir / "dataset"))
            source = "test" if split == "test" else "train"
            rows = [r for r in data[source] if r["relation"] in self.relations]
            missing = sorted(set(self.relations) - {r["relation"] for r in rows})
            if missing:
                warnings.warn(f"{self.dataset_dir}: no {source} task for relation(s) {missing}; they are skipped",
                              stacklevel=2)
            scenes = scenes_of(rows)
            if split in ("train", "val"):
                # By image, so that train and val never share one.
                images = sorted({s.image_path for s in scenes}, key=lambda p: zlib.crc32(p.encode()))
                held = set(images[int(len(images) * (1 - self.val_fraction)):])
                scenes = [s for s in scenes if (s.image_path in held) == (split == "val")]
            self._samplers[split] = GQAEpisodeSampler(scenes, self.relations, self.shots,
                                                      seed=split_seed(self.seed, split),
                                                      tasks_per_relation=self.tasks_per_relation)
            self._samplers[split].split = split
        return self._samplers[split]
