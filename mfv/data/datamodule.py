"""Lightning DataModule over the synthetic relation set.

Splits: ``train`` (zero-shot prompts to fine-tune FVs), ``val``/``test`` (zero-shot,
scored per relation), ``eval`` (N-shot clean and corrupted prompts for AIE and FV
extraction), ``novel`` and ``composite`` (evaluation only).
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from mfv.data.episodes import EpisodeDataset, EpisodeSampler, Mode, episode_collator, images_digest, read_scenes
from mfv.data.objects import builtin_library, folder_library
from mfv.data.synthetic import MIN_IMAGE_SIZE, RELATIONS, generate_split, relations_of, validate_relations
from mfv.errors import ConfigError
from mfv.models.base import BackboneAdapter


def first_token_clashes(adapter: BackboneAdapter, names: list[str]) -> list[list[str]]:
    """Groups of object names whose first answer token is the same for ``adapter``."""
    probe = "Q:x. A:"
    by_token: dict[int, list[str]] = {}
    for name in names:
        by_token.setdefault(adapter.answer_token_id(probe, name), []).append(name)
    return [group for group in by_token.values() if len(group) > 1]


def unknown_first_tokens(adapter: BackboneAdapter, names: Sequence[str]) -> list[str]:
    """Names whose first answer token is the tokenizer's unknown token (never scorable)."""
    unk = getattr(adapter.tokenizer, "unk_token_id", None)
    if unk is None:  # byte-level tokenizers know every string
        return []
    return [name for name in names if adapter.answer_token_id("Q:x. A:", name) == unk]


def hash_files(paths: Sequence[Path], *extra: object) -> str:
    """A short content hash of ``paths`` (sorted, names and bytes) and ``extra`` values."""
    digest = hashlib.sha256(repr(extra).encode())
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def split_seed(seed: int, split: str) -> int:
    """A per-split episode seed, stable across processes (unlike ``hash``)."""
    return seed * 1000 + zlib.crc32(split.encode()) % 997


def validate_data_settings(owner: str, shots: int, batch_size: int, num_workers: int, val_fraction: float) -> None:
    """Raises :class:`ConfigError` naming the field, at construction (before any compute)."""
    checks = [("shots", shots, shots >= 1, "N-shot prompts (extraction, ICL) need shots >= 1"),
              ("batch_size", batch_size, batch_size >= 1, "must be >= 1"),
              ("num_workers", num_workers, num_workers >= 0, "must be >= 0"),
              ("val_fraction", val_fraction, 0 <= val_fraction < 1, "must be in [0, 1)")]
    for field, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"data.init_args.{field} = {value}: {rule} ({owner})")


# Every split name a relation DataModule may have (each module's has_split says which it has).
SPLITS = ("train", "val", "test", "eval", "novel", "composite")


class RelationDataModule(L.LightningDataModule):
    """What every relation DataModule shares: the attached backbone, episode loaders, DDP sharding.

    Subclasses set ``relations``, ``shots``, ``batch_size``, ``num_workers``, ``seed`` and
    ``shuffle_train`` and implement :meth:`sampler`, :meth:`split_dir` and :meth:`has_split`.
    """

    adapter: BackboneAdapter | None = None
    # Answers are names from a fixed object set: two sharing a first token is an error (preflight).
    answers_closed: bool = True
    # Arguments naming files or folders the module reads (not writes): written in a config file,
    # they resolve against its folder (mfv.resources.config_inputs).
    input_paths: tuple[str, ...] = ()

    def attach(self, adapter: BackboneAdapter) -> None:
        """Sets the backbone whose prompt format and preprocessing the batches use."""
        self.adapter = adapter

    def __getstate__(self) -> dict:
        # Spawned processes re-attach their own backbone (FunctionVectorModule.setup).
        state = self.__dict__.copy()
        state["adapter"] = None
        return state

    def sampler(self, split: str) -> EpisodeSampler:
        raise NotImplementedError

    def check_split(self, split: object) -> str:
        """``split``, checked to be a split of this module (each :meth:`sampler` starts here).

        Raises:
            ConfigError: one line naming this module's splits and the closest to ``split``.
        """
        valid = [s for s in SPLITS if self.has_split(s)]
        if isinstance(split, str) and split in valid:
            return split
        lower = str(split).lower()
        close = difflib.get_close_matches(lower, valid, n=1) or [s for s in valid if lower.startswith(s)]  # validation
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{type(self).__name__} has no split {split!r}: its splits are {valid}{hint}")

    def split_dir(self, split: str) -> Path:
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    def fingerprint(self, split: str) -> str:
        """A content hash of everything that defines ``split``'s episodes (cache keys and
        provenance use it): the split's table, how it is cut and sampled, and the bytes of
        every image its episodes can show (:func:`~mfv.data.episodes.images_digest`), so that
        replacing an image at the same path gives another fingerprint."""
        raise NotImplementedError

    def data_relations(self, split: str) -> list[str]:
        """The relations the data of ``split`` has (by name), whatever this module asks for."""
        raise NotImplementedError

    def dataloader(
        self, split: str, mode: Mode = "zero_shot", shots: int | None = None, limit: int | None = None,
        shuffle: bool = False, batch_size: int | None = None,
    ) -> DataLoader:
        """Batches of ``split`` episodes in ``mode``, ready for the attached adapter."""
        if self.adapter is None:
            raise RuntimeError("call attach(adapter) before asking for batches")
        sampler = self.sampler(split)
        dataset = EpisodeDataset(sampler, mode, shots, limit)
        # A DistributedSampler even on one process: its order is a function of (seed, epoch)
        # (Lightning calls set_epoch), so a resumed run shuffles exactly as an uninterrupted
        # one; under DDP it shards, and Lightning keeps it (and the shuffle choice).
        distributed = dist.is_available() and dist.is_initialized()
        order = DistributedSampler(dataset, shuffle=shuffle, seed=self.seed,
                                   num_replicas=None if distributed else 1, rank=None if distributed else 0)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            collate_fn=episode_collator(self.adapter, sampler.relations),
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", "zero_shot", shuffle=self.shuffle_train)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val", "zero_shot")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test", "zero_shot")


class SyntheticRelationDataModule(RelationDataModule):
    """Generates (once, cached on disk), samples and batches the synthetic relation set.

    Args:
        data_dir: Where the splits are generated and cached.
        relations: Trained relations (subset of above/below/left/right).
        shots: Demonstrations per N-shot prompt (extraction, ICL).
        image_size: Canvas size of the generated scenes.
        num_images: Images per split; missing splits use these counts.
        batch_size: Prompts per batch.
        num_workers: DataLoader worker processes (image loading and tokenising).
        seed: Generation and episode seed.
        objects: Optional folder of object PNGs (see ``mfv.data.objects``).
        val_fraction: Part of the train split held out to pick the best epoch.
        shuffle_train: Shuffle training prompts each epoch.
    """

    input_paths = ("objects",)  # data_dir is where the set is generated (an output)

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        relations: Sequence[str] = tuple(RELATIONS),
        shots: int = 4,
        image_size: int = 800,
        num_images: dict[str, int] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        objects: str | None = None,
        val_fraction: float = 0.2,
        shuffle_train: bool = True,
    ) -> None:
        super().__init__()
        validate_data_settings(type(self).__name__, shots, batch_size, num_workers, val_fraction)
        if image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"data.init_args.image_size = {image_size}: the scene layout needs at least "
                              f"{MIN_IMAGE_SIZE} px ({type(self).__name__})")
        bad = {k: v for k, v in (num_images or {}).items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"data.init_args.num_images: {bad} must be positive image counts")
        self.data_dir = Path(data_dir)
        self.relations = validate_relations(list(relations))
        self.shots = shots
        self.image_size = image_size
        self.num_images = {"eval": 4000, "train": 1000, "test": 1000, "novel": 1000, "composite": 1000}
        self.num_images.update(num_images or {})
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.objects = objects
        self.val_fraction = val_fraction
        self.shuffle_train = shuffle_train
        self._samplers: dict[str, EpisodeSampler] = {}

    def attach(self, adapter: BackboneAdapter) -> None:
        """Sets the backbone, checking that every object has its own first answer token."""
        super().attach(adapter)
        library = builtin_library() if self.objects is None else folder_library(self.objects, 0)
        clashes = first_token_clashes(adapter, library.names())
        if clashes:
            warnings.warn(f"objects share a first answer token under {adapter.backbone_id}'s tokenizer, so their "
                          f"answers cannot be told apart: {clashes}; rename or drop them", stacklevel=2)

    def has_split(self, split: str) -> bool:
        """Every synthetic split exists (generated on demand)."""
        return split in self.num_images or split == "val"

    def split_dir(self, split: str) -> Path:
        source = "train" if split == "val" else split
        return self.data_dir / f"{source}-{self.image_size}px-seed{self.seed}-n{self.num_images[source]}"

    def fingerprint(self, split: str) -> str:
        """Hash of the split's scene table (object names, boxes, files), how ``val`` is cut and
        the bytes of every image of the split's episodes."""
        images = images_digest(self.sampler(split).image_paths())
        return hash_files([self.split_dir(split) / "metadata.parquet"], split, self.val_fraction, images)

    def data_relations(self, split: str) -> list[str]:
        return relations_of("train" if split == "val" else split)

    def prepare_data(self) -> None:
        for split in self.num_images:
            target = self.split_dir(split)
            if not (target / "metadata.parquet").is_file():
                generated = generate_split(
                    target.parent / ".staging" / target.name, split, self.num_images[split], self.image_size,
                    self.seed, self.objects,
                )
                # Rename into place only when complete: an interrupted run regenerates.
                target.parent.mkdir(parents=True, exist_ok=True)
                generated.rename(target)

    def _validation_rows(self, scenes: list) -> set[int]:
        """The held-out tail (``val_fraction``) of the train scenes; a relation the tail misses
        (a small split) also gives its last scene to it, if it keeps another one for training,
        so that validation covers every relation."""
        held = set(range(int(len(scenes) * (1 - self.val_fraction)), len(scenes)))
        for relation in self.relations:
            rows = [i for i, s in enumerate(scenes) if s.relation == relation]
            if len(rows) > 1 and not held.intersection(rows):
                held.add(rows[-1])
        return held

    def sampler(self, split: str) -> EpisodeSampler:
        """Episode sampler of ``split`` (``val`` is the held-out tail of ``train``, see
        :meth:`_validation_rows`)."""
        if split not in self._samplers:
            self.check_split(split)
            source = "train" if split == "val" else split
            scenes = read_scenes(self.split_dir(source))
            if source == "train":
                held = self._validation_rows(scenes)
                scenes = [s for i, s in enumerate(scenes) if (i in held) == (split == "val")]
            relations = self.relations if split != "composite" else sorted({s.relation for s in scenes})
            self._samplers[split] = EpisodeSampler(scenes, relations, self.shots, seed=split_seed(self.seed, split))
            self._samplers[split].split = split
        return self._samplers[split]

