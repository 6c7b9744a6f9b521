"""Scene pools and training batches of the model organism, built through the adapter's own
prompt path (``build_prompt``, ``collate``, ``answer_token_id``).

Pretraining scenes use all 42 object names (the 32 training and the 10 held-out objects of
the FV pipeline): the organism knows every name, as OpenFlamingo knows every object, while
the FV pipeline's splits keep the 32/10 division. Only the four cardinal relations are
trained; the diagonal relations are never seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from PIL import Image

from mfv.data.episodes import EpisodeDataset, EpisodeSampler, episode_collator, read_scenes
from mfv.data.synthetic import RELATIONS, generate_split
from mfv.models.base import BackboneAdapter, Example, PromptBatch
from mfv.models.openflamingo import CLIP_MEAN, CLIP_STD
from mfv.vocabulary import OBJECT_NAMES

CARDINAL = list(RELATIONS)
# What an object is in its scene; the patch-role auxiliary loss teaches the resampler
# latents to carry it, so one cross-attention hop answers "which relation does X stand in".
ROLES = ("anchor", *CARDINAL, "distractor")
# Validation conditions on held-out scenes: (name, split, mode, shots).
VALIDATION = (("icl_4", "test", "clean", 4), ("icl_1", "test", "clean", 1), ("zero_shot", "test", "zero_shot", 0),
              ("novel_icl_4", "novel", "clean", 4), ("novel_zero_shot", "novel", "zero_shot", 0))


class ScenePool:
    """Scenes with their images preprocessed into one tensor, and per-patch labels: which
    object covers each patch centre, and its role in the scene; the last class of each is
    background."""

    def __init__(self, split_dirs: list[Path], image_size: int, patch: int = 8) -> None:
        self.scenes, labels, roles, images = [], [], [], []
        names = {n: i for i, n in enumerate(OBJECT_NAMES)}
        grid = image_size // patch
        centres = (torch.arange(grid) * patch + patch / 2).float()
        order = {"anchor": 0, "distractor": 9}
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        for split_dir in split_dirs:
            scenes = read_scenes(split_dir)
            label = torch.full((len(scenes), grid, grid), len(names), dtype=torch.long)
            role = torch.full((len(scenes), grid, grid), len(ROLES), dtype=torch.long)
            table = pd.read_parquet(Path(split_dir) / "metadata.parquet")
            for image_id, rows in table.groupby("image_id", sort=True):
                rows = rows.assign(rank=rows.role.map(lambda r: order.get(r, 1))).sort_values("rank")
                for row in rows.itertuples():  # paste order: later objects cover earlier ones
                    cover = ((centres >= row.y0) & (centres < row.y1))[:, None] & ((centres >= row.x0) & (centres < row.x1))[None, :]
                    label[image_id][cover] = names[row.name]
                    role[image_id][cover] = ROLES.index(row.role) if row.role in ROLES else len(ROLES)
            pixels = np.stack([np.asarray(Image.open(s.image_path).convert("RGB").resize((image_size, image_size)))
                               for s in scenes])
            images.append(((torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255) - mean) / std)
            self.scenes += scenes
            labels.append(label.flatten(1))
            roles.append(role.flatten(1))
        self.images = torch.cat(images)
        self.patch_labels = torch.cat(labels)
        self.role_labels = torch.cat(roles)

    def __len__(self) -> int:
        return len(self.scenes)


@dataclass
class RowPlan:
    """One training row: (scene, question, answer) examples, the relation each answer's
    object stands in (-1: none), which answers carry loss, and whether it is in context."""

    examples: list[tuple[int, str, str]]
    relations: list[int]
    scored: list[bool]
    in_context: bool


def sample_rows(pool: ScenePool, rng: random.Random, batch_size: int, icl_share: float, max_shots: int,
                inverse_share: float = 0.1, score_first: bool = False) -> list[RowPlan]:
    """A training batch mixing three kinds of rows.

    * in context (share ``icl_share``): the paper's format, one hidden relation for the row,
      2..max_shots+1 images; every answer after the first carries loss, and with
      ``score_first`` the first too (the zero-shot prior "some neighbour of the anchor");
    * grounding: the relation stated, ``Q:{anchor} {relation}. A:{object}``;
    * inverse grounding (share ``inverse_share``): ``Q:{anchor} {object}. A:{relation}``.
    """
    plans = []
    for _ in range(batch_size):
        draw = rng.random()
        in_context = draw < icl_share
        inverse = not in_context and draw < icl_share + inverse_share
        count = rng.randint(2, max_shots + 1) if in_context else rng.randint(1, max_shots + 1)
        relation = rng.choice(CARDINAL)
        examples, relations = [], []
        for _ in range(count):
            index = rng.randrange(len(pool))
            scene = pool.scenes[index]
            rel = relation if in_context else rng.choice(CARDINAL)
            if inverse:
                examples.append((index, f"{scene.anchor} {scene.neighbours[rel]}", rel))
                relations.append(-1)
            else:
                question = scene.anchor if in_context else f"{scene.anchor} {rel}"
                examples.append((index, question, scene.neighbours[rel]))
                relations.append(CARDINAL.index(rel))
        scored = [score_first or not (in_context and k == 0) for k in range(count)]
        plans.append(RowPlan(examples, relations, scored, in_context))
    return plans


@dataclass
class TrainingBatch:
    """Collated rows plus where each loss reads: ``(row, position, target)`` for scored
    answers (the position whose logits predict the answer) and ``(row, position, relation)``
    for the two relation probes."""

    prompts: PromptBatch
    image_rows: list[list[int]]
    answers: torch.Tensor  # (n, 3)
    demo_probe: torch.Tensor  # (m, 3): at the answer token
    query_probe: torch.Tensor  # (q, 3): at the ':' before an in-context answer

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(self.prompts.to(device), self.image_rows, self.answers.to(device),
                             self.demo_probe.to(device), self.query_probe.to(device))


def encode_rows(adapter: BackboneAdapter, pool: ScenePool, plans: list[RowPlan]) -> TrainingBatch:
    """Renders rows with the adapter: every example but the last is a demonstration, the last
    is the query, whose answer is predicted at the last position (as in evaluation)."""
    prompts = [adapter.build_prompt([Example(pool.images[i], q, a) for i, q, a in plan.examples[:-1]],
                                    Example(pool.images[plan.examples[-1][0]], plan.examples[-1][1]))
               for plan in plans]
    batch = adapter.collate(prompts)
    ids = batch.input_ids
    a_id, colon = adapter.tokenizer.convert_tokens_to_ids("A"), adapter.tokenizer.convert_tokens_to_ids(":")
    last = ids.shape[1] - 1
    answers, demo_probe, query_probe = [], [], []
    for b, (plan, prompt) in enumerate(zip(plans, prompts)):
        row = ids[b].tolist()
        demo_answers = [i + 2 for i in range(len(row) - 2) if row[i] == a_id and row[i + 1] == colon]
        for k, relation in enumerate(plan.relations):
            is_query = k == len(plan.examples) - 1
            before = last if is_query else demo_answers[k] - 1  # the ':' whose logits predict the answer
            if plan.scored[k]:
                target = (adapter.answer_token_id(prompt.text, plan.examples[k][2]) if is_query
                          else row[demo_answers[k]])
                answers.append((b, before, target))
            if relation >= 0 and not is_query:
                demo_probe.append((b, demo_answers[k], relation))
            if relation >= 0 and plan.in_context and k > 0:
                query_probe.append((b, before, relation))

    def table(items: list[tuple[int, int, int]]) -> torch.Tensor:
        return torch.tensor(items, dtype=torch.long).reshape(-1, 3)

    return TrainingBatch(batch, [[i for i, _, _ in p.examples] for p in plans], table(answers), table(demo_probe),
                         table(query_probe))


class _TrainingRows(torch.utils.data.Dataset):
    """One epoch of training batches; batch ``i`` of epoch ``e`` is a pure function of
    (seed, e, i), so a run resumed from an epoch's checkpoint sees the same batches."""

    def __init__(self, datamodule: "OrganismDataModule") -> None:
        self.dm = datamodule
        self.epoch = 0

    def __len__(self) -> int:
        return self.dm.steps_per_epoch

    def __getitem__(self, index: int) -> TrainingBatch:
        dm = self.dm
        step = self.epoch * dm.steps_per_epoch + index
        rng = random.Random(dm.seed * 1_000_003 + step)
        plans = sample_rows(dm.pool, rng, dm.batch_size, dm.icl_share if step >= dm.icl_from else 0.0, dm.max_shots,
                            dm.inverse_share, step >= dm.score_first_from)
        return encode_rows(dm.adapter, dm.pool, plans)


class OrganismDataModule(L.LightningDataModule):
    """Pretraining pools (all 42 names) and held-out validation episodes (paper prompts).

    Args:
        work_dir: Where scene pools are generated (once).
        image_size: Canvas size.
        pool_size: Pretraining scenes with training objects.
        novel_pool_size: Pretraining scenes with the held-out objects (so their names are known).
        batch_size: Rows per step.
        steps_per_epoch: Steps between validations and checkpoints.
        icl_from: Step from which in-context rows appear.
        icl_share: Share of in-context rows.
        inverse_share: Share of inverse-grounding rows.
        score_first_from: Step from which the first in-context answer carries loss.
        max_shots: Most demonstrations per in-context row.
        eval_count: Episodes per validation condition.
        heldout_size: Scenes in each held-out validation split (trained and novel objects).
        seed: Batch seed.
    """

    def __init__(self, work_dir: str = "data/organism", image_size: int = 64, pool_size: int = 12000,
                 novel_pool_size: int = 3000, batch_size: int = 32, steps_per_epoch: int = 250, icl_from: int = 300,
                 icl_share: float = 0.7, inverse_share: float = 0.1, score_first_from: int = 2000,
                 max_shots: int = 4, eval_count: int = 400, heldout_size: int = 1000, seed: int = 0) -> None:
        super().__init__()
        self.work_dir = Path(work_dir)
        self.image_size, self.pool_size, self.novel_pool_size = image_size, pool_size, novel_pool_size
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.icl_from, self.icl_share, self.inverse_share = icl_from, icl_share, inverse_share
        self.score_first_from, self.max_shots, self.eval_count, self.seed = score_first_from, max_shots, eval_count, seed
        self.heldout_size = heldout_size
        self.adapter: BackboneAdapter | None = None
        self.pool: ScenePool | None = None
        self._rows = _TrainingRows(self)

    def _split(self, name: str, split: str, count: int, seed: int) -> Path:
        folder = self.work_dir / f"{name}-{self.image_size}px-n{count}-seed{seed}"
        if not (folder / split / "metadata.parquet").is_file():
            generate_split(folder, split, count, self.image_size, seed=seed)
        return folder / split

    def prepare_data(self) -> None:
        self.splits = {
            "pool": self._split("pool-train", "train", self.pool_size, 101),
            "pool_novel": self._split("pool-novel", "novel", self.novel_pool_size, 111),
            "test": self._split("heldout-test", "test", self.heldout_size, 202),
            "novel": self._split("heldout-novel", "novel", self.heldout_size, 212),
        }

    def setup(self, stage: str | None = None) -> None:
        if self.pool is None:
            self.prepare_data()
            self.pool = ScenePool([self.splits["pool"], self.splits["pool_novel"]], self.image_size)

    def attach(self, adapter: BackboneAdapter) -> None:
        self.adapter = adapter

    def set_epoch(self, epoch: int) -> None:
        self._rows.epoch = epoch

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self._rows, batch_size=None, shuffle=False)

    def val_dataloader(self) -> list[torch.utils.data.DataLoader]:
        loaders = []
        for _, split, mode, shots in VALIDATION:
            sampler = EpisodeSampler(read_scenes(self.splits[split]), CARDINAL, shots=max(shots, 1), seed=1234)
            dataset = EpisodeDataset(sampler, mode, shots, self.eval_count)
            loaders.append(torch.utils.data.DataLoader(dataset, batch_size=100,
                                                       collate_fn=episode_collator(self.adapter, CARDINAL)))
        return loaders
