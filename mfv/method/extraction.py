"""The extraction pipeline: means -> AIE -> heads -> FVs, sharded, cached and resumable.

Work is split into chunks of prompts. Each finished chunk is saved to the cache folder
(keyed by backbone, data and settings), so an interrupted run resumes from its last
saved chunk and a finished one is loaded instead of recomputed. Under
``torch.distributed`` each rank takes every ``world_size``-th chunk and the sums are
all-reduced, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mfv.data.episodes import EncodedBatch, EpisodeSampler, encode_episodes
from mfv.method.aie import Algorithm, accumulate_means, finalize_means, indirect_effects, positive_mass_share, top_heads
from mfv.method.function_vector import FunctionVectorSet, build_function_vector
from mfv.models.base import BackboneAdapter


@dataclass
class ExtractionSettings:
    """Everything that changes the extraction result (all part of the cache key).

    Attributes:
        relations: Relations to extract FVs for.
        shots: Demonstrations in clean and corrupted prompts.
        num_mean_prompts: Clean prompts for the mean activations (over all relations).
        num_aie_prompts: Corrupted prompts for the AIE (over all relations).
        k: Heads summed into each FV.
        layer: Injection layer (default: the middle layer).
        selection: ``pooled`` (one head set from the AIE pooled over relations) or
            ``per_relation``.
        algorithm: ``fast`` or ``reference``.
        batch_size: Prompts per chunk (the unit of resumption).
        seed: Episode seed.
    """

    relations: list[str] = field(default_factory=lambda: ["above", "below", "left", "right"])
    shots: int = 4
    num_mean_prompts: int = 200
    num_aie_prompts: int = 100
    k: int = 10
    layer: int | None = None
    selection: Literal["pooled", "per_relation"] = "pooled"
    algorithm: Algorithm = "fast"
    batch_size: int = 8
    seed: int = 0


@dataclass
class ExtractionResult:
    """Means, AIE, chosen heads and FVs of one extraction."""

    fvs: FunctionVectorSet
    aie_per_relation: torch.Tensor  # (relations, layers, heads)
    aie_pooled: torch.Tensor  # (layers, heads)
    kept: list[int]
    seen: list[int]
    cache_dir: Path

    def summary(self) -> dict:
        heads = self.fvs.heads
        return {
            "relations": self.fvs.relations,
            "layer": self.fvs.layer,
            "heads": {r: [list(h) for h in hs] for r, hs in heads.items()},
            "prompts_kept": dict(zip(self.fvs.relations, self.kept)),
            "prompts_seen": dict(zip(self.fvs.relations, self.seen)),
            "top10_positive_aie_share": positive_mass_share(self.aie_pooled, 10),
            "max_aie": float(self.aie_pooled.max()),
        }


def weights_fingerprint(adapter: BackboneAdapter) -> str:
    """A cheap fingerprint of the backbone's weights (two output projections, hashed)."""
    h = hashlib.sha256()
    for layer in (0, adapter.num_layers - 1):
        h.update(adapter.output_projection(layer).detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(adapter: BackboneAdapter, settings: ExtractionSettings, data_fingerprint: str) -> str:
    payload = {
        "backbone": adapter.backbone_id,
        "shape": adapter.shape_signature(),
        "weights": weights_fingerprint(adapter),
        "data": data_fingerprint,
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not (dist.is_available() and dist.is_initialized()):
        return tensors
    out = []
    for tensor in tensors:
        reduced = tensor.clone()
        dist.all_reduce(reduced)
        out.append(reduced)
    return out


def _chunked(
    name: str,
    folder: Path,
    num_prompts: int,
    batch_size: int,
    compute: Callable[[range], list[torch.Tensor]],
    progress: bool,
) -> list[torch.Tensor]:
    """Runs ``compute`` over this rank's chunks (skipping saved ones) and sums the results."""
    rank, world = _rank_world()
    folder.mkdir(parents=True, exist_ok=True)
    chunks = list(range(0, num_prompts, batch_size))
    mine = [c for i, c in enumerate(chunks) if i % world == rank]
    totals: list[torch.Tensor] | None = None
    for start in tqdm(mine, desc=name, disable=not progress or rank != 0, unit="chunk"):
        path = folder / f"{name}_{start:07d}.pt"
        if path.is_file():
            parts = torch.load(path, weights_only=True)
        else:
            parts = compute(range(start, min(start + batch_size, num_prompts)))
            tmp = path.with_suffix(".tmp")
            torch.save(parts, tmp)
            tmp.replace(path)  # atomic: a killed run never leaves half a chunk
        totals = parts if totals is None else [a + b for a, b in zip(totals, parts)]
    if totals is None:  # more ranks than chunks
        totals = [torch.zeros_like(t) for t in compute(range(0))]
    return _all_reduce(totals)


def extract_function_vectors(
    adapter: BackboneAdapter,
    sampler: EpisodeSampler,
    settings: ExtractionSettings,
    cache_root: str | Path,
    data_fingerprint: str,
    progress: bool = True,
) -> ExtractionResult:
    """Runs (or resumes, or loads) the whole extraction for ``settings``."""
    relations = settings.relations
    num_relations = len(relations)
    layer = settings.layer if settings.layer is not None else adapter.num_layers // 2
    if not 0 <= layer < adapter.num_layers:
        raise ValueError(f"layer {layer} out of range: the backbone has layers 0..{adapter.num_layers - 1}")
    folder = Path(cache_root) / cache_key(adapter, settings, data_fingerprint)
    result_file = folder / "function_vectors.safetensors"
    if result_file.is_file() and (folder / "aie.pt").is_file():
        saved = torch.load(folder / "aie.pt", weights_only=True)
        fvs = FunctionVectorSet.load(result_file, adapter)
        return ExtractionResult(fvs, saved["per_relation"], saved["pooled"], saved["kept"], saved["seen"], folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=2))

    def episodes(indices: range, mode: str) -> EncodedBatch:
        return encode_episodes(adapter, [sampler.episode(i, mode, settings.shots) for i in indices], relations)

    def mean_chunk(indices: range) -> list[torch.Tensor]:
        batches = [episodes(indices, "clean")] if len(indices) else []
        return list(accumulate_means(adapter, batches, num_relations, progress=False))

    sums = _chunked("means", folder, settings.num_mean_prompts, settings.batch_size, mean_chunk, progress)
    means = finalize_means(*sums)

    def aie_chunk(indices: range) -> list[torch.Tensor]:
        total = torch.zeros(num_relations, adapter.num_layers, adapter.num_heads, dtype=torch.float64)
        count = torch.zeros(num_relations, dtype=torch.long)
        if len(indices):
            batch = episodes(indices, "corrupted")
            effects = indirect_effects(adapter, batch, means.means, settings.algorithm).double()
            total.index_add_(0, batch.relation_ids.cpu(), effects)
            count.index_add_(0, batch.relation_ids.cpu(), torch.ones(len(batch), dtype=torch.long))
        return [total, count]

    total, count = _chunked("aie", folder, settings.num_aie_prompts, settings.batch_size, aie_chunk, progress)
    per_relation = (total / count.clamp(min=1)[:, None, None]).float()
    pooled = (total.sum(0) / count.sum().clamp(min=1)).float()

    heads = {
        r: top_heads(pooled if settings.selection == "pooled" else per_relation[i], settings.k)
        for i, r in enumerate(relations)
    }
    vectors = {r: build_function_vector(adapter, means.means[i], heads[r]) for i, r in enumerate(relations)}
    fvs = FunctionVectorSet(
        vectors=vectors,
        layer=layer,
        heads=heads,
        backbone_id=adapter.backbone_id,
        shape=adapter.shape_signature(),
        metadata={
            "kind": "extracted",
            "k": settings.k,
            "selection": settings.selection,
            "shots": settings.shots,
            "prompts_kept": dict(zip(relations, means.kept)),
            "prompts_seen": dict(zip(relations, means.seen)),
            "fallback_relations": [relations[r] for r in means.fallback],
            "aie_prompts": dict(zip(relations, count.tolist())),
            "data_fingerprint": data_fingerprint,
        },
    )
    rank, _ = _rank_world()
    if rank == 0:
        torch.save(
            {"per_relation": per_relation, "pooled": pooled, "kept": means.kept, "seen": means.seen,
             "means": means.means}, folder / "aie.pt",
        )
        fvs.save(result_file)
    return ExtractionResult(fvs, per_relation, pooled, means.kept, means.seen, folder)
