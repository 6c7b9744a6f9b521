"""In-context episodes over relation scenes: N-shot clean, zero-shot and corrupted prompts.

An episode is backbone-independent (images + strings); the backbone adapter renders it
into its own prompt format. Sampling is deterministic in (seed, index), so any worker
or rank builds the same episode for the same index.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mfv.errors import DataError
from mfv.models.base import BackboneAdapter, Example, Prompt, PromptBatch

Mode = Literal["clean", "zero_shot", "corrupted", "shuffled"]
MODES = ("clean", "zero_shot", "corrupted", "shuffled")


@dataclass(frozen=True)
class Scene:
    """One image and the name of the object standing in each relation to its anchor."""

    image_path: str
    anchor: str
    neighbours: dict[str, str]
    relation: str  # the relation assigned to this image (i mod #relations)

    def load_image(self) -> Image.Image:
        try:
            with Image.open(self.image_path) as image:
                return image.convert("RGB")
        except Exception as exc:
            raise DataError(f"{self.image_path}: unreadable image ({exc}); regenerate or remove it") from exc


@dataclass(frozen=True)
class ImageRecord:
    """What one read of an image file found: the blake2b digest of its bytes and, when it
    does not open and decode, why (``problem``)."""

    digest: str
    problem: str | None = None


# One read per file and process, keyed on what a replacement changes (inode, size, mtime, ctime).
_RECORDS: dict[tuple, ImageRecord] = {}
_RECORDS_LOCK = threading.Lock()


def _stat_key(path: str) -> tuple:
    stat = os.stat(path)
    return (path, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def scan_image(path: str | Path) -> ImageRecord:
    """Reads ``path`` once: hashes its bytes and checks that it opens and decodes.

    PIL's ``verify`` checks the whole file's structure (chunk CRCs, truncation) without
    decoding; a JPEG (whose ``verify`` checks little) is also decoded at reduced size
    (``draft``), which is cheap. The result is kept for the process while the file's
    inode, size and times stay the same.
    """
    path = str(path)
    try:
        key = _stat_key(path)
    except OSError as exc:
        return ImageRecord("", f"missing ({exc.strerror or exc})")
    with _RECORDS_LOCK:
        if key in _RECORDS:
            return _RECORDS[key]
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return ImageRecord("", f"unreadable ({exc.strerror or exc})")
    record = ImageRecord(hashlib.blake2b(data, digest_size=16).hexdigest(), _decode_problem(data))
    with _RECORDS_LOCK:
        _RECORDS[key] = record
    return record


def _decode_problem(data: bytes) -> str | None:
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
                image.load()
    except Exception as exc:  # PIL raises many types for bad bytes
        return f"does not decode as an image ({type(exc).__name__}: {exc})"
    return None


def scan_images(paths: Iterable[str | Path]) -> dict[str, ImageRecord]:
    """:func:`scan_image` of every distinct path (a few threads: hashing and decoding release the GIL)."""
    unique = sorted({str(p) for p in paths})
    if len(unique) < 16:
        return {p: scan_image(p) for p in unique}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(unique, pool.map(scan_image, unique)))


def images_digest(paths: Iterable[str | Path]) -> str:
    """One content hash over the images at ``paths`` (their names and bytes): replacing any
    image changes it, whatever its path and times."""
    digest = hashlib.blake2b(digest_size=16)
    for path, record in scan_images(paths).items():
        digest.update(f"{path}\0{record.digest or record.problem}\0".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Episode:
    """Demonstrations and a query; ``answer`` is the query's correct object name."""

    relation: str
    demonstrations: tuple[Example, ...]
    query: Example
    answer: str
    mode: Mode
    demo_relations: tuple[str, ...] = ()  # the relation each demonstration's label follows


def read_scenes(split_dir: str | Path) -> list[Scene]:
    """Reads the scenes of a generated split folder (``metadata.parquet`` + ``images/``)."""
    split_dir = Path(split_dir)
    table_path = split_dir / "metadata.parquet"
    if not table_path.is_file():
        raise DataError(f"{table_path} not found: generate the split with `python -m mfv.data.synthetic`")
    table = pd.read_parquet(table_path)
    scenes = []
    for image_id, rows in table.groupby("image_id", sort=True):
        by_role = dict(zip(rows["role"], rows["name"]))
        neighbours = {r: n for r, n in by_role.items() if r not in ("anchor", "distractor")}
        scenes.append(
            Scene(str(split_dir / rows["file"].iloc[0]), by_role["anchor"], neighbours, rows["relation"].iloc[0])
        )
    return scenes


class EpisodeSampler:
    """Builds episodes for the scenes of one split.

    Args:
        scenes: The split's scenes (queries), also the pool of demonstrations.
        relations: Relations to build episodes for; a query scene keeps its assigned one.
        shots: Demonstrations per clean/corrupted/shuffled prompt.
        seed: Base seed; episode ``i`` is a pure function of (seed, i).
        demo_scenes: Optional separate pool of demonstration scenes.
    """

    def __init__(
        self,
        scenes: Sequence[Scene],
        relations: Sequence[str],
        shots: int = 4,
        seed: int = 0,
        demo_scenes: Sequence[Scene] | None = None,
    ) -> None:
        self.relations = list(relations)
        self.queries = [s for s in scenes if s.relation in self.relations]
        if not self.queries:
            raise DataError(f"no scene is labelled with any of the relations {self.relations}")
        self.demo_pool = list(demo_scenes) if demo_scenes is not None else list(scenes)
        if shots < 0:
            raise DataError(f"shots must be >= 0, got {shots}")
        self.shots = shots
        self.seed = seed

    split: str | None = None  # the split's name, set by the DataModule that builds the sampler (for messages)

    def __len__(self) -> int:
        return len(self.queries)

    def scenes(self) -> list[Scene]:
        """Every scene an episode can show (queries and demonstrations), each once."""
        seen: dict[int, Scene] = {}
        for scene in (*self.queries, *self.demo_pool):
            seen.setdefault(id(scene), scene)
        return list(seen.values())

    def image_paths(self) -> list[str]:
        """Every image file an episode can load."""
        return sorted({s.image_path for s in self.scenes()})

    def max_shots(self) -> int:
        """The most demonstrations an N-shot prompt of this sampler can hold."""
        return len(self.demo_pool) - 1

    def relations_of_prompts(self, count: int) -> list[str]:
        """The relations of episodes ``0..count-1`` (each episode keeps its query's relation)."""
        return [self.queries[i % len(self.queries)].relation for i in range(count)]

    def episode(self, index: int, mode: Mode = "clean", shots: int | None = None, relation: str | None = None) -> Episode:
        """Episode ``index`` of the split, ``0 <= index < len(self)``: :meth:`draw` within range.

        Raises:
            IndexError: ``index`` outside the split (the message names its size); an index
                past the end never wraps around to ask an earlier query again.
            TypeError: ``index`` is not an integer.
        """
        index = self.index_of(index)
        if index >= len(self):
            where = f"the {self.split!r} split" if self.split else "this sampler"
            raise IndexError(f"episode {index} out of range: {where} has {len(self)} episodes (indices 0.."
                             f"{len(self) - 1}); sampler.draw(index, ...) cycles over them on purpose")
        return self.draw(index, mode, shots, relation)

    @staticmethod
    def index_of(index: object) -> int:
        """``index`` as a non-negative int (numpy and 0-d tensor integers too).

        Raises:
            IndexError: a negative index; TypeError: not an integer.
        """
        try:
            value = operator.index(index)
        except TypeError:
            raise TypeError(f"episode index must be an int, got {index!r} ({type(index).__name__})") from None
        if value < 0 or isinstance(index, bool):
            raise IndexError(f"episode index must be a non-negative int, got {index!r}")
        return value

    def request(self, index: object, mode: object, shots: object, relation: object) -> tuple[int, int, Scene, str]:
        """The arguments of :meth:`draw` checked: ``(index, shots, query scene, relation)``.

        Raises:
            DataError: an unknown mode, or a relation the query scene does not have.
            TypeError: an index or shot count that is no integer; IndexError: a negative index.
        """
        if mode not in MODES:
            close = difflib.get_close_matches(str(mode).replace("-", "_"), MODES, n=1)
            raise DataError(f"unknown episode mode {mode!r}; valid: {list(MODES)}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
        index = self.index_of(index)
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 0):
            raise TypeError(f"shots must be an int >= 0 (or None: the sampler's {self.shots}), got {shots!r}")
        query = self.queries[index % len(self.queries)]
        relation = relation or query.relation
        if relation not in query.neighbours:
            raise DataError(f"relation {relation!r}: the query scene has none; its relations: {sorted(query.neighbours)}")
        return index, self.shots if shots is None else int(shots), query, relation

    def draw(self, index: int, mode: Mode = "clean", shots: int | None = None, relation: str | None = None) -> Episode:
        """Episode ``index`` of the sampler's endless stream: query scene ``index mod len(self)``
        with ``shots`` demonstrations drawn from ``(seed, index)``, so that index ``len + i`` asks
        query ``i`` again with other demonstrations (extraction takes more prompts than a small
        split has queries this way; :meth:`episode` is the same within the split).

        Modes: ``clean`` (demonstrations of the relation), ``zero_shot`` (query alone),
        ``corrupted`` (same demonstrations labelled with mixed relations, for AIE) and
        ``shuffled`` (the clean demonstrations with their answers permuted across them so
        that no demonstration keeps its own answer: the authors' shuffled-label baseline).
        """
        index, shots, query_scene, relation = self.request(index, mode, shots, relation)
        if mode != "zero_shot" and shots > self.max_shots():
            raise DataError(f"a {shots}-shot prompt needs {shots + 1} scenes to draw from (the query's and {shots} "
                            f"others); this split has {len(self.demo_pool)}: lower the shots or add scenes")
        rng = np.random.default_rng([self.seed, index])
        demos: list[Example] = []
        demo_relations: list[str] = []
        if mode != "zero_shot" and shots > 0:
            candidates = [i for i in rng.permutation(len(self.demo_pool))[: shots + 1]]
            chosen = [self.demo_pool[i] for i in candidates if self.demo_pool[i] is not query_scene][:shots]
            if mode == "corrupted":
                # Cycle through a shuffled list of every relation: labels carry no information.
                pool = list(chosen[0].neighbours)
                labels = [pool[i % len(pool)] for i in rng.permutation(max(shots, len(pool)))][:shots]
            for k, scene in enumerate(chosen):
                label = labels[k] if mode == "corrupted" else relation
                demo_relations.append(label)
                demos.append(Example(scene.load_image(), scene.anchor, scene.neighbours[label]))
            if mode == "shuffled" and len(demos) > 1:
                # A random cyclic derangement: demonstration k shows the answer of demonstration order[k+1].
                order = rng.permutation(len(demos))
                answers = {int(order[i]): demos[int(order[(i + 1) % len(demos)])].answer for i in range(len(demos))}
                demos = [Example(d.image, d.question, answers[i]) for i, d in enumerate(demos)]
        query = Example(query_scene.load_image(), query_scene.anchor)
        return Episode(relation, tuple(demos), query, query_scene.neighbours[relation], mode, tuple(demo_relations))


@dataclass
class EncodedBatch:
    """A collated batch: the adapter's tensors, answer token ids, relation indices and
    each row's index in its dataset (so results gathered across ranks stay exact)."""

    prompts: PromptBatch
    answer_ids: torch.Tensor
    relation_ids: torch.Tensor
    indices: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "EncodedBatch":
        indices = None if self.indices is None else self.indices.to(device)
        return EncodedBatch(self.prompts.to(device), self.answer_ids.to(device), self.relation_ids.to(device), indices)

    def __len__(self) -> int:
        return len(self.answer_ids)


def encode_episodes(
    adapter: BackboneAdapter, episodes: Sequence[Episode], relations: Sequence[str],
    indices: Sequence[int] | None = None,
) -> EncodedBatch:
    """Renders and collates episodes for ``adapter``, with the answer's first token.

    Args:
        indices: each episode's index in its dataset (default ``0..len-1``).
    """
    prompts: list[Prompt] = [adapter.build_prompt(e.demonstrations, e.query) for e in episodes]
    answers = [adapter.answer_token_id(p.text, e.answer) for p, e in zip(prompts, episodes)]
    relation_index = {r: i for i, r in enumerate(relations)}
    return EncodedBatch(
        adapter.collate(prompts),
        torch.tensor(answers, dtype=torch.long),
        torch.tensor([relation_index[e.relation] for e in episodes], dtype=torch.long),
        torch.tensor(list(range(len(episodes))) if indices is None else list(indices), dtype=torch.long),
    )


class EpisodeDataset(torch.utils.data.Dataset):
    """Episodes of one mode as a map-style dataset (images loaded lazily, per item).

    Items are ``(index, episode)`` so that every batch knows its rows' dataset indices.
    """

    def __init__(self, sampler: EpisodeSampler, mode: Mode = "clean", shots: int | None = None, limit: int | None = None):
        self.sampler = sampler
        self.relations = list(sampler.relations)
        self.mode = mode
        self.shots = shots
        self.length = len(sampler) if limit is None else min(limit, len(sampler))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, Episode]:
        return index, self.sampler.episode(index, self.mode, self.shots)


class EpisodeList(torch.utils.data.Dataset):
    """Episodes built in advance (e.g. analogy problems) as a dataset of ``(index, episode)``."""

    def __init__(self, episodes: Sequence[Episode], relations: Sequence[str]):
        self.episodes = list(episodes)
        self.relations = list(relations)

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> tuple[int, Episode]:
        return index, self.episodes[index]


def episode_collator(
    adapter: BackboneAdapter, relations: Sequence[str]
) -> Callable[[list[tuple[int, Episode]]], EncodedBatch]:
    """A DataLoader ``collate_fn`` producing adapter-ready batches (runs in the workers)."""

    def collate(items: list[tuple[int, Episode]]) -> EncodedBatch:
        return encode_episodes(adapter, [e for _, e in items], relations, [i for i, _ in items])

    return collate
