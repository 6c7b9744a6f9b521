"""InternVL 3 (the ``-hf`` releases): InternViT vision tower, pixel-shuffle MLP projector, a
Qwen2.5 language model; ``<IMG_CONTEXT>`` expanded by the processor to ``<img>`` + image tokens +
``</img>``. One 448x448 tile per image (``crop_to_patches`` off): ``pixel_values`` per image."""

from __future__ import annotations

from typing import Sequence

from mfv.models.hf import SYSTEM_PROMPT, Family, HFAdapter, load_family, random_model

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

# Tiles would make the patches per image vary, which per-image pixel_values cannot select by row.
FAMILY = Family("internvl", "InternVLForConditionalGeneration", "OpenGVLab/InternVL3-2B-hf",
                "mfv.models.families.internvl:tiny", call_options={"crop_to_patches": False})


def load(model_path: str = FAMILY.default_path, cache_dir: str | None = None, dtype: str = "bfloat16",
         system_prompt: str = SYSTEM_PROMPT) -> HFAdapter:
    """InternVL 3 (``-hf`` layout) from a local folder or the Hugging Face cache (no network)."""
    return load_family(FAMILY, model_path, cache_dir, dtype, system_prompt)


def tiny(words: Sequence[str] | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, image_size: int = 32, seed: int = 0) -> HFAdapter:
    """A tiny random InternVL: word-level tokenizer, the real image, video and processor classes."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, Qwen2TokenizerFast
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from mfv.models.tokenizer import build_word_tokenizer, prompt_words

    base = build_word_tokenizer([*prompt_words(words), "system", "user", "assistant"])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=base._tokenizer, unk_token="<unk>", pad_token="<PAD>",
                                   eos_token="<|im_end|>", bos_token=None, extra_special_tokens=IMAGE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values()]})
    patch_size, downsample = 8, 0.5
    images = GotOcr2ImageProcessor(size={"height": image_size, "width": image_size})
    processor = InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=InternVLVideoProcessor(),
                                  chat_template=CHAT_TEMPLATE,
                                  image_seq_length=int((image_size // patch_size) ** 2 * downsample**2))
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[image_size, image_size], patch_size=[patch_size, patch_size]),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=4096),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=downsample,
        image_seq_length=int((image_size // patch_size) ** 2 * downsample**2))
    return random_model(FAMILY, config, processor, seed)
