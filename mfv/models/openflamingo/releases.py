"""Published OpenFlamingo releases, assembled from local files only, at full size.

Three pieces must be on disk (mfv never downloads): the CLIP ViT-L/14 weights (open_clip's
``open_clip_pytorch_model.bin`` or ``.safetensors``; ``ViT-L-14-quickgelu`` with
``final_ln_after_pool``), the language-model folder (a local folder or the Hugging Face cache)
and the release's ``checkpoint.pt``.

What ``checkpoint.pt`` holds follows from open_flamingo's training code: its factory adds
``<|endofchunk|>``, ``<image>`` and ``<PAD>`` to the tokenizer and resizes the language model's
embeddings to ``len(tokenizer)`` (RedPajama-INCITE-3B: its folder has 50432 rows, the tokenizer
50277 tokens, the release 50280 rows); its save keeps the trainable keys (the perceiver, the
gated cross-attention layers) plus every key containing "embed" (both embeddings, at 50280
rows). So the model is built as open_flamingo builds it, with embeddings of ``len(tokenizer)``
rows taken from ``checkpoint.pt``; the language-model folder's own embeddings are not used.

Loading never builds a random or fp32 copy: the skeleton's parameters are created on the meta
device and every tensor is read from its file once, converted to the target dtype and placed
on the target device (:mod:`mfv.models.weights`). Every parameter must come from a file: a
missing group (the perceiver, a cross-attention layer, an embedding, a language-model layer,
the vision tower) is one error naming it and the file that should hold it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from mfv.compat import ensure_torchvision, offline_hub
from mfv.errors import ConfigError, MissingWeightsError
from mfv.models.openflamingo.adapter import OpenFlamingoAdapter, assemble_flamingo
from mfv.models.openflamingo.vision import speed_up_vision_tower
from mfv.models.weights import assign, empty_parameters, iter_tensors, unloaded, weight_files


@dataclass(frozen=True)
class Release:
    """One published OpenFlamingo checkpoint.

    Attributes:
        hf_repo: The release's hub repository (holds ``checkpoint.pt``).
        language_model: Hub id of the language model.
        cross_attn_every_n_layers: Cross-attention frequency.
        family: Language-model family (:data:`mfv.models.openflamingo.adapter.LANGUAGE_FAMILIES`).
        supported: Whether mfv loads it (layout-tested); the MPT releases are not: their
            language model is remote code written for transformers 4.28.
    """

    hf_repo: str
    language_model: str
    cross_attn_every_n_layers: int
    family: str
    supported: bool = True


RELEASES: dict[str, Release] = {
    "openflamingo-3b": Release(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b", "anas-awadalla/mpt-1b-redpajama-200b", 1, "mpt", False
    ),
    "openflamingo-3b-instruct": Release(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
        "anas-awadalla/mpt-1b-redpajama-200b-dolly",
        1,
        "mpt",
        False,
    ),
    "openflamingo-4b": Release(
        "openflamingo/OpenFlamingo-4B-vitl-rpj3b", "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, "gpt_neox"
    ),
    "openflamingo-4b-instruct": Release(
        "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
        "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
        2,
        "gpt_neox",
    ),
    "openflamingo-9b": Release("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", 4, "mpt", False),
}


# Buffers that older transformers (4.28, the base releases' training stack) saved with
# GPT-NeoX layers; today's classes compute them, and open_flamingo ignores them too.
HARMLESS_BUFFER_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def remap_checkpoint_key(key: str, model_keys: set[str]) -> str:
    """The model key of a ``checkpoint.pt`` key under the installed library versions.

    Handles the ``module.`` prefix of DDP-saved checkpoints, the ``model_state_dict.``
    wrapper and transformers' rename of GPT-NeoX's ``embed_out`` to ``lm_head`` (either way).
    """
    key = key.removeprefix("model_state_dict.").removeprefix("module.")
    if key not in model_keys:
        for old, new in ((".embed_out.", ".lm_head."), (".lm_head.", ".embed_out.")):
            if old in key and key.replace(old, new) in model_keys:
                return key.replace(old, new)
    return key


def _resolve_hf_file(repo: str, filenames: Iterable[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import hf_hub_download
    for filename in filenames:
        try:
            return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # the hub raises several types for "not in the cache"
            continue
    return None


def _resolve_hf_folder(repo: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        return None


@dataclass(frozen=True)
class ReleaseFiles:
    """The three pieces of a release on disk."""

    checkpoint: Path
    language_model: Path
    clip_weights: Path


CLIP_HUB = "timm/vit_large_patch14_clip_224.openai"
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_release_files(release: str, checkpoint_path: str | None = None, language_model_path: str | None = None,
                          clip_weights_path: str | None = None, cache_dir: str | None = None) -> ReleaseFiles:
    """Finds the three files of ``release`` (given paths or the Hugging Face cache).

    Raises:
        ConfigError: Unknown or unsupported release.
        MissingWeightsError: Every missing piece at once, each with the option to set and
            the command that downloads it.
    """
    if release not in RELEASES:
        raise ConfigError(f"unknown OpenFlamingo release {release!r} (model.backbone_options.release); "
                          f"valid: {sorted(name for name, spec in RELEASES.items() if spec.supported)}")
    spec = RELEASES[release]
    if not spec.supported:
        raise ConfigError(
            f"OpenFlamingo release {release!r} is not supported: its language model ({spec.language_model}) is MPT "
            f"remote code written for transformers 4.28; supported: "
            f"{sorted(name for name, s in RELEASES.items() if s.supported)}")
    cache = f"not in the Hugging Face cache ({cache_dir or 'default cache'})"

    def locate(given: str | None, exists, cached) -> tuple[Path | None, str]:
        if given is not None:
            return (Path(given) if exists(Path(given)) else None), str(given)
        found = cached()
        return (Path(found) if found else None), cache

    problems = []
    checkpoint, where = locate(checkpoint_path, Path.is_file,
                               lambda: _resolve_hf_file(spec.hf_repo, ["checkpoint.pt"], cache_dir))
    if checkpoint is None:
        problems.append(f"checkpoint.pt of {spec.hf_repo} not found: {where} (model.backbone_options.checkpoint_path; "
                        f"`huggingface-cli download {spec.hf_repo} checkpoint.pt`)")
    lm, where = locate(language_model_path, Path.is_dir, lambda: _resolve_hf_folder(spec.language_model, cache_dir))
    if lm is not None and not weight_files(lm):
        lm, where = None, f"{lm} has no model.safetensors or pytorch_model.bin (or their index)"
    if lm is None:
        problems.append(f"language model {spec.language_model} not found: {where} "
                        f"(model.backbone_options.language_model_path; `huggingface-cli download {spec.language_model}`)")
    clip, where = locate(clip_weights_path, Path.is_file, lambda: _resolve_hf_file(CLIP_HUB, CLIP_FILES, cache_dir))
    if clip is None:
        problems.append(f"CLIP ViT-L/14 (openai) weights not found: {where} (model.backbone_options.clip_weights_path; "
                        f"`huggingface-cli download {CLIP_HUB} {CLIP_FILES[1]}`)")
    if problems:
        raise MissingWeightsError(f"{release}: " + "; ".join(problems))
    return ReleaseFiles(checkpoint, lm, clip)


def _group_of(key: str) -> str:
    """A readable name of the weight group a parameter belongs to."""
    if key.startswith("perceiver."):
        return "the perceiver resampler"
    if key.startswith("vision_encoder."):
        return "the CLIP vision tower"
    match = re.search(r"layers\.(\d+)\.gated_cross_attn_layer\.", key)
    if match:
        return f"gated cross-attention layer {match.group(1)}"
    if "embed" in key or "lm_head" in key:
        return "the output embeddings" if ("embed_out" in key or "lm_head" in key) else "the input embeddings"
    match = re.search(r"layers\.(\d+)\.", key)
    if match:
        return f"language-model layer {match.group(1)}"
    return key


def _describe_missing(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        groups[_group_of(key)] = groups.get(_group_of(key), 0) + 1
    return ", ".join(f"{group} ({count} tensors)" for group, count in groups.items())


def _stream(target: nn.Module, files: Iterable[Path], dtype: torch.dtype, device: str | torch.device,
            rename, what: str) -> list[str]:
    """Reads every tensor of ``files`` into ``target``; returns the keys it could not place."""
    keys = set(dict(target.named_parameters(remove_duplicate=False))) | set(dict(target.named_buffers()))
    unexpected = []
    for path in files:
        for key, tensor in iter_tensors(path):
            name = rename(key, keys)
            if name is None:
                continue
            if name not in keys:
                unexpected.append(key)
                continue
            try:
                assign(target, name, tensor, dtype, device)
            except ValueError as exc:
                raise MissingWeightsError(f"{path} ({what}): {exc}; is it the file of this release?") from exc
    return unexpected


def load_openflamingo(
    release: str = "openflamingo-4b",
    checkpoint_path: str | None = None,
    language_model_path: str | None = None,
    clip_weights_path: str | None = None,
    cache_dir: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    clip_model: str = "ViT-L-14-quickgelu",
) -> OpenFlamingoAdapter:
    """Loads a published OpenFlamingo release from local files only (see the module docstring).

    Args:
        release: Key of :data:`RELEASES`.
        checkpoint_path: The release's ``checkpoint.pt``; default: the Hugging Face cache.
        language_model_path: Folder of the language model; default: its hub id in the cache.
        clip_weights_path: open_clip weights file of ViT-L/14 (OpenAI); default: the cache.
        cache_dir: Hugging Face cache folder; default: ``HF_HOME``'s.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the weights (rotary frequencies
            stay fp32).
        device: Where the weights are placed as they are read (``cpu``, ``cuda``, ``cuda:1``).
        clip_model: open_clip model config of the vision tower (the releases: ViT-L/14).

    Raises:
        MissingWeightsError: A piece is missing, or a file lacks weights the release must
            provide; the message names the file, the group and how to get it.
        ConfigError: Unknown release, dtype or device.
    """
    target_device = _check_dtype_and_device(dtype, device)
    files = resolve_release_files(release, checkpoint_path, language_model_path, clip_weights_path, cache_dir)
    spec = RELEASES[release]
    torch_dtype = getattr(torch, dtype)

    vision, lang, tokenizer, clip_config = _skeletons(files, spec, clip_model, torch_dtype)
    _load_language_model(lang, files, spec, torch_dtype, target_device)
    _load_vision_tower(vision, files, clip_model, torch_dtype, target_device)
    with empty_parameters():
        model = assemble_flamingo(vision, lang, tokenizer, clip_config["vision_cfg"]["width"], spec.family,
                                  spec.cross_attn_every_n_layers)
    _load_release_checkpoint(model, release, files, torch_dtype, target_device)
    model.to(target_device)  # the buffers; every parameter is already there
    speed_up_vision_tower(model.vision_encoder)  # the same values, without its CPU hot spots
    from open_clip.transform import image_transform

    preprocess = image_transform(clip_config["vision_cfg"]["image_size"], is_train=False)
    adapter = OpenFlamingoAdapter(model, tokenizer, preprocess, spec.family, release)
    adapter.freeze()
    return adapter


def _check_dtype_and_device(dtype: str, device: str) -> torch.device:
    """The torch device of ``device``, checked with ``dtype`` before any file is opened.

    Raises:
        ConfigError: an unsupported dtype, or a device torch does not know.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r} (model.backbone_dtype)")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r} is not a torch device (model.backbone_options.device)") from exc


def _load_language_model(lang: nn.Module, files: ReleaseFiles, spec: Release, dtype: torch.dtype,
                         device: torch.device) -> None:
    """Reads the language-model folder's weights into ``lang``, except its embeddings.

    Raises:
        MissingWeightsError: the folder holds keys this language model does not have.
    """
    # checkpoint.pt carries both embeddings, at len(tokenizer) rows: the folder's are not used.
    lm_key = _renamer(skip=_embedding_keys(lang))
    unexpected = _stream(lang, weight_files(files.language_model), dtype, device, lm_key, "language model")
    if unexpected:
        raise MissingWeightsError(f"{files.language_model}: unexpected keys {unexpected[:5]}: is it the folder of "
                                  f"{spec.language_model}?")


def _clip_key(key: str, keys: set[str]) -> str | None:
    """The vision tower's name of an open_clip file key; ``None`` drops every other key (text tower, logit scale)."""
    key = key.removeprefix("state_dict.").removeprefix("module.")
    return key.removeprefix("visual.") if key.startswith("visual.") else None


def _load_vision_tower(vision: nn.Module, files: ReleaseFiles, clip_model: str, dtype: torch.dtype,
                       device: torch.device) -> None:
    """Reads the CLIP file's vision-tower weights into ``vision.visual`` (the text tower is never built).

    Raises:
        MissingWeightsError: the file's vision keys do not fit ``clip_model``.
    """
    unexpected = _stream(vision.visual, [files.clip_weights], dtype, device, _clip_key, "CLIP")
    if unexpected:
        raise MissingWeightsError(f"{files.clip_weights}: vision-tower keys {unexpected[:5]} do not fit {clip_model}; "
                                  f"is it open_clip's ViT-L/14 (openai) weights file?")


def _load_release_checkpoint(model: nn.Module, release: str, files: ReleaseFiles, dtype: torch.dtype,
                             device: torch.device) -> None:
    """Reads ``checkpoint.pt`` (perceiver, cross-attention, embeddings) into the assembled model.

    Raises:
        MissingWeightsError: the checkpoint has keys of another release, or any parameter of
            the model is still unloaded afterwards (named by group and file).
    """
    unexpected = _stream(model, [files.checkpoint], dtype, device, _renamer(), "checkpoint")
    if unexpected:
        raise MissingWeightsError(f"{files.checkpoint} does not match {release}: unexpected keys {unexpected[:5]}; "
                                  f"is it the checkpoint of another release?")
    missing = unloaded(model)
    if missing:
        raise _missing_error(release, files, missing)


def _skeletons(files: ReleaseFiles, spec: Release, clip_model: str, dtype: torch.dtype):
    """The vision tower and language model with parameters on meta, the tokenizer, the CLIP config."""
    ensure_torchvision()
    import open_clip
    from open_clip.model import _build_vision_tower
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    clip_config = open_clip.get_model_config(clip_model)
    if clip_config is None:
        raise ConfigError(f"unknown open_clip model {clip_model!r} (model.backbone_options.clip_model)")
    try:
        with offline_hub():
            tokenizer = AutoTokenizer.from_pretrained(str(files.language_model), local_files_only=True)
            lm_config = AutoConfig.from_pretrained(str(files.language_model), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MissingWeightsError(f"{files.language_model}: no readable tokenizer or config.json of "
                                  f"{spec.language_model} ({exc})") from exc
    with empty_parameters():
        vision = nn.Module()
        vision.visual = _build_vision_tower(clip_config["embed_dim"], clip_config["vision_cfg"],
                                            quick_gelu=clip_config.get("quick_gelu", False))
        lang = AutoModelForCausalLM.from_config(lm_config, dtype=dtype)
    # OpenFlamingo was trained with the final LayerNorm applied after pooling.
    vision.visual.final_ln_after_pool = True
    return vision, lang, tokenizer, clip_config


def _embedding_keys(lang: nn.Module) -> set[str]:
    names = {id(module): name for name, module in lang.named_modules()}
    return {f"{names[id(lang.get_input_embeddings())]}.weight", f"{names[id(lang.get_output_embeddings())]}.weight"}


def _renamer(skip: set[str] = frozenset()):
    """Maps a file's key to the model's (:func:`remap_checkpoint_key`); ``None`` drops it:
    keys in ``skip`` and the harmless buffers of older transformers the model does not have."""

    def rename(key: str, keys: set[str]) -> str | None:
        name = remap_checkpoint_key(key, keys)
        if name in skip or (name not in keys and name.endswith(HARMLESS_BUFFER_SUFFIXES)):
            return None
        return name

    return rename


def _source_of(key: str, files: ReleaseFiles) -> Path:
    """The file that provides a Flamingo parameter."""
    if key.startswith("vision_encoder."):
        return files.clip_weights
    from_checkpoint = ("gated_cross_attn" in key) or ("embed" in key) or ("lm_head" in key)
    return files.language_model if key.startswith("lang_encoder.") and not from_checkpoint else files.checkpoint


def _missing_error(release: str, files: ReleaseFiles, missing: list[str]) -> MissingWeightsError:
    """One line naming every missing group and the file that should hold it."""
    by_file: dict[Path, list[str]] = {}
    for key in missing:
        by_file.setdefault(_source_of(key, files), []).append(key)
    parts = "; ".join(f"{path} lacks {_describe_missing(keys)}" for path, keys in by_file.items())
    return MissingWeightsError(f"{release}: weights missing, they would stay at a random init: {parts}. "
                               f"Each published release provides them: re-download the incomplete file.")
