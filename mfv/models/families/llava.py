"""LLaVA-1.5 (and LLaVA models of the same layout): CLIP vision tower, MLP projector, a
Llama/Vicuna language model; ``<image>`` expanded by the processor; one image tensor per image."""

from __future__ import annotations

from typing import Any, Sequence

from mfv.models.hf import SYSTEM_PROMPT, Family, HFAdapter, load_family, random_model

# LLaVA-1.5's conversation format as a chat template (the released processors ship one).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% else %}{{ message['role'].upper() }}: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The released llava-hf template puts every image of a turn first; this one keeps each in place.
FAMILY = Family("llava", "LlavaForConditionalGeneration", "llava-hf/llava-1.5-7b-hf", "mfv.models.families.llava:tiny",
                chat_template=CHAT_TEMPLATE)


def load(model_path: str = FAMILY.default_path, cache_dir: str | None = None, dtype: str = "bfloat16",
         system_prompt: str = SYSTEM_PROMPT) -> HFAdapter:
    """A LLaVA model from a local folder or the Hugging Face cache (no network)."""
    return load_family(FAMILY, model_path, cache_dir, dtype, system_prompt)


def tiny(words: Sequence[str] | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         image_size: int = 32, seed: int = 0) -> HFAdapter:
    """A tiny random LLaVA: word-level tokenizer, the real CLIP image processor and processor."""
    from transformers import CLIPImageProcessor, LlamaTokenizerFast, LlavaConfig, LlavaProcessor

    from mfv.models.tokenizer import build_word_tokenizer, prompt_words

    base = build_word_tokenizer([*prompt_words(words), "USER", "ASSISTANT"])
    tokenizer = LlamaTokenizerFast(tokenizer_object=base._tokenizer, unk_token="<unk>", pad_token="<PAD>",
                                   eos_token="<|endoftext|>", bos_token=None, add_bos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=16, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_heads, max_position_embeddings=2048),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    return random_model(FAMILY, config, processor, seed)
