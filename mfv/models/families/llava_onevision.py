"""LLaVA-OneVision: SigLIP vision tower, MLP projector, a Qwen2 language model; ``<image>``
expanded by the processor (anyres tiles plus newlines for a row's only image, the base tile plus
a newline for each of several); ``pixel_values`` per image (tiles zero-padded), ``image_sizes``
per image, ``batch_num_images`` per row."""

from __future__ import annotations

from typing import Sequence

from mfv.models.hf import SYSTEM_PROMPT, Family, HFAdapter, load_family, random_model

# The release's ChatML template, except that each image stays where it is (the release's moves
# every image of a turn before its texts, which would part demonstrations from their images).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{{ '\n' + c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILY = Family("llava-onevision", "LlavaOnevisionForConditionalGeneration",
                "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "mfv.models.families.llava_onevision:tiny",
                images_by_prompt=True, chat_template=CHAT_TEMPLATE)


def load(model_path: str = FAMILY.default_path, cache_dir: str | None = None, dtype: str = "bfloat16",
         system_prompt: str = SYSTEM_PROMPT) -> HFAdapter:
    """LLaVA-OneVision from a local folder or the Hugging Face cache (no network)."""
    return load_family(FAMILY, model_path, cache_dir, dtype, system_prompt)


def tiny(words: Sequence[str] | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, image_size: int = 32, seed: int = 0) -> HFAdapter:
    """A tiny random LLaVA-OneVision: word-level tokenizer, the real image, video and processor
    classes; tiles of ``image_size`` on a 2x2 grid at most."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              Qwen2TokenizerFast)
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from mfv.models.tokenizer import build_word_tokenizer, prompt_words

    base = build_word_tokenizer([*prompt_words(words), "system", "user", "assistant"])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=base._tokenizer, unk_token="<unk>", pad_token="<PAD>",
                                   eos_token="<|im_end|>", bos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]})
    patch_size, pinpoints = 8, [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]
    tokens = (image_size // patch_size) ** 2
    images = LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                          image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=tokens,
                                        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=4096),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints, image_seq_length=tokens)
    return random_model(FAMILY, config, processor, seed)
