"""Qwen2.5-VL: the Qwen chat template and system message, multimodal rotary positions
(with the video time argument), 14-pixel patches merged 2x2, flattened."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mfv.models.families.qwen3vl import PAPER_MAX_PIXELS, stand_in_processor, token_ids
from mfv.models.hf import SYSTEM_PROMPT, Family, HFAdapter, load_family, random_model


def rope_index(model: Any, batch: Any) -> torch.Tensor:
    """Multimodal rotary positions ``(3, B, S)`` of a left-padded batch."""
    return model.model.get_rope_index(batch.input_ids, batch.extra["image_grid_thw"], None, None,
                                      batch.attention_mask)[0]


FAMILY = Family("qwen2.5vl", "Qwen2_5_VLForConditionalGeneration", "Qwen/Qwen2.5-VL-3B-Instruct",
                "mfv.models.families.qwen25vl:tiny", images="per_patch", positions=rope_index,
                processor_options={"min_pixels": PAPER_MAX_PIXELS, "max_pixels": PAPER_MAX_PIXELS})


def load(model_path: str = FAMILY.default_path, cache_dir: str | None = None, dtype: str = "bfloat16",
         max_pixels: int = PAPER_MAX_PIXELS, min_pixels: int = PAPER_MAX_PIXELS,
         system_prompt: str = SYSTEM_PROMPT) -> HFAdapter:
    """Qwen2.5-VL from a local folder or the Hugging Face cache (no network)."""
    return load_family(FAMILY, model_path, cache_dir, dtype, system_prompt, max_pixels=max_pixels, min_pixels=min_pixels)


def tiny(words: Sequence[str] | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, max_pixels: int = 56 * 56, seed: int = 0) -> HFAdapter:
    """A tiny random Qwen2.5-VL (word-level tokenizer, real image processor and chat template)."""
    from transformers import Qwen2_5_VLConfig

    processor = stand_in_processor(words, min_pixels=28 * 28, max_pixels=max_pixels,
                                   processor_class="Qwen2_5_VLProcessor", patch_size=14)
    head_dim = hidden_size // num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size, window_size=56,
                           fullatt_block_indexes=[1]),
        **token_ids(processor.tokenizer))
    return random_model(FAMILY, config, processor, seed)
