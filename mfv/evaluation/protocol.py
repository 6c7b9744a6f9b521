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

Every condition runs as the module's Lightning test loop (same devices and strategy as
training). Reports are written from the result by :mod:`mfv.evaluation.report`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from mfv.data.episodes import EpisodeDataset, EpisodeList
from mfv.errors import ConfigError
from mfv.evaluation.conditions import (
    COMPOSITE_MODES,
    Condition,
    analogy_episodes,
    analogy_problems,
    composite_vectors,
    source_episodes,
)
from mfv.evaluation.scoring import Score, paired_comparison
from mfv.method.extraction import Extraction, Selection
from mfv.method.function_vector import FunctionVectorSet


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
        }


def run_conditions(trainer: L.Trainer, module, conditions: Sequence[Condition], batch_size: int,
                   num_workers: int = 0, reuse: bool = True) -> dict[str, Score]:
    """Runs ``conditions`` as the module's test loop and returns their scores by name."""
    if not conditions:
        return {}
    module.conditions = list(conditions)
    module.reuse = reuse  # the same images and prompts recur across conditions: compute each once
    module.eval_loader_options = {"batch_size": batch_size, "num_workers": num_workers}
    with tempfile.TemporaryDirectory(prefix="mfv-eval-") as tmp:
        module.outcome_file = str(Path(tmp) / "scores.pt")
        try:
            trainer.test(module, verbose=False)
            saved = torch.load(module.outcome_file, weights_only=True)
        finally:
            module.conditions, module.outcome_file, module.reuse = None, None, False
    return {c.name: Score.from_tensors(c.dataset.relations, *saved[i]) for i, c in enumerate(conditions)}


def _split_conditions(datamodule, split: str, prefix: str, extracted: torch.Tensor, layer: int,
                      finetuned: FunctionVectorSet | None, settings: EvaluationSettings,
                      distributed: torch.Tensor) -> list[Condition]:
    sampler = datamodule.sampler(split)
    relations = list(sampler.relations)

    def data(mode: str, shots: int | None = None) -> EpisodeDataset:
        return EpisodeDataset(sampler, mode, shots, settings.limit)

    zero = data("zero_shot", 0)
    conditions = [
        Condition(f"{prefix}zero_shot", split, split, zero, description="zero-shot"),
        Condition(f"{prefix}zero_shot_fv", split, split, zero, extracted, "relation", layer,
                  "zero-shot + extracted FV"),
        Condition(f"{prefix}zero_shot_fv_distributed", split, split, zero, distributed, "distributed", None,
                  "zero-shot + extracted FV, distributed (each head at its layer)"),
    ]
    if finetuned is not None and finetuned.distributed:
        conditions.append(Condition(f"{prefix}zero_shot_finetuned_fv", split, split, zero,
                                    finetuned.stacked(relations).permute(1, 0, 2), "distributed", None,
                                    "zero-shot + fine-tuned FV (distributed)"))
    elif finetuned is not None:
        conditions.append(Condition(f"{prefix}zero_shot_finetuned_fv", split, split, zero,
                                    finetuned.stacked(relations), "relation", finetuned.layer,
                                    "zero-shot + fine-tuned FV"))
    for shots in settings.shots:
        if 0 < shots < len(sampler.demo_pool):
            conditions.append(Condition(f"{prefix}icl_{shots}", split, split, data("clean", shots),
                                        description=f"{shots}-shot ICL"))
    shuffled = data("shuffled", datamodule.shots)
    conditions += [
        Condition(f"{prefix}icl_shuffled_{datamodule.shots}", split, split, shuffled,
                  description=f"{datamodule.shots}-shot ICL, shuffled labels"),
        Condition(f"{prefix}icl_shuffled_{datamodule.shots}_fv", split, split, shuffled, extracted, "relation",
                  layer, f"{datamodule.shots}-shot shuffled + FV"),
    ]
    return conditions


def evaluate(
    trainer: L.Trainer,
    module,
    datamodule,
    extraction: Extraction,
    settings: EvaluationSettings,
    k: int,
    selection: Selection = "per_relation",
    finetuned: FunctionVectorSet | None = None,
) -> EvaluationResult:
    """Evaluates every condition of the protocol (see module docstring).

    Args:
        trainer: Runs the test loops (its devices and strategy are used).
        module: A :class:`~mfv.training.module.FunctionVectorModule` (the backbone, its layer).
        datamodule: A relation DataModule attached to the module's backbone.
        extraction: Cached means and AIE of the eval split.
        settings: What to evaluate.
        k, selection: Head choice of the extracted FVs.
        finetuned: Fine-tuned FVs (validated against the backbone), if any.
    """
    settings.validate()
    adapter, layer = module.adapter, module.layer
    relations = list(module.relations)
    if finetuned is not None:
        finetuned.check_compatible(adapter)
        missing = [r for r in relations if r not in finetuned.vectors]
        if missing:
            raise ConfigError(f"the fine-tuned FV file has no vector for {missing}; it has {finetuned.relations}")
    extracted_set = extraction.function_vectors(adapter, k, layer, selection)
    extracted = extracted_set.stacked(relations)
    batch_size = settings.batch_size or datamodule.batch_size
    meta: dict[str, dict] = {}

    distributed = extraction.distributed_vectors(adapter, k, selection)
    conditions = _split_conditions(datamodule, "test", "", extracted, layer, finetuned, settings, distributed)
    if datamodule.has_split("novel"):
        conditions += _split_conditions(datamodule, "novel", "novel_", extracted, layer, finetuned, settings,
                                        distributed)

    # Sweeps: chosen on validation, reported on test.
    sweep_limit = min(settings.limit or settings.sweep_limit, settings.sweep_limit)
    max_k = min(settings.max_k, adapter.num_layers * adapter.num_heads)
    sweep_splits = [s for s in ("val", "test") if datamodule.has_split(s)]
    for split in sweep_splits:
        zero = EpisodeDataset(datamodule.sampler(split), "zero_shot", 0, sweep_limit)
        for sweep_layer in range(adapter.num_layers):
            conditions.append(Condition(f"sweep_layer_{split}_{sweep_layer}", "sweep", split, zero, extracted,
                                        "relation", sweep_layer, f"layer {sweep_layer}"))
        for sweep_k in range(1, max_k + 1):
            vectors = extraction.function_vectors(adapter, sweep_k, layer, selection).stacked(relations)
            conditions.append(Condition(f"sweep_k_{split}_{sweep_k}", "sweep", split, zero, vectors, "relation",
                                        layer, f"K {sweep_k}"))

    problems, composite = [], None
    if settings.analogies and datamodule.has_split("composite"):
        composite = datamodule.sampler("composite")
        diagonal = list(composite.relations)
        problems = analogy_problems(composite, min(settings.limit or len(composite), len(composite)))
        for shots in (0, 1, 4):
            conditions.append(Condition(f"analogy_icl_{shots}", "analogy", "composite",
                                        EpisodeList(analogy_episodes(problems, shots, composite), diagonal),
                                        description=f"{shots}-shot ICL"))
        zero_targets = EpisodeList(analogy_episodes(problems, 0, composite), diagonal)
        sources = EpisodeList(source_episodes(problems), diagonal)
        for r, relation in enumerate(relations):
            conditions.append(Condition(f"analogy_fv_{relation}", "analogy", "composite", zero_targets,
                                        extracted[r], "all", layer, f"FV of {relation}"))
            conditions.append(Condition(f"weights_extracted_{relation}", "weights", "composite", sources,
                                        extracted[r], "all", layer))
            if finetuned is not None and not finetuned.distributed:
                conditions.append(Condition(f"weights_finetuned_{relation}", "weights", "composite", sources,
                                            finetuned.vectors[relation], "all", finetuned.layer))

    scores = run_conditions(trainer, module, conditions, batch_size, datamodule.num_workers,
                            settings.reuse)
    for c in conditions:
        meta[c.name] = {"split": c.split, "group": c.group, "description": c.description,
                        **({"layer": c.layer} if c.vectors is not None else {})}

    analogy_weights: dict[str, dict[str, float]] = {}
    if problems:
        phase_two = []
        one_shot = EpisodeList(analogy_episodes(problems, 1, composite), diagonal)
        sets = [("", extracted, layer, "extracted")]
        if finetuned is not None and not finetuned.distributed:  # composites combine single-layer FVs
            sets.append(("finetuned_", finetuned.stacked(relations), finetuned.layer, "finetuned"))
        for tag, trained, inject_layer, kind in sets:
            probabilities = torch.stack([torch.from_numpy(scores[f"weights_{kind}_{r}"].probability)
                                         for r in relations], dim=1)
            for mode in settings.composite_modes:
                vectors = composite_vectors(probabilities, trained, mode)
                for dataset, suffix, where in ((zero_targets, "", "zero-shot target"),
                                               (one_shot, "_one_shot", "one-shot analogy prompt")):
                    phase_two.append(Condition(f"analogy_composite_{tag}{mode}{suffix}", "analogy", "composite",
                                               dataset, vectors, "row", inject_layer,
                                               f"composite {kind} FV ({mode}) in the {where}"))
            if kind == "extracted":
                normalised = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-12)
                for d in diagonal:
                    rows = [i for i, p in enumerate(problems) if p.relation == d]
                    if rows:
                        analogy_weights[d] = dict(zip(relations, normalised[rows].mean(0).tolist()))
        scores.update(run_conditions(trainer, module, phase_two, batch_size, datamodule.num_workers,
                                     settings.reuse))
        for c in phase_two:
            meta[c.name] = {"split": c.split, "group": c.group, "description": c.description, "layer": c.layer}

    sweeps = _sweeps(scores, sweep_splits, adapter.num_layers, max_k)
    shown = {n: s for n, s in scores.items() if meta[n]["group"] not in ("sweep", "weights")}
    return EvaluationResult(
        scores=shown,
        conditions={n: meta[n] for n in shown},
        sweeps=sweeps,
        comparisons=_comparisons(shown, datamodule.shots),
        analogy_weights=analogy_weights,
        extraction=extraction.summary(k, selection),
        injected={"extracted": {"layer": layer, "k": k, "selection": selection,
                                "heads": {r: [list(h) for h in hs] for r, hs in extracted_set.heads.items()}},
                  "finetuned": None if finetuned is None else {
                      "layer": finetuned.layer, "heads": {r: [list(h) for h in hs] for r, hs in finetuned.heads.items()},
                      "metadata": finetuned.metadata}},
        settings={"limit": settings.limit, "shots": settings.shots, "max_k": max_k, "sweep_limit": sweep_limit,
                  "layer": layer, "k": k, "selection": selection, "backbone": adapter.backbone_id,
                  "composite_modes": settings.composite_modes},
    )


def _sweeps(scores: dict[str, Score], splits: list[str], num_layers: int, max_k: int) -> dict[str, dict]:
    out = {}
    for name, xs in (("layer", list(range(num_layers))), ("k", list(range(1, max_k + 1)))):
        entry: dict = {"x": xs}
        for split in splits:
            points = [scores[f"sweep_{name}_{split}_{x}"] for x in xs]
            entry[split] = {"accuracy": [p.accuracy for p in points], "ci95": [list(p.ci95()) for p in points],
                            "n": points[0].n}
        if "val" in splits:
            best = max(range(len(xs)), key=lambda i: (entry["val"]["accuracy"][i], -i))
            entry["chosen_on"] = "val"
            entry["chosen"] = xs[best]
            if "test" in splits:
                entry["test_at_chosen"] = {"accuracy": entry["test"]["accuracy"][best],
                                           "ci95": entry["test"]["ci95"][best], "n": entry["test"]["n"]}
        out[name] = entry
    return out


def _comparisons(scores: dict[str, Score], shots: int) -> dict[str, dict]:
    pairs = [("zero_shot_fv", "zero_shot"), ("zero_shot_fv_distributed", "zero_shot_fv"), ("zero_shot_finetuned_fv", f"icl_{shots}"),
             ("zero_shot_finetuned_fv", "zero_shot_fv"), ("novel_zero_shot_fv", "novel_zero_shot"),
             ("analogy_composite_normalized", "analogy_icl_1"), ("analogy_composite_normalized", "analogy_icl_4"),
             ("analogy_composite_normalized_one_shot", "analogy_icl_1")]
    return {f"{a} - {b}": paired_comparison(scores[a], scores[b]) for a, b in pairs if a in scores and b in scores}
