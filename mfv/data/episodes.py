"""In-context episodes over relation scenes: N-shot clean, zero-shot and corrupted prompts.

An episode is backbone-independent (images + strings); the backbone adapter renders it
into its own prompt format. Sampling is deterministic in (seed, index), so any worker
or rank builds the same episode for the same index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

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

    def __len__(self) -> int:
        return len(self.queries)

    def episode(self, index: int, mode: Mode = "clean", shots: int | None = None, relation: str | None = None) -> Episode:
        """Episode ``index``: query scene ``index`` with ``shots`` demonstrations.

        Modes: ``clean`` (demonstrations of the relation), ``zero_shot`` (query alone),
        ``corrupted`` (same demonstrations labelled with mixed relations, for AIE) and
        ``shuffled`` (the clean demonstrations with their answers permuted across them so
        that no demonstration keeps its own answer: the authors' shuffled-label baseline).
        """
        if mode not in MODES:
            raise DataError(f"unknown episode mode {mode!r}; valid: {list(MODES)}")
        shots = self.shots if shots is None else shots
        if mode != "zero_shot" and shots >= len(self.demo_pool):
            raise DataError(f"{shots} shots need more than {len(self.demo_pool)} scenes in the demonstration pool")
        query_scene = self.queries[index % len(self.queries)]
        relation = relation or query_scene.relation
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
