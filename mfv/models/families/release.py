"""Stand-ins and layouts made from the releases' configs, so that their structure cannot drift.

Each family file declares its release's ``config.json`` (the structural fields) and a
:class:`StandIn`: how far to reduce it (:class:`Reduction`: width, depth, vision tower) and how
to build a tokenizer and processor offline. :func:`reduce_release` is the one reduction every
family goes through: it keeps what the method's exactness depends on (heads x head_dim against
hidden, the grouped-query ratio, the layer-type pattern with a window shorter than the test
prompts, rotary variant and sections, qk-norm and tied embeddings as the model class and config
give them, image tokens by the release's mechanism) and shrinks only sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from mfv.models.tokenizer import train_bpe_tokenizer

if TYPE_CHECKING:
    from mfv.models.hf import Family, HFAdapter


@dataclass(frozen=True)
class Reduction:
    """How a release config shrinks to a stand-in.

    Attributes:
        layers: Decoder layers (Gemma 3: one whole 5 sliding : 1 full pattern).
        head_dim: Per-head width (large enough for the release's rotary sections to stay integral).
        heads: Query heads at least; the key-value heads are ``max(1, heads // ratio)`` and the query
            heads that times the release's ratio, so the grouped-query ratio is the release's.
        window: Sliding window, shorter than the test prompts, where the release slides.
        vision: Vision-config fields replacing the release's (width, depth, image size).
        fields: Top-level fields replacing the release's (image tokens per image at the reduced image
            size); anyres tile grids are rescaled to the reduced image size by themselves.
    """

    layers: int = 2
    head_dim: int = 16
    heads: int = 4
    window: int = 16
    vision: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StandIn:
    """A family's release and how its stand-in is built offline.

    Attributes:
        release: The release's config (``config.json`` fields that shape the model).
        reduction: How it shrinks.
        tokenizer: ``words -> tokenizer``: a byte-level BPE tokenizer (:func:`bpe_tokenizer`) with the
            release's special tokens and BOS behaviour.
        token_fields: ``tokenizer -> config fields`` naming the image (and video) tokens.
        processor: ``(config dict, tokenizer) -> processor``: the release's processor classes, image
            sizes and tokens per image read from the config.
    """

    release: dict[str, Any]
    reduction: Reduction
    tokenizer: Callable[[Sequence[str] | None], Any]
    token_fields: Callable[[Any], dict[str, Any]]
    processor: Callable[[dict[str, Any], Any], Any]


def _even(value: float) -> int:
    return max(2, 2 * round(value / 2))


def reduce_release(release: dict[str, Any], reduction: Reduction, num_layers: int | None = None,
                   vocab_size: int | None = None) -> dict[str, Any]:
    """The release config at reduced width and depth, its structure kept.

    Args:
        release: The release's config (``text_config`` and ``vision_config`` as in ``config.json``).
        reduction: The sizes.
        num_layers: Decoder layers instead of ``reduction.layers``.
        vocab_size: The stand-in tokenizer's size (default: the release's vocabulary).

    Returns:
        A config dict for the family's config class (token ids still the release's).
    """
    text = dict(release["text_config"])
    heads = text["num_attention_heads"]
    ratio = heads // (text.get("num_key_value_heads") or heads)
    kv_heads = max(1, reduction.heads // ratio)
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    # hidden : heads x head_dim stays the release's (2560 : 2048 for Gemma-3-4B, 2560 : 4096 for Qwen3-VL-4B).
    hidden = _even(text["hidden_size"] * kv_heads * ratio * reduction.head_dim / (heads * head_dim))
    layers = num_layers or reduction.layers
    text.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=kv_heads * ratio,
                num_key_value_heads=kv_heads, head_dim=reduction.head_dim,
                intermediate_size=_even(text["intermediate_size"] * hidden / text["hidden_size"]))
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:layers]
    if text.get("sliding_window") and text.get("use_sliding_window", True):
        text["sliding_window"] = reduction.window
    if text.get("query_pre_attn_scalar") == head_dim:
        text["query_pre_attn_scalar"] = reduction.head_dim
    if "mrope_section" in (text.get("rope_scaling") or {}):
        sections = [s * reduction.head_dim / head_dim for s in text["rope_scaling"]["mrope_section"]]
        if any(s != int(s) for s in sections):
            raise ValueError(f"head_dim {reduction.head_dim} splits the rotary sections unevenly: {sections}")
        text["rope_scaling"] = dict(text["rope_scaling"], mrope_section=[int(s) for s in sections])
    vision = {**release["vision_config"], **reduction.vision}
    if "out_hidden_size" in vision:
        vision["out_hidden_size"] = hidden
    reduced = {**release, "text_config": text, "vision_config": vision, **reduction.fields}
    if "image_grid_pinpoints" in release:  # anyres: the same tile grids, of reduced tiles
        tile, old = vision["image_size"], release["vision_config"]["image_size"]
        reduced["image_grid_pinpoints"] = [[h * tile // old, w * tile // old] for h, w in release["image_grid_pinpoints"]]
    return reduced


def bpe_tokenizer(tokenizer_class: str, words: Sequence[str] | None, special_tokens: Sequence[str],
                  bos: str | None = None, **options: Any) -> Any:
    """A stand-in tokenizer: byte-level BPE learnt on the answers' first tokens
    (:func:`mfv.models.tokenizer.train_bpe_tokenizer`), wrapped in the release's class.

    Args:
        tokenizer_class: The release's fast tokenizer class in transformers (``"LlamaTokenizerFast"``).
        words: Object names, the answers (default: all of them).
        special_tokens: The release's special tokens the prompts use (never split).
        bos: The BOS token the release's tokenizer adds in front of every text (``None``: none).
        **options: Keyword options of the class (``eos_token``, ``extra_special_tokens``).
    """
    import transformers

    from mfv.vocabulary import OBJECT_NAMES

    specials = ["<PAD>", *([bos] if bos else []), *special_tokens]
    core = train_bpe_tokenizer(OBJECT_NAMES if words is None else words, specials)
    # Llama and Gemma classes add BOS by a post-processor of their own (``legacy`` only silences a notice).
    add_bos = ({"add_bos_token": bos is not None, "legacy": True}
               if tokenizer_class in ("LlamaTokenizerFast", "GemmaTokenizerFast") else {})
    tokenizer = getattr(transformers, tokenizer_class)(tokenizer_object=core, pad_token="<PAD>", bos_token=bos,
                                                       **add_bos, **options)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)},
                                 replace_additional_special_tokens=False)
    tokenizer.padding_side = "left"
    return tokenizer


def build_stand_in(family: Family, words: Sequence[str] | None = None, num_layers: int | None = None,
                   attn_implementation: str = "eager", seed: int = 0) -> HFAdapter:
    """A random model of ``family`` at its release's structure, reduced, with an offline tokenizer and
    the release's processor classes.

    Args:
        family: The family.
        words: Object names of the tokenizer (default: all).
        num_layers: Decoder layers instead of the family's reduction.
        attn_implementation: ``eager`` or ``sdpa`` (``from_pretrained`` gives sdpa).
        seed: Seed of the random weights.
    """
    from mfv.models.hf import random_model

    parts = family.stand_in
    tokenizer = parts.tokenizer(words)
    config = reduce_release(parts.release, parts.reduction, num_layers, len(tokenizer))
    config.update(parts.token_fields(tokenizer))
    processor = parts.processor(config, tokenizer)
    return random_model(family, family.config_type()(**config), processor, seed, attn_implementation)


def write_release_layout(family: Family, out: str | Path, config: dict[str, Any] | None = None,
                         dtype: str = "bfloat16", seed: int = 0) -> Path:
    """``save_pretrained`` of a random ``family`` model with ``config`` (default: the release's) and of
    the stand-in processor made for that config: the folder a user's download is."""
    parts = family.stand_in
    tokenizer = parts.tokenizer(None)
    config = {**(config or parts.release), **parts.token_fields(tokenizer)}
    processor = parts.processor(config, tokenizer)
    torch.manual_seed(seed)
    # Built directly in the release dtype: a float32 copy of 4B parameters would double the memory.
    model = family.model_type()._from_config(family.config_type()(**config), dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return Path(out)
