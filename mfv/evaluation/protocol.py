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

:func:`evaluate` reads as its steps: the conditions of each split, the sweeps, the analogy
conditions, a scoring pass for the composites' source weights, the composite conditions built
from them, one scoring pass over everything else (conditions over the same prompts share it),
the result. Conditions are data (:class:`~mfv.evaluation.conditions.Condition`); scores are
looked up by the condition objects that produced them. Scoring is
:func:`mfv.evaluation.engine.score_conditions` (in this process, or on every rank of a
Lightning ``Fabric``). Reports are written from the result by :mod:`mfv.evaluation.report`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mfv.data.episodes import Episode, EpisodeDataset, EpisodeList
from mfv.errors import ConfigError
from mfv.evaluation.conditions import (
    COMPOSITE_MODES,
    Condition,
    analogy_episodes,
    analogy_problems,
    composite_vectors,
    source_episodes,
)
from mfv.evaluation.engine import score_conditions
from mfv.evaluation.scoring import Score, paired_comparison
from mfv.method.extraction import Extraction, Selection
from mfv.method.function_vector import FunctionVectorSet
from mfv.models.base import BackboneAdapter
from mfv.steering import Steer

Scorer = Callable[[list[Condition]], dict[str, Score]]


@dataclass
class EvaluationSettings:
    """What to evaluate (the model, data and AIE sections of the config say on what).

    Attributes:
        limit: Prompts per condition (``None``: every prompt of the split).
        shots: ICL shot counts.
        max_k: The K sweep goes 1..max_k (capped at the number of heads).
        sweep_limit: Prompts per sweep point.
        analogies: Evaluate the analogy conditions (needs a ``composite`` split).
        composite_modes: Composite FV variants.
        batch_size: Prompts per batch (default: the datamodule's).
        reuse: Compute nothing twice and nothing that is thrown away: each distinct image
            encoded once across conditions, text attending only to the image it follows
            (no masked products, :meth:`BackboneAdapter.reuse_context`), and conditions over
            the same prompts sharing one prompt pass (each recomputes only the last position
            from its injection layer). ``false``: every condition from scratch.
    """

    limit: int | None = None
    shots: list[int] = field(default_factory=lambda: [1, 4, 8, 10])
    max_k: int = 50
    sweep_limit: int = 200
    analogies: bool = True
    composite_modes: list[str] = field(default_factory=lambda: list(COMPOSITE_MODES))
    batch_size: int | None = None
    reuse: bool = True

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the field and the allowed range."""
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit = {self.limit}: give a positive number of prompts per condition, "
                              f"or leave it unset for every prompt")
        if any(s < 0 for s in self.shots):
            raise ConfigError(f"evaluation.shots = {self.shots}: shot counts must be >= 0")
        for name in ("max_k", "sweep_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name} = {getattr(self, name)} must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"evaluation.batch_size = {self.batch_size} must be >= 1")
        unknown = sorted(set(self.composite_modes) - set(COMPOSITE_MODES))
        if unknown:
            raise ConfigError(f"evaluation.composite_modes: unknown {unknown}; valid: {sorted(COMPOSITE_MODES)}")


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
        }


@dataclass
class Vectors:
    """What the protocol injects.

    Attributes:
        extracted: The extracted FVs (at their layer).
        finetuned: Fine-tuned FVs, if any.
        spread: ``(relations, num_layers, hidden)``: each selected head's projected mean at its
            own layer (``zero_shot_fv_distributed``), if given.
        extraction: The cached means and AIE the FVs came from (K sweep, AIE summary), if given.
        k: Heads per extracted FV (with ``extraction``).
        selection: Head choice of the extracted FVs (with ``extraction``).
    """

    extracted: FunctionVectorSet
    finetuned: FunctionVectorSet | None = None
    spread: torch.Tensor | None = None
    extraction: Extraction | None = None
    k: int | None = None
    selection: Selection = "per_relation"

    @classmethod
    def from_extraction(cls, adapter: BackboneAdapter, extraction: Extraction, k: int, layer: int,
                        selection: Selection = "per_relation", finetuned: FunctionVectorSet | None = None
                        ) -> "Vectors":
        """Extracted FVs at ``layer`` from ``extraction``'s top-``k`` heads, their per-layer
        spread, and ``finetuned``."""
        spread = extraction.distributed_vectors(adapter, k, selection).permute(1, 0, 2)
        return cls(extraction.function_vectors(adapter, k, layer, selection), finetuned, spread, extraction, k,
                   selection)

    def check(self, adapter: BackboneAdapter, relations: Sequence[str]) -> None:
        """Raises :class:`ConfigError` for vectors of another backbone or missing relations."""
        for name, fvs in (("extracted", self.extracted), ("fine-tuned", self.finetuned)):
            if fvs is None:
                continue
            fvs.check_compatible(adapter)
            missing = [r for r in relations if r not in fvs.vectors]
            if missing:
                raise ConfigError(f"the {name} FV file has no vector for {missing}; it has {fvs.relations}")


class PromptSets:
    """One :class:`EpisodeDataset` per distinct set of prompts (split, mode, shots, length).

    Episode ``i`` of a split depends only on ``i``, mode and shots, so equal keys are equal
    prompts; handing out one object per key lets the engine score every condition over those
    prompts from one loader and one prompt pass (e.g. the layer and K sweeps of a split, and
    the test zero-shot conditions when ``--limit`` equals the sweep's prompt count).
    """

    def __init__(self, datamodule) -> None:
        self.datamodule = datamodule
        self._made: dict[tuple, EpisodeDataset] = {}

    def get(self, split: str, mode: str, shots: int | None, limit: int | None) -> EpisodeDataset:
        """The (shared) dataset of the first ``limit`` prompts of ``split`` (all for ``None``)."""
        sampler = self.datamodule.sampler(split)
        length = len(sampler) if limit is None else min(limit, len(sampler))
        key = (split, mode, shots, length)
        if key not in self._made:
            self._made[key] = EpisodeDataset(sampler, mode, shots, length)
        return self._made[key]


def fv_steer(fvs: FunctionVectorSet, relations: Sequence[str]) -> Steer:
    """An FV set as a relation-indexed :class:`Steer` (at its layer, or spread over layers)."""
    if fvs.distributed:
        return Steer.per_layer(fvs.stacked(relations), fvs.metadata.get("layers"))
    return Steer.at(fvs.layer, fvs.stacked(relations))


def split_conditions(datamodule, split: str, vectors: Vectors, settings: EvaluationSettings,
                     not_run: dict[str, str], prompts: PromptSets | None = None) -> list[Condition]:
    """Zero-shot (with and without FVs), ICL and shuffled-label conditions on one split;
    condition names of the ``novel`` split are prefixed ``novel_``. ``prompts``: datasets
    shared with the other steps (default: this split's own)."""
    prompts = prompts or PromptSets(datamodule)
    sampler = datamodule.sampler(split)
    relations = list(sampler.relations)
    prefix = "" if split == "test" else f"{split}_"

    def condition(name: str, dataset, steer: Steer | None, description: str) -> Condition:
        return Condition(f"{prefix}{name}", split, split, dataset, steer, description)

    zero = prompts.get(split, "zero_shot", 0, settings.limit)
    extracted = fv_steer(vectors.extracted, relations)
    conditions = [condition("zero_shot", zero, None, "zero-shot"),
                  condition("zero_shot_fv", zero, extracted, "zero-shot + extracted FV")]
    if vectors.spread is not None:
        conditions.append(condition("zero_shot_fv_distributed", zero, Steer.per_layer(vectors.spread),
                                    "zero-shot + extracted FV, distributed (each head at its layer)"))
    if vectors.finetuned is not None:
        kind = " (distributed)" if vectors.finetuned.distributed else ""
        conditions.append(condition("zero_shot_finetuned_fv", zero, fv_steer(vectors.finetuned, relations),
                                    f"zero-shot + fine-tuned FV{kind}"))
    for shots in settings.shots:
        # The sampler says how many demonstrations one prompt can hold (GQA: distinct images per relation).
        if 0 < shots <= sampler.max_shots():
            conditions.append(condition(f"icl_{shots}", prompts.get(split, "clean", shots, settings.limit),
                                        None, f"{shots}-shot ICL"))
        else:
            not_run[f"{prefix}icl_{shots}"] = (f"evaluation.shots has {shots}: a prompt of the {split} split can hold "
                                               f"1..{sampler.max_shots()} demonstrations")
    shots = datamodule.shots
    shuffled = prompts.get(split, "shuffled", shots, settings.limit)
    conditions += [condition(f"icl_shuffled_{shots}", shuffled, None, f"{shots}-shot ICL, shuffled labels"),
                   condition(f"icl_shuffled_{shots}_fv", shuffled, extracted, f"{shots}-shot shuffled + FV")]
    return conditions


@dataclass
class Sweep:
    """One parameter swept on zero-shot prompts: its points and their conditions per split."""

    name: str
    points: list[int]
    conditions: dict[str, list[Condition]]


def sweeps(adapter: BackboneAdapter, datamodule, vectors: Vectors, settings: EvaluationSettings,
           prompts: PromptSets | None = None) -> list[Sweep]:
    """The injection-layer and K sweeps on the validation split (where the choice is made)
    and on the test split (where it is reported). The K sweep needs ``vectors.extraction``.
    Both sweeps of a split run over one dataset (``prompts``: shared with the other steps)."""
    prompts = prompts or PromptSets(datamodule)
    limit = min(settings.limit or settings.sweep_limit, settings.sweep_limit)
    splits = [s for s in ("val", "test") if datamodule.has_split(s)]
    relations = list(vectors.extracted.relations)
    table = vectors.extracted.stacked(relations)
    layer = vectors.extracted.layer
    layer_points = list(range(adapter.num_layers))
    steers = {"layer": [Steer.at(x, table) for x in layer_points]}
    points = {"layer": layer_points}
    if vectors.extraction is not None:
        points["k"] = list(range(1, min(settings.max_k, adapter.num_layers * adapter.num_heads) + 1))
        steers["k"] = [Steer.at(layer, vectors.extraction.function_vectors(
            adapter, x, layer, vectors.selection).stacked(relations)) for x in points["k"]]
    out = []
    for name in points:
        per_split = {}
        for split in splits:
            zero = prompts.get(split, "zero_shot", 0, limit)
            per_split[split] = [Condition(f"sweep_{name}_{split}_{x}", "sweep", split, zero, steer,
                                          f"zero-shot + FV (layer {x})" if name == "layer"
                                          else f"zero-shot + FV (K {x}, layer {layer})")
                                for x, steer in zip(points[name], steers[name])]
        out.append(Sweep(name, points[name], per_split))
    return out


@dataclass
class Analogies:
    """The analogy problems of the composite split, their conditions and the source-weight conditions."""

    problems: list
    diagonal: list[str]
    zero_targets: EpisodeList
    one_shot: EpisodeList
    conditions: list[Condition]
    weights: dict[str, dict[str, Condition]]  # FV kind -> trained relation -> source-weight condition

    def composite_names(self, modes: Sequence[str]) -> list[str]:
        """Names of the composite conditions (built by :func:`composite_conditions`)."""
        return [f"analogy_composite_{'' if kind == 'extracted' else 'finetuned_'}{mode}{suffix}"
                for kind in self.weights for mode in modes for suffix in ("", "_one_shot")]


def analogies(datamodule, vectors: Vectors, settings: EvaluationSettings) -> Analogies | None:
    """ICL and single-FV conditions on the untrained diagonal relations, and the conditions
    giving each trained FV's weight in the composites (P(source answer | FV))."""
    if not (settings.analogies and datamodule.has_split("composite")):
        return None
    composite = datamodule.sampler("composite")
    diagonal = list(composite.relations)
    problems = analogy_problems(composite, min(settings.limit or len(composite), len(composite)))
    zero_targets = EpisodeList(analogy_episodes(problems, 0, composite), diagonal)
    one_shot = EpisodeList(analogy_episodes(problems, 1, composite), diagonal)
    sources = EpisodeList(source_episodes(problems), diagonal)
    conditions = [Condition(f"analogy_icl_{shots}", "analogy", "composite", dataset, None, f"{shots}-shot ICL")
                  for shots, dataset in ((0, zero_targets), (1, one_shot),
                                         (4, EpisodeList(analogy_episodes(problems, 4, composite), diagonal)))]
    extracted = vectors.extracted
    conditions += [Condition(f"analogy_fv_{r}", "analogy", "composite", zero_targets,
                             Steer.at(extracted.layer, extracted.vectors[r], "all"), f"FV of {r}")
                   for r in extracted.relations]
    weights = {"extracted": {r: Condition(f"weights_extracted_{r}", "weights", "composite", sources,
                                          Steer.at(extracted.layer, extracted.vectors[r], "all"),
                                          f"source answer under the extracted FV of {r}")
                             for r in extracted.relations}}
    finetuned = vectors.finetuned
    if finetuned is not None and not finetuned.distributed:  # composites combine single-layer FVs
        weights["finetuned"] = {r: Condition(f"weights_finetuned_{r}", "weights", "composite", sources,
                                             Steer.at(finetuned.layer, finetuned.vectors[r], "all"),
                                             f"source answer under the fine-tuned FV of {r}")
                                for r in extracted.relations}
    return Analogies(problems, diagonal, zero_targets, one_shot, conditions, weights)


def composite_conditions(found: Analogies, vectors: Vectors, scores: dict[str, Score],
                         modes: Sequence[str]) -> tuple[list[Condition], dict[str, dict[str, float]]]:
    """Composite FVs per problem from the scored source weights, injected into the
    zero-shot target and into the one-shot analogy prompt; and the mean normalised weights of
    the extracted FVs per diagonal relation."""
    relations = list(vectors.extracted.relations)
    conditions, mean_weights = [], {}
    for kind, by_relation in found.weights.items():
        fvs = vectors.extracted if kind == "extracted" else vectors.finetuned
        tag = "" if kind == "extracted" else "finetuned_"
        probabilities = torch.stack([torch.from_numpy(scores[by_relation[r].name].probability) for r in relations], 1)
        for mode in modes:
            composite = composite_vectors(probabilities, fvs.stacked(relations), mode)
            for dataset, suffix, where in ((found.zero_targets, "", "zero-shot target"),
                                           (found.one_shot, "_one_shot", "one-shot analogy prompt")):
                conditions.append(Condition(f"analogy_composite_{tag}{mode}{suffix}", "analogy", "composite", dataset,
                                            Steer.at(fvs.layer, composite, "row"),
                                            f"composite {kind} FV ({mode}) in the {where}"))
        if kind == "extracted":
            normalised = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-12)
            for d in found.diagonal:
                rows = [i for i, p in enumerate(found.problems) if p.relation == d]
                if rows:
                    mean_weights[d] = dict(zip(relations, normalised[rows].mean(0).tolist()))
    return conditions, mean_weights


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
    prompts = PromptSets(datamodule)
    conditions = split_conditions(datamodule, "test", vectors, settings, not_run, prompts)
    if datamodule.has_split("novel"):
        conditions += split_conditions(datamodule, "novel", vectors, settings, not_run, prompts)
    swept = sweeps(adapter, datamodule, vectors, settings, prompts)
    conditions += [c for sweep in swept for split in sweep.conditions.values() for c in split]
    found = analogies(datamodule, vectors, settings)
    later = found.composite_names(settings.composite_modes) if found is not None else []
    if found is not None:
        conditions += found.conditions + [c for by in found.weights.values() for c in by.values()]
    wanted = _matcher(only, [c.name for c in conditions] + later)
    # The composites' weights are scored first: run them whenever a composite is wanted.
    weights_wanted = any(wanted(name) for name in later)
    conditions = [c for c in conditions if wanted(c.name) or (c.group == "weights" and weights_wanted)]
    composites = found if found is not None and weights_wanted else None
    conditions, scores, mean_weights = _score(scorer, conditions, composites, vectors, settings, wanted)
    swept = [sweep for sweep in swept if all(c.name in scores for cs in sweep.conditions.values() for c in cs)]
    return _result(adapter, datamodule, vectors, settings, conditions, scores, swept, mean_weights, not_run)


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
    return EvaluationResult(
        scores=shown_scores,
        conditions={c.name: c.metadata() for c in shown},
        sweeps={sweep.name: _sweep_entry(sweep, scores) for sweep in swept},
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
    )


def _sweep_entry(sweep: Sweep, scores: dict[str, Score]) -> dict:
    entry: dict = {"x": sweep.points}
    for split, conditions in sweep.conditions.items():
        points = [scores[c.name] for c in conditions]
        entry[split] = {"accuracy": [p.accuracy for p in points], "ci95": [list(p.ci95()) for p in points],
                        "n": points[0].n}
    if "val" in entry:
        best = max(range(len(sweep.points)), key=lambda i: (entry["val"]["accuracy"][i], -i))
        entry["chosen_on"] = "val"
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
