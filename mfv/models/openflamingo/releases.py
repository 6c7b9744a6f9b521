"""Published OpenFlamingo releases (3B/4B/9B), assembled from local files only.

Three pieces must be on disk (mfv never downloads): the CLIP ViT-L/14 weights (open_clip,
``ViT-L-14-quickgelu`` with ``final_ln_after_pool``), the language model (transformers,
Hugging Face cache or a local folder) and the release's ``checkpoint.pt`` (perceiver,
cross-attention, embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mfv.compat import ensure_torchvision, offline_hub
from mfv.errors import ConfigError, MissingWeightsError
from mfv.models.openflamingo.adapter import OpenFlamingoAdapter, assemble_flamingo


@dataclass(frozen=True)
class Release:
    """One published OpenFlamingo checkpoint."""

    hf_repo: str
    language_model: str
    cross_attn_every_n_layers: int
    family: str


RELEASES: dict[str, Release] = {
    "openflamingo-3b": Release(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b", "anas-awadalla/mpt-1b-redpajama-200b", 1, "mpt"
    ),
    "openflamingo-3b-instruct": Release(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
        "anas-awadalla/mpt-1b-redpajama-200b-dolly",
        1,
        "mpt",
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
    "openflamingo-9b": Release("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", 4, "mpt"),
}


def remap_checkpoint_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Adapts an OpenFlamingo ``checkpoint.pt`` state dict to the installed library versions.

    Handles the ``module.`` prefix of DDP-saved checkpoints and transformers' rename of
    GPT-NeoX's ``embed_out`` to ``lm_head`` (in either direction).
    """
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    remapped = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key not in model_keys:
            for old, new in ((".embed_out.", ".lm_head."), (".lm_head.", ".embed_out.")):
                if old in key and key.replace(old, new) in model_keys:
                    key = key.replace(old, new)
                    break
        remapped[key] = value
    return remapped


def _resolve_hf_file(repo: str, filename: str, cache_dir: str | None, hint: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:  # the hub raises several types for "not in the cache"
        raise MissingWeightsError(
            f"{filename} of {repo} is not in the Hugging Face cache ({cache_dir or 'default cache'}). "
            f"Download it where you have network: `huggingface-cli download {repo} {filename}`, "
            f"or {hint}."
        ) from exc


def load_openflamingo(
    release: str = "openflamingo-4b",
    checkpoint_path: str | None = None,
    language_model_path: str | None = None,
    clip_weights_path: str | None = None,
    cache_dir: str | None = None,
    dtype: str = "float32",
) -> OpenFlamingoAdapter:
    """Loads a published OpenFlamingo release from local files only.

    Args:
        release: Key of :data:`RELEASES`.
        checkpoint_path: The release's ``checkpoint.pt``; default: the Hugging Face cache.
        language_model_path: Folder of the language model; default: its hub id in the cache.
        clip_weights_path: open_clip weights file of ViT-L/14 (OpenAI); default: the cache.
        cache_dir: Hugging Face cache folder; default: ``HF_HOME``'s.
        dtype: ``float32``, ``bfloat16`` or ``float16``; the whole backbone is cast to it.

    Raises:
        MissingWeightsError: A piece is missing; the message names the file and how to get it.
        ConfigError: Unknown release or dtype.
    """
    if release not in RELEASES:
        raise ConfigError(f"unknown OpenFlamingo release {release!r}; valid: {sorted(RELEASES)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    spec = RELEASES[release]
    torch_dtype = getattr(torch, dtype)

    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise MissingWeightsError(
                f"OpenFlamingo checkpoint not found: {checkpoint_path} (model.backbone_options.checkpoint_path). "
                f"Download it with `huggingface-cli download {spec.hf_repo} checkpoint.pt` and point "
                f"model.backbone_options.checkpoint_path at the file."
            )
    else:
        checkpoint_path = _resolve_hf_file(
            spec.hf_repo, "checkpoint.pt", cache_dir, "set model.backbone_options.checkpoint_path to the file"
        )

    ensure_torchvision()
    import open_clip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if language_model_path is not None and not Path(language_model_path).is_dir():
        raise MissingWeightsError(
            f"language model folder not found: {language_model_path} (model.backbone_options.language_model_path). "
            f"Download it with `huggingface-cli download {spec.language_model} --local-dir {language_model_path}` "
            f"or leave the option unset to use the Hugging Face cache.")
    lm_source = language_model_path or spec.language_model
    try:
        with offline_hub():
            tokenizer = AutoTokenizer.from_pretrained(
                lm_source, local_files_only=True, trust_remote_code=True, cache_dir=cache_dir
            )
            lang = AutoModelForCausalLM.from_pretrained(
                lm_source, local_files_only=True, trust_remote_code=True, cache_dir=cache_dir, torch_dtype=torch_dtype
            )
    except OSError as exc:
        raise MissingWeightsError(
            f"language model {lm_source} not found locally (model.backbone_options.language_model_path). Download it with "
            f"`huggingface-cli download {spec.language_model}` or set model.backbone_options.language_model_path to its folder."
        ) from exc

    try:
        with offline_hub():  # open_clip must not try the network
            clip, _, preprocess = open_clip.create_model_and_transforms(
                "ViT-L-14-quickgelu", pretrained=clip_weights_path or "openai", cache_dir=cache_dir
            )
    except Exception as exc:
        raise MissingWeightsError(
            f"CLIP ViT-L/14 (openai) weights not found ({clip_weights_path or 'Hugging Face cache'}; "
            f"model.backbone_options.clip_weights_path). Download `timm/vit_large_patch14_clip_224.openai` with "
            f"huggingface-cli or set model.backbone_options.clip_weights_path to open_clip's weights file."
        ) from exc
    # OpenFlamingo was trained with the final LayerNorm applied after pooling.
    clip.visual.final_ln_after_pool = True

    model = assemble_flamingo(clip, lang, tokenizer, 1024, spec.family, spec.cross_attn_every_n_layers)
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = remap_checkpoint_keys(state, set(model.state_dict()))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise MissingWeightsError(
            f"{checkpoint_path} does not match {release}: unexpected keys {result.unexpected_keys[:5]}; "
            f"is it the checkpoint of another release?"
        )
    model.to(torch_dtype)
    # open_clip's eval transform: resize the short side, centre crop, CLIP normalisation.
    adapter = OpenFlamingoAdapter(model, tokenizer, preprocess, spec.family, release)
    adapter.freeze()
    return adapter
