"""Tiny OpenFlamingo models: random ones built from sizes, and saved/loaded small models.

Built from the same open_flamingo / open_clip / transformers classes as the releases, with
every block sized down and a word-level tokenizer (:mod:`mfv.models.tokenizer`), for tests,
benchmarks and the trained model organism.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfv.compat import ensure_torchvision
from mfv.errors import ConfigError, MissingWeightsError
from mfv.io import new_file_mode
from mfv.models.openflamingo.adapter import OpenFlamingoAdapter, _image_transform, assemble_flamingo
from mfv.vocabulary import OBJECT_NAMES


@dataclass
class TinyFlamingoConfig:
    """Sizes of a small OpenFlamingo built from the real classes with random weights.

    The stock factory fixes the resampler and cross-attention at 8 heads x 64; here
    every block is built directly so all sizes are small.
    """

    words: list[str] = field(default_factory=list)
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 1
    vision_head_width: int = 16
    perceiver_depth: int = 1
    perceiver_latents: int = 8
    perceiver_heads: int = 2
    perceiver_dim_head: int = 16
    xattn_heads: int = 2
    xattn_dim_head: int = 16
    xattn_ff_mult: int = 2
    cross_attn_every_n_layers: int = 1
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    gate_init: float = 0.5
    max_position_embeddings: int = 512
    seed: int = 0


def build_tiny_openflamingo(
    config: TinyFlamingoConfig, backbone_id: str = "openflamingo-tiny"
) -> OpenFlamingoAdapter:
    """Builds a small random OpenFlamingo from the real open_flamingo/open_clip/transformers classes.

    Args:
        config: Sizes; ``config.words`` are added to the tokenizer as single tokens.
        backbone_id: Name stored with function vectors extracted from it.
    """
    ensure_torchvision()  # open_clip and open_flamingo import torchvision, which needs this on CPU-only torch
    from mfv.models.tokenizer import build_word_tokenizer

    # Every random draw below follows this seed, in this order: same config, same weights.
    torch.manual_seed(config.seed)
    tokenizer = build_word_tokenizer(config.words)
    vision = _tiny_vision_encoder(config)
    lang = _tiny_language_model(config, len(tokenizer))
    model = assemble_flamingo(
        vision, lang, tokenizer, config.vision_width, "gpt_neox", config.cross_attn_every_n_layers
    )
    _shrink_flamingo_blocks(model, lang, config)
    adapter = OpenFlamingoAdapter(
        model, tokenizer, _image_transform(config.image_size), "gpt_neox", backbone_id, tiny_config=config
    )
    adapter.freeze()
    return adapter


def _tiny_vision_encoder(config: TinyFlamingoConfig) -> nn.Module:
    """An open_clip vision tower of the config's sizes, as ``.visual`` (where open_flamingo looks)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision_cfg = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=config.vision_head_width,
        patch_size=config.patch_size,
        image_size=config.image_size,
        output_tokens=True,
    )
    vision = nn.Module()
    vision.visual = _build_vision_tower(config.vision_width, vision_cfg, quick_gelu=True)
    return vision


def _tiny_language_model(config: TinyFlamingoConfig, vocab_size: int) -> nn.Module:
    """A random GPT-NeoX causal LM of the config's sizes (the 4B releases' language-model family)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    lm_config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return GPTNeoXForCausalLM(lm_config)


def _shrink_flamingo_blocks(model: nn.Module, lang: nn.Module, config: TinyFlamingoConfig) -> None:
    """Replaces the stock-size resampler and cross-attention blocks with the config's small ones.

    open_flamingo's assembly always builds them at 8 heads x 64; the gates are then opened to
    ``config.gate_init``.
    """
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

    model.perceiver = PerceiverResampler(
        dim=config.vision_width,
        depth=config.perceiver_depth,
        dim_head=config.perceiver_dim_head,
        heads=config.perceiver_heads,
        num_latents=config.perceiver_latents,
    )
    lang.gated_cross_attn_layers = nn.ModuleList(
        [
            GatedCrossAttentionBlock(
                dim=config.hidden_size,
                dim_visual=config.vision_width,
                dim_head=config.xattn_dim_head,
                heads=config.xattn_heads,
                ff_mult=config.xattn_ff_mult,
            )
            if (i + 1) % config.cross_attn_every_n_layers == 0
            else None
            for i in range(config.num_layers)
        ]
    )
    for block in lang.gated_cross_attn_layers:
        if block is not None:
            # Zero gates (the stock init) would make a random model ignore its images.
            block.attn_gate.data.fill_(config.gate_init)
            block.ff_gate.data.fill_(config.gate_init)
    lang.init_flamingo_layers(False)


def save_tiny_openflamingo(adapter: OpenFlamingoAdapter, directory: str | os.PathLike) -> Path:
    """Saves a tiny model (config, weights, tokenizer) to ``directory``, atomically.

    The files are written into a sibling staging folder that replaces ``directory``
    only when complete, so an interrupted save never leaves half a model.
    """
    from safetensors.torch import save_model

    if not isinstance(adapter.tiny_config, TinyFlamingoConfig):
        raise ValueError("only tiny models are saved by mfv; real releases load from their checkpoints")
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        # Files kept beside the weights (model card, curves) survive a re-save.
        if directory.is_dir():
            for item in directory.iterdir():
                if item.is_file() and item.name not in ("config.json", "model.safetensors"):
                    shutil.copy2(item, staging / item.name)
        (staging / "config.json").write_text(json.dumps(asdict(adapter.tiny_config), indent=2))
        # save_model de-duplicates the tensors open_flamingo registers under two names.
        save_model(adapter.model, str(staging / "model.safetensors"), metadata={"backbone_id": adapter.backbone_id})
        os.chmod(staging / "model.safetensors", new_file_mode())  # safetensors writes 0600
        adapter.tokenizer.save_pretrained(str(staging / "tokenizer"))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old.{uuid.uuid4().hex[:8]}")
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old)
        else:
            staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def load_tiny_openflamingo(directory: str | os.PathLike | None = None) -> OpenFlamingoAdapter:
    """Loads a tiny model saved by :func:`save_tiny_openflamingo` (config, weights, tokenizer);
    without ``directory``, the bundled model organism (:func:`mfv.resources.organism_dir`)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from mfv.resources import organism_dir

    directory = Path(directory) if directory is not None else organism_dir()
    weights = directory / "model.safetensors"
    for required in (directory / "config.json", weights):
        if not required.is_file():
            raise MissingWeightsError(
                f"tiny OpenFlamingo not found: expected {required}. Train one with "
                f"`python -m mfv.organism.train --out {directory}` or point the config at another folder."
            )
    config = TinyFlamingoConfig(**json.loads((directory / "config.json").read_text()))
    with safe_open(str(weights), "pt") as handle:
        backbone_id = (handle.metadata() or {}).get("backbone_id", "openflamingo-tiny")
    adapter = build_tiny_openflamingo(config, backbone_id=backbone_id)
    load_model(adapter.model, str(weights))
    adapter.freeze()
    return adapter


def random_openflamingo(words: list[str] | None = None, **sizes: Any) -> OpenFlamingoAdapter:
    """A random tiny OpenFlamingo; ``sizes`` are :class:`TinyFlamingoConfig` fields.

    When ``words`` is omitted the tokenizer knows every built-in object name
    (:data:`mfv.vocabulary.OBJECT_NAMES`).
    """
    try:
        config = TinyFlamingoConfig(words=list(OBJECT_NAMES if words is None else words), **sizes)
    except TypeError as exc:
        valid = sorted(TinyFlamingoConfig.__dataclass_fields__)
        raise ConfigError(f"openflamingo-random: {exc}; valid options: {valid}") from exc
    return build_tiny_openflamingo(config)
