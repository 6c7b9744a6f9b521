"""Published release configs of the Hugging Face families, for full-size rehearsals: a random
model with the release's config, saved as a download is (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfv.models.families import qwen3vl, qwen25vl
from mfv.models.hf import write_layout

# Qwen/Qwen3-VL-4B-Instruct's config.json (the token ids come from the saved tokenizer).
QWEN3VL_4B_INSTRUCT: dict[str, Any] = {
    "text_config": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                        max_position_embeddings=262144, rms_norm_eps=1e-6, rope_theta=5000000, attention_bias=False,
                        tie_word_embeddings=True,
                        rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
    "vision_config": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, hidden_act="gelu_pytorch_tanh",
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
                          num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    "tie_word_embeddings": True,
}

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (the token ids come from the saved tokenizer).
QWEN25VL_3B_INSTRUCT: dict[str, Any] = {
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


def write_qwen3vl_layout(out: str | Path, config: dict[str, Any] | None = None, dtype: str = "bfloat16") -> Path:
    """A random Qwen3-VL (default: the 4B-Instruct config) saved as a download is."""
    from transformers import Qwen3VLConfig

    processor = qwen3vl.stand_in_processor(min_pixels=qwen3vl.PAPER_MAX_PIXELS, max_pixels=qwen3vl.PAPER_MAX_PIXELS)
    config = Qwen3VLConfig(**(config or QWEN3VL_4B_INSTRUCT), **qwen3vl.token_ids(processor.tokenizer))
    return write_layout(qwen3vl.FAMILY, config, processor, out, dtype)


def write_qwen25vl_layout(out: str | Path, config: dict[str, Any] | None = None, dtype: str = "bfloat16") -> Path:
    """A random Qwen2.5-VL (default: the 3B-Instruct config) saved as a download is."""
    from transformers import Qwen2_5_VLConfig

    processor = qwen3vl.stand_in_processor(min_pixels=qwen3vl.PAPER_MAX_PIXELS, max_pixels=qwen3vl.PAPER_MAX_PIXELS,
                                           processor_class="Qwen2_5_VLProcessor", patch_size=14)
    config = Qwen2_5_VLConfig(**(config or QWEN25VL_3B_INSTRUCT), **qwen3vl.token_ids(processor.tokenizer))
    return write_layout(qwen25vl.FAMILY, config, processor, out, dtype)
