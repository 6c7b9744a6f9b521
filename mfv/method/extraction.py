"""The extraction pipeline, staged: means -> AIE (cached) -> heads, K, layer, FVs (derived).

Stage 1 (expensive, cached): mean head activations over clean prompts and indirect
effects over corrupted prompts. Their cache key holds only what they depend on: the
backbone and its weights, the data fingerprint (owned by the DataModule), relations,
shots, prompt counts, seed and algorithm. Work is split into chunks of prompts; each
finished chunk is written atomically under a unique temporary name, so an interrupted
run resumes from its last saved chunk, two concurrent runs never clobber each other, and
a chunk that cannot be read (truncated by a full disk, say) is reported and recomputed.
With several ranks (a torch process-group world), each rank takes every
``world_size``-th chunk and the sums are added over ranks, so the result does not depend
on the number of ranks.

Stage 2 (cheap, never cached): head choice (K, pooled or per relation) and FVs at any
layer come from the cached tensors (:meth:`Extraction.function_vectors`), so a K or layer
sweep never reruns AIE.

The ``aie:`` section of a config is one :class:`~mfv.method.settings.AIESettings` (its
defaults are the paper's; defined in :mod:`mfv.method.settings`, importable from here);
:func:`extract_from_datamodule` runs stage 1 on a DataModule's ``eval`` split.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import distributed as world

from mfv.console import progress as tqdm  # plain lines in a log
from mfv.data.episodes import EncodedBatch, EpisodeSampler, encode_episodes
from mfv.errors import ConfigError
from mfv.io import atomic_torch_save, atomic_write_text
from mfv.method.aie import accumulate_means, finalize_means, indirect_effects, positive_mass_share, top_heads
from mfv.method.function_vector import FunctionVectorSet, build_function_vector
from mfv.method.settings import (DEFAULT_K, DEFAULT_SELECTION, AIESettings, ExtractionSettings, Selection,
                                 validate_head_choice)
from mfv.models.base import BackboneAdapter

CACHE_FORMAT = 2
__all__ = ["DEFAULT_K", "DEFAULT_SELECTION", "AIESettings", "Extraction", "ExtractionSettings", "Selection", "cache_key", "extract",
           "extract_from_datamodule", "validate_extraction", "validate_head_choice", "weights_fingerprint"]


@dataclass
class Extraction:
    """Cached stage-1 tensors of one extraction, and what derives from them.

    Attributes:
        relations: Relation order of every tensor's first axis.
        means: ``(relations, layers, heads, head_dim)`` mean activations.
        aie_per_relation: ``(relations, layers, heads)``.
        aie_pooled: ``(layers, heads)``, over all AIE prompts.
        kept, seen: clean prompts averaged / seen per relation.
        fallback: relations with no correct clean prompt (averaged over all of theirs).
        aie_prompts: corrupted prompts averaged per relation.
        aie_fallback: relations whose AIE is over all prompts (none was clean-correct).
        data_fingerprint: The DataModule's fingerprint of the eval split.
        cache_dir: Where the tensors live.
    """

    relations: list[str]
    means: torch.Tensor
    aie_per_relation: torch.Tensor
    aie_pooled: torch.Tensor
    kept: list[int]
    seen: list[int]
    fallback: list[str]
    aie_prompts: list[int]
    aie_fallback: list[str]
    data_fingerprint: str
    cache_dir: Path

    def aie(self, relation: str | None = None) -> torch.Tensor:
        """Pooled AIE, or one relation's."""
        return self.aie_pooled if relation is None else self.aie_per_relation[self.relations.index(relation)]

    def heads(self, k: int, selection: Selection = "per_relation") -> dict[str, list[tuple[int, int]]]:
        """Top-``k`` heads per relation: from its own AIE (``per_relation``, the authors')
        or one set from the pooled AIE (``pooled``).

        Raises:
            ConfigError: per-relation selection for a relation that got no AIE prompt (its
                heads would be the first ``k`` in index order).
        """
        if selection == "per_relation":
            empty = [r for r, n in zip(self.relations, self.aie_prompts) if n == 0]
            if empty:
                raise ConfigError(f"no AIE prompt of relation(s) {empty}: their per-relation heads would be arbitrary; "
                                  f"raise aie.num_aie_prompts or use aie.selection pooled")
        return {r: top_heads(self.aie_pooled if selection == "pooled" else self.aie_per_relation[i], k)
                for i, r in enumerate(self.relations)}

    def function_vectors(
        self, adapter: BackboneAdapter, k: int, layer: int, selection: Selection = "per_relation"
    ) -> FunctionVectorSet:
        """The FVs of the top-``k`` heads, to be injected after ``layer``."""
        validate_head_choice(k, selection, adapter)
        if not 0 <= layer < adapter.num_layers:
            raise ConfigError(f"model.layer = {layer} is out of range; valid layers: 0..{adapter.num_layers - 1}")
        heads = self.heads(k, selection)
        vectors = {r: build_function_vector(adapter, self.means[i], heads[r]) for i, r in enumerate(self.relations)}
        return FunctionVectorSet(
            vectors=vectors, layer=layer, heads=heads, backbone_id=adapter.backbone_id,
            shape=adapter.shape_signature(),
            metadata={"kind": "extracted", "k": k, "selection": selection,
                      "prompts_kept": dict(zip(self.relations, self.kept)),
                      "prompts_seen": dict(zip(self.relations, self.seen)),
                      "fallback_relations": self.fallback,
                      "aie_prompts": dict(zip(self.relations, self.aie_prompts)),
                      "data_fingerprint": self.data_fingerprint},
        )

    def distributed_vectors(self, adapter: BackboneAdapter, k: int, selection: Selection = "per_relation") -> torch.Tensor:
        """Each selected head's projected mean output at its own layer (distributed steering).

        Returns:
            ``(layers, relations, hidden)``: row ``l`` is added after layer ``l``; summed over
            layers it equals the single-layer FV.
        """
        validate_head_choice(k, selection, adapter)
        heads = self.heads(k, selection)
        out = torch.zeros(adapter.num_layers, len(self.relations), adapter.hidden_size)
        for r, relation in enumerate(self.relations):
            for layer in sorted({l for l, _ in heads[relation]}):
                out[layer, r] = build_function_vector(adapter, self.means[r], [h for h in heads[relation] if h[0] == layer])
        return out

    def summary(self, k: int, selection: Selection = "per_relation") -> dict:
        """JSON-ready facts: heads, prompt counts, sparsity of the positive AIE."""
        positive = self.aie_pooled.clamp(min=0).flatten().sort(descending=True).values
        total = float(positive.sum())
        half = int((positive.cumsum(0) < 0.5 * total).sum()) + 1 if total > 0 else 0
        return {
            "relations": self.relations,
            "k": k,
            "selection": selection,
            "heads": {r: [list(h) for h in hs] for r, hs in self.heads(k, selection).items()},
            "prompts_kept": dict(zip(self.relations, self.kept)),
            "prompts_seen": dict(zip(self.relations, self.seen)),
            "aie_prompts": dict(zip(self.relations, self.aie_prompts)),
            "aie_fallback": self.aie_fallback,
            "top10_positive_aie_share": positive_mass_share(self.aie_pooled, 10),
            "lm_heads": self.aie_pooled.numel(),
            "heads_for_half_positive_aie": half,
            "heads_for_half_positive_aie_share": half / self.aie_pooled.numel(),
            "max_aie": float(self.aie_pooled.max()),
            "cache_dir": str(self.cache_dir),
        }


def weights_fingerprint(adapter: BackboneAdapter) -> str:
    """A cheap fingerprint of the backbone's weights (two output projections, hashed)."""
    h = hashlib.sha256()
    for layer in (0, adapter.num_layers - 1):
        h.update(adapter.output_projection(layer).detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(adapter: BackboneAdapter, settings: ExtractionSettings, data_fingerprint: str) -> str:
    """The key of stage 1: backbone, weights, data and the settings the tensors depend on."""
    depends = {k: v for k, v in asdict(settings).items() if k != "batch_size"}
    payload = {
        "format": CACHE_FORMAT,
        "backbone": adapter.backbone_id,
        "shape": adapter.shape_signature(),
        "weights": weights_fingerprint(adapter),
        "data": data_fingerprint,
        "settings": depends,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _load_or_none(path: Path) -> object | None:
    """Loads a cache file; a corrupt one is reported, removed and treated as missing."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # truncated or garbled: recompute rather than crash every later run
        warnings.warn(f"cache file {path} is unreadable ({type(exc).__name__}: {exc}); recomputing it", stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def _world_active() -> bool:
    return world.is_available() and world.is_initialized()


def _rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of ranks (``0, 1`` without a process group)."""
    if _world_active():
        return world.get_rank(), world.get_world_size()
    return 0, 1


def _sum_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not _world_active():
        return tensors
    out = []
    for tensor in tensors:
        reduced = tensor.clone()
        world.all_reduce(reduced)
        out.append(reduced)
    return out


def _chunked(
    name: str, folder: Path, num_prompts: int, batch_size: int,
    compute: Callable[[range], list[torch.Tensor]], progress: bool,
) -> list[torch.Tensor]:
    """Runs ``compute`` over this rank's chunks (skipping saved ones) and sums the results."""
    rank, world_size = _rank_and_world_size()
    chunks = [range(s, min(s + batch_size, num_prompts)) for s in range(0, num_prompts, batch_size)]
    mine = [c for i, c in enumerate(chunks) if i % world_size == rank]
    totals: list[torch.Tensor] | None = None
    for indices in tqdm(mine, desc=name, disable=not progress or rank != 0, unit="chunk"):
        # Named by prompt range: a different chunk size never reads a wrong chunk.
        path = folder / f"{name}_{indices.start:07d}-{indices.stop:07d}.pt"
        parts = _load_or_none(path)
        if parts is None:
            parts = compute(indices)
            atomic_torch_save(parts, path)
        totals = parts if totals is None else [a + b for a, b in zip(totals, parts)]
    if totals is None:  # more ranks than chunks
        totals = [torch.zeros_like(t) for t in compute(range(0))]
    return _sum_over_ranks(totals)


def _episodes(adapter: BackboneAdapter, sampler: EpisodeSampler, settings: ExtractionSettings, indices: range,
              mode: str) -> EncodedBatch:
    """The encoded ``mode`` episodes of ``indices``."""
    return encode_episodes(adapter, [sampler.draw(i, mode, settings.shots) for i in indices],
                           list(settings.relations))


def _mean_chunk(adapter: BackboneAdapter, sampler: EpisodeSampler, settings: ExtractionSettings,
                indices: range) -> list[torch.Tensor]:
    """Sums of head activations over one chunk of clean prompts (see :func:`accumulate_means`)."""
    batches = [_episodes(adapter, sampler, settings, indices, "clean")] if len(indices) else []
    return list(accumulate_means(adapter, batches, len(settings.relations), progress=False))


def _aie_chunk(adapter: BackboneAdapter, sampler: EpisodeSampler, settings: ExtractionSettings, means: torch.Tensor,
               indices: range) -> list[torch.Tensor]:
    """IE sums and prompt counts of one chunk of corrupted prompts, per relation.

    Returns ``[total, count, total_all, count_all]``: over the prompts ``aie_filter`` keeps,
    and over all of them (the fallback of a relation with none kept).
    """
    num_relations = len(settings.relations)
    shape = (num_relations, adapter.num_layers, adapter.num_heads)
    total, total_all = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    count, count_all = torch.zeros(num_relations, dtype=torch.long), torch.zeros(num_relations, dtype=torch.long)
    if len(indices):
        batch = _episodes(adapter, sampler, settings, indices, "corrupted")
        effects = indirect_effects(adapter, batch, means, settings.algorithm).double()
        relation = batch.relation_ids.cpu()
        if settings.aie_filter == "clean_correct":
            # The clean episode of the same index has the same query and demonstration images.
            clean = _episodes(adapter, sampler, settings, indices, "clean")
            with torch.no_grad():
                keep = (adapter.forward(clean.prompts).argmax(-1).cpu() == clean.answer_ids).long()
        else:
            keep = torch.ones(len(batch), dtype=torch.long)
        total.index_add_(0, relation, effects * keep[:, None, None])
        count.index_add_(0, relation, keep)
        total_all.index_add_(0, relation, effects)
        count_all.index_add_(0, relation, torch.ones(len(batch), dtype=torch.long))
    return [total, count, total_all, count_all]


def _average_effects(settings: ExtractionSettings, total: torch.Tensor, count: torch.Tensor, total_all: torch.Tensor,
                     count_all: torch.Tensor) -> dict:
    """Per-relation and pooled AIE from the summed chunks; a relation with no kept prompt
    falls back to all its prompts (warned about under ``clean_correct``)."""
    relations = list(settings.relations)
    aie_fallback = [r for r in range(len(relations)) if count[r] == 0]
    for r in aie_fallback:
        total[r], count[r] = total_all[r], count_all[r]
    if aie_fallback and settings.aie_filter == "clean_correct":
        warnings.warn(f"no clean-correct AIE prompt for {[relations[r] for r in aie_fallback]}: their AIE is "
                      f"averaged over all {count_all[aie_fallback].tolist()} corrupted prompts", stacklevel=4)
    return {
        "per_relation": (total / count.clamp(min=1)[:, None, None]).float(),
        "pooled": (total.sum(0) / count.sum().clamp(min=1)).float(),
        "aie_prompts": count.tolist(),
        "aie_fallback": [relations[r] for r in aie_fallback],
    }


def _compute_stage_one(adapter: BackboneAdapter, sampler: EpisodeSampler, settings: ExtractionSettings, folder: Path,
                       progress: bool) -> dict:
    """Means, then AIE, chunk by chunk into ``folder``; returns the dict saved as the result."""
    sums = _chunked("means", folder, settings.num_mean_prompts, settings.batch_size,
                    partial(_mean_chunk, adapter, sampler, settings), progress)
    means = finalize_means(*sums)
    parts = _chunked("aie", folder, settings.num_aie_prompts, settings.batch_size,
                     partial(_aie_chunk, adapter, sampler, settings, means.means), progress)
    effects = _average_effects(settings, *parts)
    return {
        "means": means.means,
        "per_relation": effects["per_relation"],
        "pooled": effects["pooled"],
        "kept": means.kept,
        "seen": means.seen,
        "fallback": [settings.relations[r] for r in means.fallback],
        "aie_prompts": effects["aie_prompts"],
        "aie_fallback": effects["aie_fallback"],
    }


def _open_cache_folder(folder: Path, cache_root: str | Path, settings: ExtractionSettings,
                       data_fingerprint: str) -> None:
    """Creates the cache folder and records its settings; an unwritable one is a config error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"aie.cache_dir {cache_root} is not writable ({exc}); point aie.cache_dir elsewhere") from exc
    atomic_write_text(folder / "settings.json", json.dumps({**asdict(settings), "data": data_fingerprint}, indent=2))


def _extraction(saved: dict, relations: list[str], data_fingerprint: str, folder: Path) -> Extraction:
    return Extraction(relations, saved["means"], saved["per_relation"], saved["pooled"], saved["kept"], saved["seen"],
                      saved["fallback"], saved["aie_prompts"], saved["aie_fallback"], data_fingerprint, folder)


def extract(
    adapter: BackboneAdapter,
    sampler: EpisodeSampler,
    settings: ExtractionSettings,
    cache_root: str | Path,
    data_fingerprint: str,
    progress: bool = True,
) -> Extraction:
    """Computes (or resumes, or loads) the cached means and AIE of ``settings``."""
    settings.validate()
    relations = list(settings.relations)
    folder = Path(cache_root) / cache_key(adapter, settings, data_fingerprint)
    result_file = folder / "extraction.pt"
    saved = _load_or_none(result_file)
    if saved is None:
        _open_cache_folder(folder, cache_root, settings, data_fingerprint)
        saved = _compute_stage_one(adapter, sampler, settings, folder, progress)
        if _rank_and_world_size()[0] == 0:
            atomic_torch_save(saved, result_file)
    return _extraction(saved, relations, data_fingerprint, folder)


def validate_extraction(adapter: BackboneAdapter, relations: list[str], datamodule,
                        settings: AIESettings) -> ExtractionSettings:
    """Every setting checked against the backbone and data before any compute.

    Returns:
        The cache-key settings for ``relations`` and the datamodule's shots and seed.
    """
    extraction_settings = settings.extraction_settings(relations, datamodule.shots, datamodule.seed)
    extraction_settings.validate()
    settings.validate(adapter)
    return extraction_settings


def extract_from_datamodule(
    adapter: BackboneAdapter, relations: list[str], datamodule, settings: AIESettings, progress: bool = True
) -> Extraction:
    """Cached means and AIE of the datamodule's ``eval`` split (computed, resumed or loaded).

    Args:
        adapter: The backbone.
        relations: Relations to extract FVs for.
        datamodule: A relation DataModule (``attach``, ``prepare_data``, ``sampler``,
            ``fingerprint``, ``shots``, ``seed``).
        settings: The ``aie:`` section.
        progress: Show progress bars.
    """
    extraction_settings = validate_extraction(adapter, relations, datamodule, settings)
    datamodule.attach(adapter)
    datamodule.prepare_data()
    return extract(adapter, datamodule.sampler("eval"), extraction_settings, settings.cache_dir,
                   datamodule.fingerprint("eval"), progress=progress)
