"""Qwen3-VL (paper v2): chat template with the authors' system message, multimodal rotary
positions (interleaved sections), qk-norm, flattened patches; images capped at 256*28*28 pixels
as in the paper. Its release: Qwen/Qwen3-VL-4B-Instruct (32 heads x 128 = 4096 against a hidden
size of 2560, 8 key-value heads)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mfv.models.families.release import Reduction, StandIn, bpe_tokenizer
from mfv.models.hf import Family

PAPER_MAX_PIXELS = 256 * 28 * 28
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3-VL-4B-Instruct's config.json (the token ids come from the saved tokenizer).
RELEASE: dict[str, Any] = {
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


def rope_index(model: Any, batch: Any) -> torch.Tensor:
    """Multimodal rotary positions ``(3, B, S)`` of a left-padded batch."""
    return model.model.get_rope_index(batch.input_ids, batch.extra["image_grid_thw"], None,
                                      attention_mask=batch.attention_mask)[0]


def qwen_tokenizer(words: Sequence[str] | None = None) -> Any:
    """The Qwen stand-in tokenizer: byte-level BPE, no BOS (as the release's), ``<|im_end|>`` ends a turn."""
    return bpe_tokenizer("Qwen2TokenizerFast", words, SPECIAL_TOKENS, eos_token="<|im_end|>")


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The config fields naming the image and video tokens, as ``tokenizer`` numbers them."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def qwen_processor(config: dict[str, Any], tokenizer: Any, processor_class: str = "Qwen3VLProcessor",
                   min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The release's processor classes at the config's patch and merge sizes: images between one
    merged patch and 2x2 of them unless ``min_pixels`` / ``max_pixels`` say otherwise (the loader
    sets the paper's pixel budget)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vision = config["vision_config"]
    merged = vision["patch_size"] * vision["spatial_merge_size"]
    images = Qwen2VLImageProcessor(patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                                   merge_size=vision["spatial_merge_size"], min_pixels=min_pixels or merged**2,
                                   max_pixels=max_pixels or (2 * merged) ** 2)
    return getattr(transformers, processor_class)(image_processor=images, tokenizer=tokenizer,
                                                  video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


FAMILY = Family(
    "qwen3vl", "Qwen3VLForConditionalGeneration", "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen3-VL (paper v2) from a local folder or the Hugging Face cache",
    StandIn(RELEASE, Reduction(head_dim=32,  # 16 rotary pairs: the sections 24:20:20 stay integral (6:5:5)
                               vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                           num_position_embeddings=64, deepstack_visual_indexes=[0])),
            qwen_tokenizer, token_ids, qwen_processor),
    images="per_patch", positions=rope_index,
    processor_options={"min_pixels": PAPER_MAX_PIXELS, "max_pixels": PAPER_MAX_PIXELS})
