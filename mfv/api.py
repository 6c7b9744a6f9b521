"""The public Python API: load a backbone, extract FVs, steer, predict, generate, evaluate, save/load.

    import mfv
    model = mfv.load("openflamingo-tiny", directory="checkpoints/organism")
    data = mfv.SyntheticData(data_dir="data/api", image_size=64, num_images=mfv.SMALL_SYNTHETIC)
    fvs = mfv.extract(model, data, k=6, layer=1)
    episode = data.sampler("test").episode(0, "zero_shot")
    with mfv.steer(model, fvs.vectors[episode.relation], layer=fvs.layer):
        print(mfv.predict(model, episode), "expected", episode.answer)
    result = mfv.evaluate(model, fvs, [data.sampler("test").episode(i, "zero_shot") for i in range(40)])
    print(result.to_dict()["summary"])

Everything here is a thin layer over the library modules (one definition per concept):
:mod:`mfv.models` (backbones), :mod:`mfv.method.extraction` (cached AIE and FVs),
:mod:`mfv.steering` (injections), :mod:`mfv.evaluation` (conditions and scores),
:mod:`mfv.method.function_vector` (FV files).
"""

from __future__ import annotations

import hashlib
import operator
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from mfv.data.datamodule import RelationDataModule
from mfv.data.episodes import Episode, EpisodeSampler, encode_episodes, images_digest
from mfv.evaluation.protocol import EvaluationResult, EvaluationSettings, Vectors
from mfv.evaluation.protocol import evaluate as _evaluate_protocol
from mfv.evaluation.protocol import evaluate_episodes
from mfv.method.extraction import AIESettings, extract_from_datamodule
from mfv.method.extraction import extract as _extract
from mfv.errors import ConfigError
from mfv.method.function_vector import FunctionVectorSet
from mfv.models import load_backbone
from mfv.models.base import BackboneAdapter
from mfv.preflight import check_extraction
from mfv.steering import Injection, steered_logits, steering

# Small split sizes for notebooks and tests (the DataModule's defaults are the paper's).
SMALL_SYNTHETIC = {"eval": 120, "train": 40, "test": 40, "novel": 40, "composite": 40}
_AIE = AIESettings()  # the one set of defaults (the paper's), shared with the config's aie: section
DEFAULT_CACHE = _AIE.cache_dir


# Argument checks: a wrong type or value is one line naming the function, the argument and what
# it expects, before any model work (not an AttributeError from deep inside the library).

def _wrong(function: str, name: str, value: object, expected: str) -> TypeError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return TypeError(f"mfv.{function}: {name}={shown} ({type(value).__name__}); expected {expected}")


def _integer(function: str, name: str, value: object, low: int, high: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``[low, high]`` (TypeError for a str, float or bool; ConfigError out of range)."""
    bounds = f"an int >= {low}" if high is None else f"an int in {low}..{high}"
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None:
        raise _wrong(function, name, value, bounds + what)
    if number < low or (high is not None and number > high):
        raise ConfigError(f"mfv.{function}: {name}={number} is out of range; expected {bounds}{what}")
    return number


def _check_model(function: str, model: object) -> BackboneAdapter:
    if not isinstance(model, BackboneAdapter):
        raise _wrong(function, "model", model, "a backbone from mfv.load(...)")
    return model


def _check_data(function: str, data: object, episodes: bool = False) -> None:
    """A relation DataModule; for extraction also an EpisodeSampler, for evaluation a list of episodes."""
    if isinstance(data, RelationDataModule) or (not episodes and isinstance(data, EpisodeSampler)):
        return
    if episodes and isinstance(data, (list, tuple)):
        odd = next((e for e in data if not isinstance(e, Episode)), None)
        if odd is None:
            return
        raise _wrong(function, "data", data, f"a list of mfv.Episode; it holds a {type(odd).__name__}")
    kinds = "a list of mfv.Episode or a DataModule" if episodes else "a DataModule or an mfv.EpisodeSampler"
    hint = (" (a path: build the DataModule first, e.g. mfv.OwnData(data_dir=...), mfv.GQAData(dataset_dir=...) "
            "or mfv.SyntheticData(data_dir=...))") if isinstance(data, (str, Path)) else ""
    raise _wrong(function, "data", data, kinds + hint)


def _check_vectors(function: str, name: str, fvs: object, optional: bool = False) -> None:
    if not (isinstance(fvs, FunctionVectorSet) or optional and fvs is None):
        hint = " (a path: mfv.load_vectors(path, model) reads it)" if isinstance(fvs, (str, Path)) else ""
        raise _wrong(function, name, fvs, f"FVs from mfv.extract(...) or mfv.load_vectors(...){hint}"
                     + (", or None" if optional else ""))


def _check_injection(model: BackboneAdapter, vector: object, layer: object) -> Injection:
    """The injection of :func:`steer`: a finite tensor of the backbone's width, after layers it has."""
    if not isinstance(vector, torch.Tensor):
        raise _wrong("steer", "vector", vector,
                     f"a torch.Tensor of width {model.hidden_size} (e.g. fvs.vectors[relation])")
    if not vector.is_floating_point():
        raise _wrong("steer", "vector", vector, "a floating-point tensor")
    bad = int((~torch.isfinite(vector)).sum())
    if bad:  # a NaN would steer every prediction to one arbitrary token without a word
        raise ConfigError(f"mfv.steer: vector holds {bad} NaN or inf value(s) of {vector.numel()}; recompute or "
                          f"reload it (mfv.load_vectors refuses such files)")
    top = model.num_layers - 1
    what = " (the backbone's layers)"
    if isinstance(layer, (list, tuple)):
        layers: int | list[int] = [_integer("steer", "layer", item, 0, top, what) for item in layer]
    else:
        layers = _integer("steer", "layer", layer, 0, top, what)
    try:
        injection = Injection.at(layers, vector)
        injection.check(model)
    except ValueError as exc:
        raise ConfigError(f"mfv.steer: {exc}") from None
    return injection


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
    """Content hash of your own episodes: the sampler's kind, its queries and demonstration
    scenes, and the bytes of every image they show (replacing an image at the same path
    gives another key)."""
    scenes = lambda group: [(s.image_path, s.anchor, sorted(s.neighbours.items()), s.relation) for s in group]
    digest = hashlib.blake2b(repr((type(sampler).__qualname__, scenes(sampler.queries), scenes(sampler.scenes())))
                             .encode(), digest_size=16)
    digest.update(images_digest(sampler.image_paths()).encode())
    return f"episodes:{digest.hexdigest()[:16]}"


def extract(
    model: BackboneAdapter,
    data,
    k: int = _AIE.k,
    layer: int | None = None,
    selection: Literal["per_relation", "pooled"] = _AIE.selection,
    num_mean_prompts: int = _AIE.num_mean_prompts,
    num_aie_prompts: int = _AIE.num_aie_prompts,
    aie_filter: Literal["clean_correct", "all"] = _AIE.aie_filter,
    cache_dir: str | Path = DEFAULT_CACHE,
    progress: bool = True,
) -> FunctionVectorSet:
    """Extracted FVs (top-``k`` heads by AIE) for injection after ``layer``.

    Defaults are the ``aie:`` section's (:class:`~mfv.method.extraction.AIESettings`), so
    ``mfv.extract`` and ``evaluate.py`` share one cache entry for the same data.

    Args:
        model: The backbone.
        data: A relation DataModule (its ``eval`` split is used) or an
            :class:`~mfv.data.episodes.EpisodeSampler` over your own scenes.
        layer: Injection layer (default: the middle layer).
        cache_dir: Where means and AIE are cached (keyed on model, data and settings).

    Raises:
        TypeError: an argument of the wrong type (a str ``k``, a path instead of a DataModule),
            one line naming it and what it expects.
        ConfigError: a value out of range, or data the settings cannot use (the preflight's line).
    """
    _check_model("extract", model)
    _check_data("extract", data)
    k = _integer("extract", "k", k, 1, what=" (heads per FV)")
    num_mean_prompts = _integer("extract", "num_mean_prompts", num_mean_prompts, 1)
    num_aie_prompts = _integer("extract", "num_aie_prompts", num_aie_prompts, 1)
    if layer is not None:
        layer = _integer("extract", "layer", layer, 0, model.num_layers - 1, " (the backbone's layers) or None")
    if not isinstance(cache_dir, (str, Path)):
        raise _wrong("extract", "cache_dir", cache_dir, "a folder path")
    aie = AIESettings(num_mean_prompts=num_mean_prompts, num_aie_prompts=num_aie_prompts, k=k,
                      selection=selection, aie_filter=aie_filter, cache_dir=str(cache_dir))
    check_extraction(model, data, aie)  # the commands' preflight: settings, images, tokenizer, cache folder
    if isinstance(data, EpisodeSampler):
        aie.validate(model)
        settings = aie.extraction_settings(list(data.relations), data.shots, data.seed)
        result = _extract(model, data, settings, aie.cache_dir, _sampler_fingerprint(data), progress=progress)
    else:
        result = extract_from_datamodule(model, list(data.relations), data, aie, progress=progress)
    return result.function_vectors(model, k, model.num_layers // 2 if layer is None else layer, selection)


@contextmanager
def steer(model: BackboneAdapter, vector: torch.Tensor, layer: int | Sequence[int], every_position: bool = False
          ) -> Iterator[None]:
    """Adds ``vector`` to the residual stream after ``layer`` at the prompt's last position
    (and, with ``every_position``, at every generated position) inside the block.

    ``vector`` is ``(hidden,)`` or one per batch row ``(B, hidden)``; with a list of layers,
    ``(len(layers), hidden)`` or ``(B, len(layers), hidden)``.

    Raises:
        TypeError: ``vector`` is not a floating-point tensor, or ``layer`` not an int (or list of them).
        ConfigError: ``vector`` holds NaN or inf, has another width than the backbone's hidden
            size or another number of rows than layers, or a layer the backbone does not have.
    """
    injection = _check_injection(_check_model("steer", model), vector, layer)
    with steering(model, injection, every_generated_position=every_position):
        yield


@torch.no_grad()
def predict(model: BackboneAdapter, episodes: Episode | Sequence[Episode]) -> str | list[str]:
    """The first answer token the model predicts for one episode or several, as text."""
    _check_model("predict", model)
    single = isinstance(episodes, Episode)
    if not single and not (isinstance(episodes, (list, tuple)) and episodes
                           and all(isinstance(e, Episode) for e in episodes)):
        raise _wrong("predict", "episodes", episodes, "an mfv.Episode or a non-empty list of them "
                     "(e.g. data.sampler('test').episode(0, 'zero_shot'))")
    batch = encode_episodes(model, [episodes] if single else list(episodes), sorted({e.relation for e in (
        [episodes] if single else episodes)}))
    tokens = steered_logits(model, batch.prompts, None).argmax(-1).tolist()
    words = [model.tokenizer.decode([t]).strip() for t in tokens]
    return words[0] if single else words


@torch.no_grad()
def generate(model: BackboneAdapter, episode: Episode, max_new_tokens: int = 5) -> str:
    """Greedy continuation of the episode's prompt (several tokens), as text."""
    _check_model("generate", model)
    if not isinstance(episode, Episode):
        raise _wrong("generate", "episode", episode,
                     "an mfv.Episode (e.g. data.sampler('test').episode(0, 'zero_shot'))")
    max_new_tokens = _integer("generate", "max_new_tokens", max_new_tokens, 1)
    prompt = model.build_prompt(episode.demonstrations, episode.query)
    ids = model.generate(model.collate([prompt]), max_new_tokens=max_new_tokens)[0]
    return model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def evaluate(
    model: BackboneAdapter,
    fvs: FunctionVectorSet,
    data,
    conditions: Sequence[str] | None = None,
    finetuned: FunctionVectorSet | None = None,
    settings: EvaluationSettings | None = None,
) -> EvaluationResult:
    """Evaluates FVs in one call; the result is what ``evaluate.py`` writes (``.to_dict()``
    is its ``metrics.json``; :func:`mfv.evaluation.report.write_report` writes the rest).

    Args:
        model: The backbone.
        fvs: Extracted FVs (e.g. from :func:`extract`), injected at their layer.
        data: A list of episodes (zero-shot with and without the FVs), or a relation
            DataModule (the protocol: zero-shot, FVs, ICL, shuffled labels, novel objects, the
            layer sweep and analogies, as its splits allow; the K sweep needs ``evaluate.py``).
        conditions: Condition names or patterns (``"zero_shot*"``) to run; default: all.
        finetuned: Fine-tuned FVs to evaluate beside the extracted ones.
        settings: Limits, shots, batch size (default: :class:`~mfv.evaluation.EvaluationSettings`).

    Raises:
        TypeError: an argument of the wrong type (``None`` as ``fvs``, a path as ``data``), one
            line naming it and what it expects.
    """
    _check_model("evaluate", model)
    _check_vectors("evaluate", "fvs", fvs)
    _check_vectors("evaluate", "finetuned", finetuned, optional=True)
    _check_data("evaluate", data, episodes=True)
    if isinstance(conditions, str):
        conditions = [conditions]  # one name or pattern
    if conditions is not None and not (isinstance(conditions, (list, tuple)) and all(isinstance(c, str)
                                                                                     for c in conditions)):
        raise _wrong("evaluate", "conditions", conditions, "condition names or patterns, e.g. ['zero_shot*']")
    if settings is not None and not isinstance(settings, EvaluationSettings):
        raise _wrong("evaluate", "settings", settings, "an mfv.EvaluationSettings or None")
    vectors = Vectors(fvs, finetuned)
    if isinstance(data, (list, tuple)):
        if conditions is not None:
            raise ValueError("conditions= selects among the protocol's conditions: pass a DataModule")
        return evaluate_episodes(model, list(data), vectors, settings)
    data.attach(model)
    data.prepare_data()
    result = _evaluate_protocol(model, data, vectors, settings, only=conditions)
    result.settings["data_fingerprints"] = {s: data.fingerprint(s) for s in ("test", "val", "novel") if data.has_split(s)}
    return result


def save(fvs: FunctionVectorSet, path: str | Path, overwrite: bool = False) -> Path:
    """Writes an FV file (safetensors with provenance).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is not set (nothing is replaced
            unless asked).
        IncompatibleVectorError: a vector holds NaN or inf.
    """
    _check_vectors("save", "fvs", fvs)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; mfv.save(..., overwrite=True) replaces it, or choose another path")
    return fvs.save(path)


def load_vectors(path: str | Path, model: BackboneAdapter | None = None) -> FunctionVectorSet:
    """Reads an FV file, validated against ``model`` when given."""
    return FunctionVectorSet.load(path, model)
