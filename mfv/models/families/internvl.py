"""InternVL 3 (the ``-hf`` releases): InternViT vision tower, pixel-shuffle MLP projector, a
Qwen2.5 language model; ``<IMG_CONTEXT>`` expanded by the processor to ``<img>`` + image tokens +
``</img>`` per tile. Each image is cut into tiles plus a thumbnail as the release does by default
(``crop_to_patches``, up to 12): ``pixel_values`` per tile. Its release: OpenGVLab/InternVL3-2B-hf
(12 query heads on 2 key-value heads, no BOS)."""

from __future__ import annotations

from typing import Any, Sequence

from mfv.models.families.release import Reduction, StandIn, bpe_tokenizer
from mfv.models.hf import Family

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
# InternVL3-*-hf's chat template (ChatML; an image is "<IMG_CONTEXT>\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# OpenGVLab/InternVL3-2B-hf's config.json (the token ids come from the saved tokenizer). transformers'
# convert_internvl_weights_to_hf.py copies the original llm_config into text_config and renames the
# InternViT's qkv_bias to attention_bias; InternVL3's llm_config (as printed for InternVL3-1B) declares
# dynamic rope scaling by 2 (the frequencies of the default rope below 32768 positions) and an untied
# lm_head, and its InternViT-300M-448px-V2_5 has qkv_bias true (InternVLVisionConfig defaults to False).
RELEASE: dict[str, Any] = {
    "text_config": dict(model_type="qwen2", vocab_size=151674, hidden_size=1536, intermediate_size=8960,
                        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
                        rope_scaling={"rope_type": "dynamic", "factor": 2.0}, tie_word_embeddings=False),
    "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          attention_bias=True, image_size=[448, 448], patch_size=[14, 14]),
    "downsample_ratio": 0.5, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default", "image_seq_length": 256, "tie_word_embeddings": False,
}


def tokenizer(words: Sequence[str] | None = None) -> Any:
    """Byte-level BPE in Qwen2's class, no BOS (as the release's)."""
    return bpe_tokenizer("Qwen2TokenizerFast", words, ["<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values()],
                         eos_token="<|im_end|>", extra_special_tokens=IMAGE_TOKENS)


def processor(config: dict[str, Any], tokenizer: Any) -> Any:
    """InternVL's image (tiling), video and processor classes at the config's tile size."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    height, width = config["vision_config"]["image_size"]
    images = GotOcr2ImageProcessor(size={"height": height, "width": width}, crop_to_patches=True)
    return InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=InternVLVideoProcessor(),
                             chat_template=CHAT_TEMPLATE, image_seq_length=config["image_seq_length"])


FAMILY = Family(
    "internvl", "InternVLForConditionalGeneration", "OpenGVLab/InternVL3-2B-hf",
    "InternVL 3 (-hf layout) from a local folder or the Hugging Face cache",
    StandIn(RELEASE, Reduction(heads=6,  # the release's 6 query heads per key-value head
                               # 28-pixel tiles: a 64-pixel image is 3x3 tiles + a thumbnail; 4x4 patches -> 4 tokens
                               vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=[28, 28], patch_size=[7, 7]),
                               fields={"image_seq_length": 4}),
            tokenizer, lambda tok: {"image_token_id": tok.convert_tokens_to_ids("<IMG_CONTEXT>")}, processor),
    images="per_tile", call_options={"crop_to_patches": True})
