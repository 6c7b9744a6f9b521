"""LLaVA-OneVision: SigLIP vision tower, MLP projector, a Qwen2 language model; ``<image>``
expanded by the processor (anyres tiles plus newlines for a row's only image, the base tile plus
a newline for each of several); ``pixel_values`` per image (tiles zero-padded), ``image_sizes``
per image, ``batch_num_images`` per row. Its release: llava-hf/llava-onevision-qwen2-0.5b-ov-hf
(14 query heads on 2 key-value heads, anyres up to 6x6 tiles with at most 9 kept, no BOS)."""

from __future__ import annotations

from typing import Any, Sequence

from mfv.models.families.release import Reduction, StandIn, bpe_tokenizer
from mfv.models.hf import Family

# The release's ChatML template, except that each image stays where it is (the release's moves
# every image of a turn before its texts, which would part demonstrations from their images).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{{ '\n' + c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's config.json (the token ids come from the saved tokenizer).
RELEASE: dict[str, Any] = {
    "text_config": dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
                        tie_word_embeddings=True),
    "vision_config": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                          num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                          vision_use_head=False),
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
    "image_grid_pinpoints": [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)],
    "image_seq_length": 729, "projector_hidden_act": "gelu", "tie_word_embeddings": True,
}


def tokenizer(words: Sequence[str] | None = None) -> Any:
    """Byte-level BPE in Qwen2's class, no BOS (as the release's)."""
    return bpe_tokenizer("Qwen2TokenizerFast", words, ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                         eos_token="<|im_end|>")


def processor(config: dict[str, Any], tokenizer: Any) -> Any:
    """LLaVA-OneVision's image (anyres), video and processor classes at the config's tile size and grids."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    size = config["vision_config"]["image_size"]
    images = LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                          image_grid_pinpoints=config["image_grid_pinpoints"])
    return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                   video_processor=LlavaOnevisionVideoProcessor(),
                                   num_image_tokens=config["image_seq_length"],
                                   vision_feature_select_strategy=config["vision_feature_select_strategy"],
                                   chat_template=CHAT_TEMPLATE)


def token_fields(tokenizer: Any) -> dict[str, int]:
    return {"image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
            "video_token_index": tokenizer.convert_tokens_to_ids("<video>")}


FAMILY = Family(
    "llava-onevision", "LlavaOnevisionForConditionalGeneration", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "LLaVA-OneVision from a local folder or the Hugging Face cache",
    StandIn(RELEASE, Reduction(heads=7,  # the release's 7 query heads per key-value head
                               vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                               fields={"image_seq_length": 16}),  # 4x4 patches per tile (release 27x27)
            tokenizer, token_fields, processor),
    images_by_prompt=True, chat_template=CHAT_TEMPLATE)
