"""Evaluation conditions: zero-shot, FVs, ICL baselines, sweeps and composite-FV analogies.

All conditions score top-1 accuracy of the answer's first token at the last prompt
position, per relation, on batched prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from mfv.data.episodes import EncodedBatch, Episode, EpisodeSampler, encode_episodes
from mfv.hooks import add_to_residual
from mfv.method.function_vector import build_function_vector
from mfv.models.base import BackboneAdapter, Example

WeightMode = Literal["normalized", "uniform", "raw"]


@dataclass
class Score:
    """Correct and total counts per relation."""

    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def add(self, relation: str, correct: int, total: int) -> None:
        self.correct[relation] = self.correct.get(relation, 0) + correct
        self.total[relation] = self.total.get(relation, 0) + total

    def tally(self, logits: torch.Tensor, batch: EncodedBatch, relations: Sequence[str]) -> None:
        """Adds a batch's top-1 results, per relation."""
        correct = (logits.argmax(-1).cpu() == batch.answer_ids).long()
        for i, relation in enumerate(relations):
            mask = batch.relation_ids == i
            if mask.any():
                self.add(relation, int(correct[mask].sum()), int(mask.sum()))

    @property
    def accuracy(self) -> float:
        """Mean of the per-relation accuracies (the paper's averaging)."""
        per = [self.correct[r] / self.total[r] for r in self.total if self.total[r]]
        return sum(per) / len(per) if per else 0.0

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "n": sum(self.total.values()),
            "per_relation": {
                r: {"correct": self.correct[r], "total": self.total[r], "accuracy": self.correct[r] / self.total[r]}
                for r in self.total
            },
        }


def episode_batches(
    adapter: BackboneAdapter, episodes: Sequence[Episode], relations: Sequence[str], batch_size: int
) -> list[EncodedBatch]:
    """Encodes episodes in batches of equal shot count (so image stacks match)."""
    return [encode_episodes(adapter, episodes[i : i + batch_size], relations) for i in range(0, len(episodes), batch_size)]


@torch.no_grad()
def score(
    adapter: BackboneAdapter,
    batches: Iterable[EncodedBatch],
    relations: Sequence[str],
    vectors: torch.Tensor | None = None,
    layer: int | None = None,
) -> Score:
    """Accuracy of ``batches``, optionally with a vector per row added after ``layer``.

    Args:
        vectors: ``(len(relations), hidden)`` indexed by each row's relation id, or
            ``(hidden,)`` for every row.
    """
    result = Score()
    for batch in batches:
        if vectors is None:
            logits = adapter.forward(batch.prompts)
        else:
            rows = vectors if vectors.dim() == 1 else vectors[batch.relation_ids]
            with add_to_residual(adapter, layer, rows):
                logits = adapter.forward(batch.prompts)
        result.tally(logits, batch, relations)
    return result


def function_vectors_from_means(
    adapter: BackboneAdapter, means: torch.Tensor, heads: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """``(relations, hidden)`` FVs of every relation from one head set."""
    return torch.stack([build_function_vector(adapter, means[r], heads) for r in range(means.shape[0])])


@dataclass
class AnalogyProblem:
    """A one-shot analogy: a source pair, then a target query of the same relation."""

    relation: str
    source: Example  # with answer
    target: Example
    answer: str


def analogy_problems(sampler: EpisodeSampler, count: int, seed: int = 0) -> list[AnalogyProblem]:
    """Problems on the composite split: source and target are different scenes."""
    problems = []
    scenes = sampler.queries
    generator = torch.Generator().manual_seed(seed)
    for index in range(min(count, len(scenes))):
        target = scenes[index]
        others = [s for s in scenes if s is not target]
        source = others[int(torch.randint(len(others), (1,), generator=generator))]
        relation = target.relation
        problems.append(
            AnalogyProblem(
                relation,
                Example(source.load_image(), source.anchor, source.neighbours[relation]),
                Example(target.load_image(), target.anchor),
                target.neighbours[relation],
            )
        )
    return problems


def analogy_episodes(problems: Sequence[AnalogyProblem], shots: int, sampler: EpisodeSampler) -> list[Episode]:
    """ICL baselines: 0-shot (query alone), 1-shot (the source pair), N-shot (source + N-1 more)."""
    episodes = []
    for index, problem in enumerate(problems):
        demos: tuple[Example, ...] = ()
        if shots >= 1:
            extra = sampler.episode(index, "clean", shots - 1, problem.relation).demonstrations if shots > 1 else ()
            demos = (problem.source, *extra)
        episodes.append(Episode(problem.relation, demos, problem.target, problem.answer, "clean"))
    return episodes


@torch.no_grad()
def composite_weights(
    adapter: BackboneAdapter,
    problems: Sequence[AnalogyProblem],
    trained_vectors: torch.Tensor,
    layer: int,
    mode: WeightMode = "normalized",
    batch_size: int = 16,
) -> torch.Tensor:
    """Per problem, the weight of each trained FV: the model's probability of the source
    answer on the source's zero-shot prompt with that FV injected.

    Returns ``(problems, trained_relations)``; ``normalized`` rows sum to 1, ``raw`` rows
    are the probabilities themselves, ``uniform`` rows are ``1/R``.
    """
    num_trained = trained_vectors.shape[0]
    if mode == "uniform":
        return torch.full((len(problems), num_trained), 1.0 / num_trained)
    if mode not in ("normalized", "raw"):
        raise ValueError(f"weight mode must be normalized, uniform or raw, got {mode!r}")
    probabilities = torch.empty(len(problems), num_trained)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [adapter.build_prompt([], Example(p.source.image, p.source.question)) for p in chunk]
        answers = torch.tensor([adapter.answer_token_id(q.text, p.source.answer) for q, p in zip(prompts, chunk)])
        batch = adapter.collate(prompts)
        for r in range(num_trained):
            with add_to_residual(adapter, layer, trained_vectors[r]):
                logits = adapter.forward(batch)
            probabilities[start : start + len(chunk), r] = (
                logits.float().softmax(-1).gather(-1, answers[:, None].to(logits.device)).squeeze(-1).cpu()
            )
    if mode == "raw":
        return probabilities
    return probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def score_composite(
    adapter: BackboneAdapter,
    problems: Sequence[AnalogyProblem],
    relations: Sequence[str],
    trained_vectors: torch.Tensor,
    weights: torch.Tensor,
    layer: int,
    batch_size: int = 16,
) -> Score:
    """Accuracy on target zero-shot queries with each problem's composite FV injected."""
    composites = weights @ trained_vectors  # (problems, hidden)
    result = Score()
    for start in tqdm(range(0, len(problems), batch_size), desc="composite FV", leave=False):
        chunk = problems[start : start + batch_size]
        episodes = [Episode(p.relation, (), p.target, p.answer, "zero_shot") for p in chunk]
        batch = encode_episodes(adapter, episodes, relations)
        with add_to_residual(adapter, layer, composites[start : start + len(chunk)]):
            logits = adapter.forward(batch.prompts)
        result.tally(logits, batch, relations)
    return result
