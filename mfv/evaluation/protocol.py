"""The evaluation protocol as one call: :func:`evaluate` returns an :class:`EvaluationResult`.

Conditions (names are the keys of ``metrics.json``), on the test split and, prefixed
``novel_``, on held-out objects:

* ``zero_shot``; ``zero_shot_fv`` (extracted FVs); ``zero_shot_fv_distributed`` (each
  selected head's projected mean added after its own layer); ``zero_shot_finetuned_fv``;
* ``icl_N`` for N in ``shots``; ``icl_shuffled_S`` and ``icl_shuffled_S_fv`` (S = the
  datamodule's shots; labels permuted so that every demonstration is wrong where possible);
* sweeps of the injection layer and of K on the validation split (where the choice is
  made) and on the test split (where it is reported);
* analogies on the untrained diagonal relations: ``analogy_icl_{0,1,4}``,
  ``analogy_fv_<relation>``, and composite FVs in every mode of
  :data:`~mfv.evaluation.conditions.COMPOSITE_MODES`, injected into the zero-shot target
  (``analogy_composite_<mode>``) and into the one-shot analogy prompt
  (``analogy_composite_<mode>_one_shot``), with fine-tuned FVs too when given.

``settings.protocol`` ``authors`` reproduces the authors' evaluation instead
(:mod:`mfv.evaluation.authors`): only test prompts whose eval prompt of the same relation and
image file is answered with 4-shot ICL are scored, and the sweeps choose on test.

:func:`evaluate` reads as its steps: the conditions of each split, the sweeps, the analogy
conditions, a scoring pass for the composites' source weights, the composite conditions built
from them, one scoring pass over everything else (conditions over the same prompts share it),
the result. The conditions are built by :mod:`mfv.evaluation.plan`, from the settings and
vectors of :mod:`mfv.evaluation.settings` (importable from here too). Conditions are data
(:class:`~mfv.evaluation.conditions.Condition`); scores are
looked up by the condition objects that produced them. Scoring is
:func:`mfv.evaluation.engine.score_conditions` (in this process, or on every rank of a
Lightning ``Fabric``). Reports are written from the result by :mod:`mfv.evaluation.report`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mfv.data.episodes import Episode, EpisodeList
from mfv.errors import ConfigError
from mfv.evaluation.answers import constant_answer_warnings
from mfv.evaluation.authors import authors_filter
from mfv.evaluation.conditions import Condition
from mfv.evaluation.engine import score_conditions
from mfv.evaluation.plan import (
    Analogies,
    PromptSets,
    Sweep,
    analogies,
    composite_conditions,
    fv_steer,
    split_conditions,
    sweeps,
)
from mfv.evaluation.scoring import Score, paired_comparison
from mfv.evaluation.settings import EvaluationSettings, Vectors
from mfv.models.base import BackboneAdapter

Scorer = Callable[[list[Condition]], dict[str, Score]]


@dataclass
class EvaluationResult:
    """Scores of every condition plus what the report needs around them."""

    scores: dict[str, Score]
    conditions: dict[str, dict]
    sweeps: dict[str, dict]
    comparisons: dict[str, dict]
    analogy_weights: dict[str, dict[str, float]]
    extraction: dict
    injected: dict
    settings: dict
    not_run: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The ``metrics.json`` content (schema version 2)."""
        return {
            "schema_version": 2,
            "summary": {name: s.accuracy for name, s in self.scores.items()},
            "conditions": {name: {**self.conditions[name], **s.as_dict()} for name, s in self.scores.items()},
            "comparisons": self.comparisons,
            "sweeps": self.sweeps,
            "analogy_weights": self.analogy_weights,
            "extraction": self.extraction,
            "injected": self.injected,
            "settings": self.settings,
            "not_run": self.not_run,
            "warnings": self.warnings,
        }


def evaluate(
    adapter: BackboneAdapter,
    datamodule,
    vectors: Vectors,
    settings: EvaluationSettings | None = None,
    scorer: Scorer | None = None,
    only: Sequence[str] | None = None,
) -> EvaluationResult:
    """Evaluates every condition of the protocol (see module docstring).

    Args:
        adapter: The backbone.
        datamodule: A relation DataModule attached to the backbone.
        vectors: What is injected (extracted FVs; fine-tuned FVs, per-layer spread and the
            extraction for the K sweep when given).
        settings: What to evaluate (default: :class:`EvaluationSettings`).
        scorer: Scores a list of conditions (default: :func:`score_conditions` in this process
            with the settings' batch size and reuse).
        only: Condition names or shell patterns (``"zero_shot*"``) to run; default: all. A
            pattern matching nothing is an error.
    """
    settings = settings or EvaluationSettings()
    settings.validate()
    relations = list(vectors.extracted.relations)
    vectors.check(adapter, relations)
    scorer = scorer or (lambda conditions: score_conditions(
        adapter, conditions, settings.batch_size or datamodule.batch_size, datamodule.num_workers, settings.reuse))
    not_run: dict[str, str] = {}
    protocol: dict = {"name": settings.protocol}
    keep = None
    if settings.protocol == "authors":  # which test prompts are scored, before any condition is built
        filters = authors_filter(datamodule, scorer, settings.limit)
        keep = {split: f.kept for split, f in filters.items()}
        protocol["filter"] = {split: f.summary() for split, f in filters.items()}
    prompts = PromptSets(datamodule, keep)
    conditions = split_conditions(datamodule, "test", vectors, settings, not_run, prompts)
    if datamodule.has_split("novel"):
        conditions += split_conditions(datamodule, "novel", vectors, settings, not_run, prompts)
    swept = sweeps(adapter, datamodule, vectors, settings, prompts)
    conditions += [c for sweep in swept for split in sweep.conditions.values() for c in split]
    found = analogies(datamodule, vectors, settings, prompts)
    later = found.composite_names(settings.composite_modes) if found is not None else []
    if found is not None:
        conditions += found.conditions + found.weight_conditions()
    wanted = _matcher(only, [c.name for c in conditions] + later)
    # The composites' weights are scored first: run them whenever a composite is wanted.
    weights_wanted = any(wanted(name) for name in later)
    conditions = [c for c in conditions if wanted(c.name) or (c.group == "weights" and weights_wanted)]
    composites = found if found is not None and weights_wanted else None
    conditions, scores, mean_weights = _score(scorer, conditions, composites, vectors, settings, wanted)
    swept = [sweep for sweep in swept if all(c.name in scores for cs in sweep.conditions.values() for c in cs)]
    result = _result(adapter, datamodule, vectors, settings, conditions, scores, swept, mean_weights, not_run)
    result.settings["protocol"] = protocol
    if composites is not None and composites.fits:
        result.settings["composite_affine"] = {kind: fit.summary() for kind, fit in composites.fits.items()}
    return result


def _score(scorer: Scorer, conditions: list[Condition], found: Analogies | None, vectors: Vectors,
           settings: EvaluationSettings, wanted: Callable[[str], bool]
           ) -> tuple[list[Condition], dict[str, Score], dict[str, dict[str, float]]]:
    """Scores ``conditions`` and, with ``found``, the composite conditions built from the
    source weights: the weights first, on their own, then everything else in one pass, so
    that each composite shares the prompt pass of the analogy conditions over its prompts.

    Returns:
        Every scored condition (the composites last), the scores by name, and the mean
        normalised composite weights (see :func:`composite_conditions`).
    """
    weights = [c for c in conditions if c.group == "weights"]
    scores = scorer(weights) if weights else {}
    mean_weights: dict[str, dict[str, float]] = {}
    if found is not None:
        composites, mean_weights = composite_conditions(found, vectors, scores, settings.composite_modes)
        conditions = conditions + [c for c in composites if wanted(c.name)]
    scores.update(scorer([c for c in conditions if c.group != "weights"]))
    return conditions, scores, mean_weights


def evaluate_episodes(
    adapter: BackboneAdapter,
    episodes: Sequence[Episode],
    vectors: Vectors,
    settings: EvaluationSettings | None = None,
    scorer: Scorer | None = None,
) -> EvaluationResult:
    """Zero-shot accuracy of your own episodes without and with the FVs (each episode's
    relation's vector; fine-tuned FVs too when given), as an :class:`EvaluationResult`.

    Args:
        adapter: The backbone.
        episodes: Episodes whose relations all have a vector in ``vectors.extracted``; they
            are scored as they are (their demonstrations, if any, stay in the prompt).
        vectors: What is injected.
        settings: Batch size and reuse (default: :class:`EvaluationSettings`).
        scorer: As in :func:`evaluate`.
    """
    settings = settings or EvaluationSettings()
    settings.validate()
    relations = list(vectors.extracted.relations)
    unknown = sorted({e.relation for e in episodes} - set(relations))
    if unknown:
        raise ConfigError(f"episodes of relations {unknown} have no vector; the FVs cover {relations}")
    if not episodes:
        raise ConfigError("no episodes to evaluate")
    vectors.check(adapter, relations)
    scorer = scorer or (lambda conditions: score_conditions(adapter, conditions, settings.batch_size or 16,
                                                            reuse=settings.reuse))
    data = EpisodeList(episodes[:settings.limit], relations)
    conditions = [Condition("zero_shot", "test", "episodes", data, None, "zero-shot"),
                  Condition("zero_shot_fv", "test", "episodes", data, fv_steer(vectors.extracted, relations),
                            "zero-shot + extracted FV")]
    if vectors.finetuned is not None:
        conditions.append(Condition("zero_shot_finetuned_fv", "test", "episodes", data,
                                    fv_steer(vectors.finetuned, relations), "zero-shot + fine-tuned FV"))
    return _result(adapter, None, vectors, settings, conditions, scorer(conditions), [], {}, {})


def _matcher(only: Sequence[str] | None, names: list[str]) -> Callable[[str], bool]:
    """Whether a condition name is wanted; a pattern of ``only`` matching no name is an error."""
    if only is None:
        return lambda name: True
    unmatched = [p for p in only if not fnmatch.filter(names, p)]
    if unmatched:
        raise ConfigError(f"conditions {unmatched} match no condition of this evaluation; it has {names}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in only)


def _result(adapter: BackboneAdapter, datamodule, vectors: Vectors, settings: EvaluationSettings,
            conditions: list[Condition], scores: dict[str, Score], swept: list[Sweep],
            mean_weights: dict[str, dict[str, float]], not_run: dict[str, str]) -> EvaluationResult:
    shown = [c for c in conditions if c.group not in ("sweep", "weights")]
    shown_scores = {c.name: scores[c.name] for c in shown}
    extracted, finetuned = vectors.extracted, vectors.finetuned
    described = {c.name: c.metadata() for c in shown}
    return EvaluationResult(
        scores=shown_scores,
        conditions=described,
        sweeps={sweep.name: _sweep_entry(sweep, scores, "test" if settings.protocol == "authors" else "val")
                for sweep in swept},
        comparisons=_comparisons(shown_scores, datamodule.shots if datamodule is not None else 0),
        analogy_weights=mean_weights,
        extraction=vectors.extraction.summary(vectors.k, vectors.selection) if vectors.extraction else {},
        injected={"extracted": {"layer": extracted.layer, "k": vectors.k, "selection": vectors.selection,
                                "heads": {r: [list(h) for h in hs] for r, hs in extracted.heads.items()}},
                  "finetuned": None if finetuned is None else {
                      "layer": finetuned.layer, "heads": {r: [list(h) for h in hs] for r, hs in finetuned.heads.items()},
                      "metadata": finetuned.metadata}},
        settings={"limit": settings.limit, "shots": settings.shots,
                  "max_k": next((s.points[-1] for s in swept if s.name == "k"), None),
                  "sweep_limit": min(settings.limit or settings.sweep_limit, settings.sweep_limit),
                  "layer": extracted.layer, "k": vectors.k, "selection": vectors.selection,
                  "backbone": adapter.backbone_id, "composite_modes": settings.composite_modes},
        not_run=not_run,
        warnings=constant_answer_warnings(shown_scores, described, adapter.tokenizer),
    )


def _sweep_entry(sweep: Sweep, scores: dict[str, Score], chosen_on: str = "val") -> dict:
    """A sweep's accuracies per split, and the point chosen on ``chosen_on`` (mfv: ``val``;
    the authors' protocol: ``test``) with the test accuracy there."""
    entry: dict = {"x": sweep.points}
    for split, conditions in sweep.conditions.items():
        points = [scores[c.name] for c in conditions]
        entry[split] = {"accuracy": [p.accuracy for p in points], "ci95": [list(p.ci95()) for p in points],
                        "n": points[0].n}
    if chosen_on in entry:
        best = max(range(len(sweep.points)), key=lambda i: (entry[chosen_on]["accuracy"][i], -i))
        entry["chosen_on"] = chosen_on
        entry["chosen"] = sweep.points[best]
        if "test" in entry:
            entry["test_at_chosen"] = {"accuracy": entry["test"]["accuracy"][best],
                                       "ci95": entry["test"]["ci95"][best], "n": entry["test"]["n"]}
    return entry


def _comparisons(scores: dict[str, Score], shots: int) -> dict[str, dict]:
    pairs = [("zero_shot_fv", "zero_shot"), ("zero_shot_fv_distributed", "zero_shot_fv"), ("zero_shot_finetuned_fv", f"icl_{shots}"),
             ("zero_shot_finetuned_fv", "zero_shot_fv"), ("novel_zero_shot_fv", "novel_zero_shot"),
             ("analogy_composite_normalized", "analogy_icl_1"), ("analogy_composite_normalized", "analogy_icl_4"),
             ("analogy_composite_normalized_one_shot", "analogy_icl_1")]
    return {f"{a} - {b}": paired_comparison(scores[a], scores[b]) for a, b in pairs if a in scores and b in scores}
