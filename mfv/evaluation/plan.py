"""The conditions an evaluation runs, built from the data, the FVs and the settings: each
split's zero-shot, FV and ICL conditions, the layer and K sweeps, the analogy conditions and
the composite FVs built from their source weights. Datasets over the same prompts are shared
(:class:`PromptSets`), so that the engine scores them from one prompt pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from mfv.data.episodes import EpisodeDataset, EpisodeList
from mfv.evaluation.authors import IndexedEpisodes
from mfv.evaluation.conditions import (
    AffineFit,
    Condition,
    analogy_episodes,
    analogy_problems,
    composite_vectors,
    source_episodes,
)
from mfv.evaluation.scoring import Score
from mfv.evaluation.settings import EvaluationSettings, Vectors
from mfv.method.function_vector import FunctionVectorSet
from mfv.models.base import BackboneAdapter
from mfv.steering import Steer


class PromptSets:
    """One :class:`EpisodeDataset` per distinct set of prompts (split, mode, shots, length).

    Episode ``i`` of a split depends only on ``i``, mode and shots, so equal keys are equal
    prompts; handing out one object per key lets the engine score every condition over those
    prompts from one loader and one prompt pass (e.g. the layer and K sweeps of a split, and
    the test zero-shot conditions when ``--limit`` equals the sweep's prompt count).

    Args:
        datamodule: Where the splits come from.
        keep: Per split, the query indices scored (the authors' filter,
            :func:`mfv.evaluation.authors.authors_filter`): the first ``limit`` prompts of
            such a split are those of its first ``limit`` that are kept.
    """

    def __init__(self, datamodule, keep: dict[str, Sequence[int]] | None = None) -> None:
        self.datamodule = datamodule
        self.keep = {split: sorted(rows) for split, rows in (keep or {}).items()}
        self._made: dict[tuple, EpisodeDataset | IndexedEpisodes] = {}

    def get(self, split: str, mode: str, shots: int | None, limit: int | None) -> EpisodeDataset | IndexedEpisodes:
        """The (shared) dataset of the first ``limit`` prompts of ``split`` (all for ``None``)."""
        sampler = self.datamodule.sampler(split)
        length = len(sampler) if limit is None else min(limit, len(sampler))
        key = (split, mode, shots, length)
        if key not in self._made:
            self._made[key] = (EpisodeDataset(sampler, mode, shots, length) if split not in self.keep else
                               IndexedEpisodes(sampler, mode, shots, [i for i in self.keep[split] if i < length]))
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
    # FV kind -> trained relation -> P(answer | FV) on the fitting prompts of ``softmax_affine``
    fit: dict[str, dict[str, Condition]] = field(default_factory=dict)
    fits: dict[str, AffineFit] = field(default_factory=dict)  # FV kind -> its fitted map (once scored)

    def weight_conditions(self) -> list[Condition]:
        """Every condition scored before the composites are built (sources and fitting prompts)."""
        return [c for table in (self.weights, self.fit) for by in table.values() for c in by.values()]

    def composite_names(self, modes: Sequence[str]) -> list[str]:
        """Names of the composite conditions (built by :func:`composite_conditions`)."""
        return [f"analogy_composite_{'' if kind == 'extracted' else 'finetuned_'}{mode}{suffix}"
                for kind in self.weights for mode in modes for suffix in ("", "_one_shot")]


def analogies(datamodule, vectors: Vectors, settings: EvaluationSettings,
              prompts: PromptSets | None = None) -> Analogies | None:
    """ICL and single-FV conditions on the untrained diagonal relations, the conditions
    giving each trained FV's weight in the composites (P(source answer | FV)) and, for the
    ``softmax_affine`` composite, P(answer | FV) on the validation split's zero-shot prompts
    (the sweep's prompts, shared through ``prompts``; the train split's for a data module
    without a validation split) that its affine map is fitted on."""
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
    fit = {}
    if "softmax_affine" in settings.composite_modes:
        split = "val" if datamodule.has_split("val") else "train"
        prompts = prompts or PromptSets(datamodule)
        zero = prompts.get(split, "zero_shot", 0, min(settings.limit or settings.sweep_limit, settings.sweep_limit))
        for kind, by_relation in weights.items():
            fit[kind] = {r: Condition(f"fit_{kind}_{r}", "weights", split, zero, c.steer,
                                      f"{split} answers under the {kind} FV of {r} (softmax_affine fit)")
                         for r, c in by_relation.items()}
    return Analogies(problems, diagonal, zero_targets, one_shot, conditions, weights, fit)


def composite_conditions(found: Analogies, vectors: Vectors, scores: dict[str, Score],
                         modes: Sequence[str]) -> tuple[list[Condition], dict[str, dict[str, float]]]:
    """Composite FVs per problem from the scored source weights, injected into the
    zero-shot target and into the one-shot analogy prompt; and the mean normalised weights of
    the extracted FVs per diagonal relation. The ``softmax_affine`` maps are fitted here
    (:class:`AffineFit`, kept in ``found.fits``)."""
    relations = list(vectors.extracted.relations)
    conditions, mean_weights = [], {}
    for kind, by_relation in found.weights.items():
        fvs = vectors.extracted if kind == "extracted" else vectors.finetuned
        tag = "" if kind == "extracted" else "finetuned_"
        probabilities = _probabilities(scores, by_relation, relations)
        if kind in found.fit:
            fitted = scores[found.fit[kind][relations[0]].name]
            ids = torch.tensor([relations.index(fitted.relations[i]) for i in fitted.relation], dtype=torch.long)
            found.fits[kind] = AffineFit.fit(_probabilities(scores, found.fit[kind], relations), ids,
                                             fvs.stacked(relations), found.fit[kind][relations[0]].split)
        for mode in modes:
            if mode == "softmax_affine" and kind not in found.fits:
                continue
            composite = composite_vectors(probabilities, fvs.stacked(relations), mode, found.fits.get(kind))
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


def _probabilities(scores: dict[str, Score], by_relation: dict[str, Condition], relations: list[str]) -> torch.Tensor:
    """``(prompts, relations)``: each prompt's answer probability under each relation's FV."""
    return torch.stack([torch.from_numpy(scores[by_relation[r].name].probability) for r in relations], 1)
