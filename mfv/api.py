"""The public Python API: load a backbone, extract FVs, steer, predict, generate, save/load.

    import mfv
    model = mfv.load("openflamingo-tiny", directory="checkpoints/organism")
    data = mfv.SyntheticData(data_dir="data/api", image_size=64, num_images=mfv.SMALL_SYNTHETIC)
    fvs = mfv.extract(model, data, k=6, layer=1)
    episode = data.sampler("test").episode(0, "zero_shot")
    with mfv.steer(model, fvs.vectors[episode.relation], layer=fvs.layer):
        print(mfv.predict(model, episode), "expected", episode.answer)

Everything here is a thin layer over the library modules (one definition per concept):
:mod:`mfv.models` (backbones), :mod:`mfv.method.extraction` (cached AIE and FVs),
:mod:`mfv.hooks` (interventions), :mod:`mfv.method.function_vector` (FV files).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from mfv.data.episodes import Episode, EpisodeSampler, encode_episodes
from mfv.hooks import add_to_residual
from mfv.method.extraction import DEFAULT_K, DEFAULT_SELECTION, ExtractionSettings, extract as _extract
from mfv.method.function_vector import FunctionVectorSet
from mfv.models import load_backbone
from mfv.models.base import BackboneAdapter

# Small split sizes for notebooks and tests (the DataModule's defaults are the paper's).
SMALL_SYNTHETIC = {"eval": 120, "train": 40, "test": 40, "novel": 40, "composite": 40}
DEFAULT_CACHE = "runs/aie_cache"


def load(name: str, device: str | torch.device | None = None, **options) -> BackboneAdapter:
    """A registered backbone (``mfv.models.BACKBONES``), e.g. ``load("openflamingo", release="openflamingo-4b")``.

    Args:
        name: Registered backbone name.
        device: Where the model runs (``"cuda"``, ``"cuda:1"``, ``"cpu"``); builders that take a
            ``device`` option place each weight there as it is read, others are moved after.
        **options: The builder's options (``model.backbone_options`` in configs).
    """
    from mfv.models import backbone_spec

    if device is not None and backbone_spec(name).takes("device"):
        options["device"] = str(device)
    adapter = load_backbone(name, **options)
    if device is not None:
        adapter.model.to(device)
    return adapter


def _sampler_fingerprint(sampler: EpisodeSampler) -> str:
    digest = hashlib.sha256(repr([(s.image_path, s.anchor, sorted(s.neighbours.items()), s.relation)
                                  for s in sampler.queries]).encode())
    return f"episodes:{digest.hexdigest()[:16]}"


def extract(
    model: BackboneAdapter,
    data,
    k: int = DEFAULT_K,
    layer: int | None = None,
    selection: Literal["per_relation", "pooled"] = DEFAULT_SELECTION,
    num_mean_prompts: int = 100,
    num_aie_prompts: int = 50,
    aie_filter: Literal["clean_correct", "all"] = "clean_correct",
    cache_dir: str | Path = DEFAULT_CACHE,
    progress: bool = True,
) -> FunctionVectorSet:
    """Extracted FVs (top-``k`` heads by AIE) for injection after ``layer``.

    Args:
        model: The backbone.
        data: A relation DataModule (its ``eval`` split is used) or an
            :class:`~mfv.data.episodes.EpisodeSampler` over your own scenes.
        layer: Injection layer (default: the middle layer).
        cache_dir: Where means and AIE are cached (keyed on model, data and settings).
    """
    if isinstance(data, EpisodeSampler):
        sampler, fingerprint, seed = data, _sampler_fingerprint(data), data.seed
    else:
        data.attach(model)
        data.prepare_data()
        sampler, fingerprint, seed = data.sampler("eval"), data.fingerprint("eval"), data.seed
    settings = ExtractionSettings(relations=list(sampler.relations), shots=sampler.shots,
                                  num_mean_prompts=num_mean_prompts, num_aie_prompts=num_aie_prompts,
                                  aie_filter=aie_filter, seed=seed)
    result = _extract(model, sampler, settings, cache_dir, fingerprint, progress=progress)
    return result.function_vectors(model, k, model.num_layers // 2 if layer is None else layer, selection)


@contextmanager
def steer(model: BackboneAdapter, vector: torch.Tensor, layer: int, every_position: bool = False) -> Iterator[None]:
    """Adds ``vector`` to the residual stream after ``layer`` at the prompt's last position
    (and, with ``every_position``, at every generated position) inside the block."""
    with add_to_residual(model, layer, vector, every_generated_position=every_position):
        yield


@torch.no_grad()
def predict(model: BackboneAdapter, episodes: Episode | Sequence[Episode]) -> str | list[str]:
    """The first answer token the model predicts for one episode or several, as text."""
    single = isinstance(episodes, Episode)
    batch = encode_episodes(model, [episodes] if single else list(episodes), sorted({e.relation for e in (
        [episodes] if single else episodes)}))
    tokens = model.forward(batch.prompts).argmax(-1).tolist()
    words = [model.tokenizer.decode([t]).strip() for t in tokens]
    return words[0] if single else words


@torch.no_grad()
def generate(model: BackboneAdapter, episode: Episode, max_new_tokens: int = 5) -> str:
    """Greedy continuation of the episode's prompt (several tokens), as text."""
    prompt = model.build_prompt(episode.demonstrations, episode.query)
    ids = model.generate(model.collate([prompt]), max_new_tokens=max_new_tokens)[0]
    return model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def save(fvs: FunctionVectorSet, path: str | Path) -> Path:
    """Writes an FV file (safetensors with provenance)."""
    return fvs.save(path)


def load_vectors(path: str | Path, model: BackboneAdapter | None = None) -> FunctionVectorSet:
    """Reads an FV file, validated against ``model`` when given."""
    return FunctionVectorSet.load(path, model)
