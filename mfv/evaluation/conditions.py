"""Evaluation conditions: what is injected where, over which prompts; analogy problems.

A :class:`Condition` is one dataset of episodes plus what is injected into its prompts
(a :class:`~mfv.steering.Steer`, or nothing). :func:`mfv.evaluation.engine.score_conditions`
scores a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from mfv.data.episodes import EncodedBatch, Episode, EpisodeSampler
from mfv.models.base import Example
from mfv.steering import Injection, Steer


# How progress labels name where a condition runs (the test split's conditions need no name).
GROUP_NAMES = {"novel": "novel objects", "analogy": "analogies", "weights": "composite weights"}
SPLIT_NAMES = {"val": "validation", "test": "test"}


@dataclass
class Condition:
    """One evaluated condition.

    Attributes:
        name: Stable name (the key in ``metrics.json``).
        group: Report group (``test``, ``novel``, ``analogy``, ``sweep``, ``weights``).
        split: The data split its prompts come from.
        dataset: ``(index, episode)`` items with a ``relations`` attribute.
        steer: What is injected (``None``: nothing).
        description: Human-readable label for tables and plots.
    """

    name: str
    group: str
    split: str
    dataset: torch.utils.data.Dataset
    steer: Steer | None = None
    description: str = ""

    def injection(self, batch: EncodedBatch) -> Injection | None:
        """The batch's injection (``None``: unsteered)."""
        if self.steer is None:
            return None
        return self.steer.injection(batch.relation_ids, batch.indices)

    def label(self) -> str:
        """What a progress bar calls this condition: its description with the injection layer
        (where the description does not say it) and, outside the test split, where it runs
        (e.g. ``novel objects: zero-shot + extracted FV (layer 1)``, ``validation sweep:
        zero-shot + FV (layer 3)``)."""
        text = self.description or self.name
        layers = list(self.steer.layers) if self.steer is not None else []
        if layers and "layer" not in text:
            text += f" (layer {layers[0]})" if len(layers) == 1 else f" (layers {layers[0]}-{layers[-1]})"
        if self.group == "sweep":
            return f"{SPLIT_NAMES.get(self.split, self.split)} sweep: {text}"
        context = GROUP_NAMES.get(self.group)
        return f"{context}: {text}" if context else text

    def metadata(self) -> dict:
        """Split, group, description and (when steered) the injection layer(s), for reports."""
        meta = {"split": self.split, "group": self.group, "description": self.description}
        if self.steer is not None:
            layers = list(self.steer.layers)
            meta["layer"] = layers[0] if len(layers) == 1 else layers
        return meta


@dataclass
class AnalogyProblem:
    """A one-shot analogy: a source pair, then a target query of the same (untrained) relation."""

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
        problems.append(AnalogyProblem(
            relation, Example(source.load_image(), source.anchor, source.neighbours[relation]),
            Example(target.load_image(), target.anchor), target.neighbours[relation]))
    return problems


def analogy_episodes(problems: Sequence[AnalogyProblem], shots: int, sampler: EpisodeSampler) -> list[Episode]:
    """ICL on the analogy problems: 0-shot (target alone), 1-shot (source pair + target),
    N-shot (source + N-1 more demonstrations of the relation)."""
    episodes = []
    for index, problem in enumerate(problems):
        demos: tuple[Example, ...] = ()
        if shots >= 1:
            extra = sampler.episode(index, "clean", shots - 1, problem.relation).demonstrations if shots > 1 else ()
            demos = (problem.source, *extra)
        episodes.append(Episode(problem.relation, demos, problem.target, problem.answer, "clean"))
    return episodes


def source_episodes(problems: Sequence[AnalogyProblem]) -> list[Episode]:
    """The sources' zero-shot prompts, answered by the source pair's answer (composite weights)."""
    return [Episode(p.relation, (), Example(p.source.image, p.source.question), p.source.answer, "zero_shot")
            for p in problems]


CompositeMode = Literal["normalized", "sum", "raw", "uniform", "softmax_affine"]
COMPOSITE_MODES: dict[str, str] = {
    "normalized": "weighted average, weights = P(source answer | FV_r) normalised to sum 1",
    "raw": "probability-weighted sum, weights = P(source answer | FV_r) not normalised",
    "sum": "plain sum of the trained FVs",
    "uniform": "plain average of the trained FVs",
    "softmax_affine": "arXiv 2601.08169: weights = softmax over P(source answer | FV_r), then an affine map "
                      "(scale and offset) fitted on validation prompts of the trained relations",
}


@dataclass
class AffineFit:
    """The affine map of the ``softmax_affine`` composite, fitted on the trained relations.

    Each fitting prompt ``n`` is a zero-shot prompt (query ``q_n``, answer ``r_n``) of a
    trained relation ``y_n`` from the validation split (training's held-out part; the train
    split for a data module without one, recorded in ``split``; never test). With ``p_n[i] = P(r_n | q_n, z_i)`` (basis FV ``z_i`` injected), the softmax
    composite is ``c_n = softmax(p_n) @ Z``; its target is the FV of the prompt's own
    relation, ``t_n = z_{y_n}``. The fit is the least-squares scalar scale ``a`` and vector
    offset ``b`` (hidden-size) of ``sum_n ||a c_n + b - t_n||^2``, in closed form:
    ``a = sum_n <c_n - c̄, t_n - t̄> / sum_n ||c_n - c̄||^2``, ``b = t̄ - a c̄``. It is
    well-defined for any number of relations from two prompts on (1 + hidden parameters; the
    offset is fixed by the means). When the composites do not vary (every softmax equal) the
    scale is undetermined and is set to 0 (the least-norm solution: the composite becomes
    ``t̄``), recorded in ``degenerate``.

    Attributes:
        scale: ``a``.
        offset: ``b``, ``(hidden,)``.
        n: Fitting prompts.
        split: Where they came from.
        degenerate: Whether the composites did not vary (``scale`` set to 0).
    """

    scale: float
    offset: torch.Tensor
    n: int
    split: str
    degenerate: bool = False

    @classmethod
    def fit(cls, probabilities: torch.Tensor, relation_ids: torch.Tensor, trained: torch.Tensor,
            split: str) -> "AffineFit":
        """Fits ``a`` and ``b`` (class docstring).

        Args:
            probabilities: ``(prompts, trained relations)`` ``P(r_n | q_n, z_i)``.
            relation_ids: ``(prompts,)`` index of each prompt's relation among the rows of ``trained``.
            trained: ``(trained relations, hidden)`` the basis FVs.
            split: The fitting prompts' split (recorded).
        """
        composites = composite_vectors(probabilities, trained, "softmax")
        return cls.least_squares(composites, trained[relation_ids.long()], split)

    @classmethod
    def least_squares(cls, composites: torch.Tensor, targets: torch.Tensor, split: str) -> "AffineFit":
        """The closed-form ``a``, ``b`` of ``sum_n ||a c_n + b - t_n||^2`` (rows of ``(n, hidden)``)."""
        composites, targets = composites.double(), targets.double()
        centred = composites - composites.mean(0)
        spread = float((centred * centred).sum())
        degenerate = spread <= 1e-12 * max(1.0, float((composites * composites).sum()))
        scale = 0.0 if degenerate else float((centred * (targets - targets.mean(0))).sum()) / spread
        offset = (targets.mean(0) - scale * composites.mean(0)).float()
        return cls(scale, offset, int(len(composites)), split, degenerate)

    def apply(self, composites: torch.Tensor) -> torch.Tensor:
        """``a c + b`` for ``(problems, hidden)`` composites."""
        return self.scale * composites.float() + self.offset

    def summary(self) -> dict:
        """What reports show: scale, offset norm, prompts, split, degenerate."""
        return {"scale": self.scale, "offset_norm": float(self.offset.norm()), "n": self.n, "split": self.split,
                "degenerate": self.degenerate}


def composite_vectors(probabilities: torch.Tensor, trained: torch.Tensor, mode: CompositeMode | str,
                      affine: AffineFit | None = None) -> torch.Tensor:
    """Per problem, the composite FV from the trained relations' FVs.

    Args:
        probabilities: ``(problems, trained relations)`` P(source answer | that FV injected).
        trained: ``(trained relations, hidden)``.
        mode: see :data:`COMPOSITE_MODES`; also ``softmax`` (the softmax composite before
            the affine map).
        affine: The fitted map (``softmax_affine`` only).

    Returns:
        ``(problems, hidden)``.
    """
    problems, count = probabilities.shape
    if mode == "normalized":
        weights = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-12)
    elif mode == "raw":
        weights = probabilities
    elif mode == "sum":
        weights = torch.ones(problems, count)
    elif mode == "uniform":
        weights = torch.full((problems, count), 1.0 / count)
    elif mode in ("softmax", "softmax_affine"):
        weights = torch.softmax(probabilities.double(), -1)
    else:
        raise ValueError(f"composite mode must be one of {sorted(COMPOSITE_MODES)}, got {mode!r}")
    composite = weights.float() @ trained.float()
    if mode != "softmax_affine":
        return composite
    if affine is None:
        raise ValueError("the softmax_affine composite needs its fitted affine map (AffineFit.fit)")
    return affine.apply(composite)
