"""The one accuracy definition, its intervals and paired comparisons.

Accuracy is the **mean over relations** of per-relation top-1 accuracy of the answer's
first token (the paper's averaging), everywhere: training's ``val/acc`` and
``test/acc``, evaluation, reports. Intervals:

* per relation: Wilson score interval (95%) over its prompts;
* the mean over relations: percentile bootstrap (95%) over prompts, resampled within
  each relation (the per-relation counts stay fixed), with a fixed seed;
* paired comparisons of two conditions on the same prompts: the bootstrap interval of the
  difference (same resampled prompts for both) and a two-sided bootstrap p-value.

Small n: a relation with few prompts makes the bootstrap collapse (one prompt per relation
resamples to the same outcome every time: a zero-width interval). So when any relation has
fewer than :data:`MIN_BOOTSTRAP_PROMPTS` prompts, the interval of the mean is widened to
cover the mean of the per-relation Wilson bounds as well: ``[min(bootstrap low, mean of
Wilson lows), max(bootstrap high, mean of Wilson highs)]`` (``ci_method`` says so); a
paired difference is widened likewise to cover ``[mean of a's Wilson lows - mean of b's
Wilson highs, mean of a's Wilson highs - mean of b's Wilson lows]``. Never narrower than
the bootstrap, never zero-width below the minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
# Below this many prompts in any relation the bootstrap interval is widened (module docstring).
MIN_BOOTSTRAP_PROMPTS = 10
Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of ``correct / total`` (``(0, 1)`` when ``total`` is 0)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def macro_accuracy(correct: np.ndarray, relation: np.ndarray, num_relations: int) -> float:
    """Mean over relations (those with prompts) of per-relation accuracy."""
    per = [correct[relation == r].mean() for r in range(num_relations) if (relation == r).any()]
    return float(np.mean(per)) if per else 0.0


def _bootstrap_indices(relation: np.ndarray, num_relations: int, samples: int, seed: int) -> list[np.ndarray]:
    """Per relation, ``(samples, n_r)`` resampled prompt positions (stratified bootstrap)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(num_relations):
        rows = np.flatnonzero(relation == r)
        if len(rows):
            out.append(rows[rng.integers(0, len(rows), size=(samples, len(rows)))])
    return out


def _bootstrap_macro(correct: np.ndarray, strata: list[np.ndarray]) -> np.ndarray:
    return np.mean([correct[idx].mean(1) for idx in strata], axis=0)


@dataclass
class Score:
    """Per-prompt outcomes of one condition, and everything derived from them.

    Attributes:
        relations: Relation names (index = relation id).
        correct: ``(n,)`` 1 where the top-1 first token was the answer.
        relation: ``(n,)`` relation id of each prompt.
        probability: ``(n,)`` the model's probability of the answer's first token.
        predicted: ``(n,)`` the top-1 token id of each prompt (``None``: not recorded).
    """

    relations: list[str]
    correct: np.ndarray
    relation: np.ndarray
    probability: np.ndarray
    predicted: np.ndarray | None = None

    @classmethod
    def from_tensors(cls, relations: Sequence[str], correct: torch.Tensor, relation: torch.Tensor,
                     probability: torch.Tensor | None = None, predicted: torch.Tensor | None = None) -> "Score":
        correct_np = correct.detach().cpu().double().numpy()
        probability_np = (np.zeros_like(correct_np) if probability is None
                          else probability.detach().cpu().double().numpy())
        predicted_np = None if predicted is None else predicted.detach().cpu().long().numpy()
        return cls(list(relations), correct_np, relation.detach().cpu().long().numpy(), probability_np, predicted_np)

    @property
    def n(self) -> int:
        return int(len(self.correct))

    @property
    def accuracy(self) -> float:
        """Mean over relations of per-relation accuracy."""
        return macro_accuracy(self.correct, self.relation, len(self.relations))

    def per_relation(self) -> dict[str, dict]:
        out = {}
        for r, name in enumerate(self.relations):
            mask = self.relation == r
            total = int(mask.sum())
            if total:
                correct = int(self.correct[mask].sum())
                out[name] = {"correct": correct, "total": total, "accuracy": correct / total,
                             "ci95": list(wilson_interval(correct, total))}
        return out

    @property
    def small(self) -> bool:
        """Whether some relation has fewer than :data:`MIN_BOOTSTRAP_PROMPTS` prompts (the
        interval is then widened, see the module docstring)."""
        counts = [int((self.relation == r).sum()) for r in range(len(self.relations))]
        return any(0 < c < MIN_BOOTSTRAP_PROMPTS for c in counts)

    def wilson_mean_bounds(self) -> tuple[float, float]:
        """The means over relations (with prompts) of the per-relation Wilson bounds."""
        bounds = [entry["ci95"] for entry in self.per_relation().values()]
        if not bounds:
            return 0.0, 1.0
        return float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))

    def ci95(self, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
        """Stratified percentile bootstrap interval of :attr:`accuracy`, widened to the mean
        per-relation Wilson bounds when a relation has few prompts (:attr:`small`)."""
        if self.n == 0:
            return 0.0, 1.0
        strata = _bootstrap_indices(self.relation, len(self.relations), samples, seed)
        draws = _bootstrap_macro(self.correct, strata)
        low, high = np.percentile(draws, [2.5, 97.5])
        if self.small:
            wilson_low, wilson_high = self.wilson_mean_bounds()
            low, high = min(low, wilson_low), max(high, wilson_high)
        # Percentiles of a discrete statistic can miss the point estimate by rounding.
        return float(min(low, self.accuracy)), float(max(high, self.accuracy))

    @property
    def ci_method(self) -> str:
        if self.small:
            return (f"stratified bootstrap widened to the mean per-relation Wilson bounds (a relation has fewer "
                    f"than {MIN_BOOTSTRAP_PROMPTS} prompts)")
        return "stratified bootstrap"

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci95": list(self.ci95()), "ci_method": self.ci_method,
                "n": self.n, "per_relation": self.per_relation()}


def paired_comparison(a: Score, b: Score, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """``a - b`` on the same prompts: difference, its 95% paired bootstrap interval, p-value.

    Raises:
        ValueError: the two scores are not over the same prompts.
    """
    if a.n != b.n or not np.array_equal(a.relation, b.relation):
        raise ValueError("a paired comparison needs the same prompts in both conditions")
    strata = _bootstrap_indices(a.relation, len(a.relations), samples, seed)
    diff = _bootstrap_macro(a.correct, strata) - _bootstrap_macro(b.correct, strata)
    observed = a.accuracy - b.accuracy
    low, high = np.percentile(diff, [2.5, 97.5])
    method = "paired stratified bootstrap"
    if a.small or b.small:
        (a_low, a_high), (b_low, b_high) = a.wilson_mean_bounds(), b.wilson_mean_bounds()
        low, high = min(low, a_low - b_high), max(high, a_high - b_low)
        method += f", widened by the mean per-relation Wilson bounds (a relation has fewer than {MIN_BOOTSTRAP_PROMPTS} prompts)"
    # Two-sided: how often the resampled difference falls on the other side of zero; never
    # reported below the bootstrap's resolution (1 / samples).
    p = min(1.0, max(1.0 / samples, 2 * min(float((diff <= 0).mean()), float((diff >= 0).mean()))))
    return {"difference": observed, "ci95": [float(min(low, observed)), float(max(high, observed))],
            "p_value": p, "n": a.n, "method": method}
