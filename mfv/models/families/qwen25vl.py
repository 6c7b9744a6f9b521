"""Qwen2.5-VL: the Qwen chat template and system message, multimodal rotary positions (with the
video time argument), 14-pixel patches merged 2x2, flattened, a windowed vision tower. Its
release: Qwen/Qwen2.5-VL-3B-Instruct (16 query heads on 2 key-value heads)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from mfv.models.families.qwen3vl import PAPER_MAX_PIXELS, qwen_processor, qwen_tokenizer, token_ids
from mfv.models.families.release import Reduction, StandIn
from mfv.models.hf import Family

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (the token ids come from the saved tokenizer).
RELEASE: dict[str, Any] = {
    "text_config": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000,
                        max_window_layers=70, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                        use_sliding_window=False, tie_word_embeddings=True,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                          window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    "tie_word_embeddings": True,
}


def rope_index(model: Any, batch: Any) -> torch.Tensor:
    """Multimodal rotary positions ``(3, B, S)`` of a left-padded batch."""
    return model.model.get_rope_index(batch.input_ids, batch.extra["image_grid_thw"], None, None,
                                      batch.attention_mask)[0]


FAMILY = Family(
    "qwen2.5vl", "Qwen2_5_VLForConditionalGeneration", "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen2.5-VL from a local folder or the Hugging Face cache",
    StandIn(RELEASE, Reduction(heads=8,  # the release's 8 query heads per key-value head
                               vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                                           fullatt_block_indexes=[1])),
            qwen_tokenizer, token_ids, partial(qwen_processor, processor_class="Qwen2_5_VLProcessor")),
    images="per_patch", positions=rope_index,
    processor_options={"min_pixels": PAPER_MAX_PIXELS, "max_pixels": PAPER_MAX_PIXELS})
