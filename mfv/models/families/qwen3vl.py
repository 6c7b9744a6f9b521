"""Qwen3-VL (paper v2): chat template with the authors' system message, multimodal rotary
positions, flattened patches; images capped at 256*28*28 pixels as in the paper."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mfv.models.hf import SYSTEM_PROMPT, Family, HFAdapter, load_family, random_model

PAPER_MAX_PIXELS = 256 * 28 * 28
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def rope_index(model: Any, batch: Any) -> torch.Tensor:
    """Multimodal rotary positions ``(3, B, S)`` of a left-padded batch."""
    return model.model.get_rope_index(batch.input_ids, batch.extra["image_grid_thw"], None,
                                      attention_mask=batch.attention_mask)[0]


FAMILY = Family("qwen3vl", "Qwen3VLForConditionalGeneration", "Qwen/Qwen3-VL-4B-Instruct",
                "mfv.models.families.qwen3vl:tiny", images="per_patch", positions=rope_index,
                processor_options={"min_pixels": PAPER_MAX_PIXELS, "max_pixels": PAPER_MAX_PIXELS})


def load(model_path: str = FAMILY.default_path, cache_dir: str | None = None, dtype: str = "bfloat16",
         max_pixels: int = PAPER_MAX_PIXELS, min_pixels: int = PAPER_MAX_PIXELS,
         system_prompt: str = SYSTEM_PROMPT) -> HFAdapter:
    """Qwen3-VL from a local folder or the Hugging Face cache (no network)."""
    return load_family(FAMILY, model_path, cache_dir, dtype, system_prompt, max_pixels=max_pixels, min_pixels=min_pixels)


def stand_in_processor(words: Sequence[str] | None = None, min_pixels: int = 32 * 32, max_pixels: int = 64 * 64,
                       processor_class: str = "Qwen3VLProcessor", patch_size: int = 16) -> Any:
    """A Qwen-VL processor built in code: word-level tokenizer, the real image processor."""
    import transformers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from mfv.models.tokenizer import build_word_tokenizer, prompt_words

    base = build_word_tokenizer([*prompt_words(words), "system", "user", "assistant"])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=base._tokenizer, unk_token="<unk>", pad_token="<PAD>",
                                   eos_token="<|im_end|>", bos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    images = Qwen2VLImageProcessor(patch_size=patch_size, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels,
                                   max_pixels=max_pixels)
    return getattr(transformers, processor_class)(image_processor=images, tokenizer=tokenizer,
                                                  video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The config fields naming the image and video tokens, as ``tokenizer`` numbers them."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


def tiny(words: Sequence[str] | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, head_dim: int = 16, max_pixels: int = 64 * 64, seed: int = 0) -> HFAdapter:
    """A tiny random Qwen3-VL (word-level tokenizer, real image processor and chat template)."""
    from transformers import Qwen3VLConfig

    processor = stand_in_processor(words, max_pixels=max_pixels)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=head_dim, max_position_embeddings=4096,
                         rope_scaling={"rope_type": "default", "mrope_interleaved": True,
                                       "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **token_ids(processor.tokenizer))
    return random_model(FAMILY, config, processor, seed)
