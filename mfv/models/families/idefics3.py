"""Idefics3 and SmolVLM: SigLIP vision tower, pixel-shuffle connector, a Llama-style language
model; ``<image>`` expanded by the processor to ``<fake_token_around_image><global-img>`` plus
the image tokens; ``pixel_values`` per row ``(B, images, C, H, W)`` zero-padded, with a mask."""

from __future__ import annotations

from typing import Sequence

from mfv.models.hf import SYSTEM_PROMPT, Family, HFAdapter, load_family, random_model

# SmolVLM-Instruct's chat template (Idefics3-8B's differs only in its first token).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

FAMILY = Family("idefics3", "Idefics3ForConditionalGeneration", "HuggingFaceTB/SmolVLM-Instruct",
                "mfv.models.families.idefics3:tiny", layers="model.text_model.layers", images="per_row")


def load(model_path: str = FAMILY.default_path, cache_dir: str | None = None, dtype: str = "bfloat16",
         do_image_splitting: bool = True, system_prompt: str = SYSTEM_PROMPT) -> HFAdapter:
    """Idefics3 / SmolVLM from a local folder or the Hugging Face cache (no network);
    ``do_image_splitting=False`` gives each image one global crop (fewer tokens)."""
    return load_family(FAMILY, model_path, cache_dir, dtype, system_prompt, do_image_splitting=do_image_splitting)


def tiny(words: Sequence[str] | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, image_size: int = 32, seed: int = 0) -> HFAdapter:
    """A tiny random Idefics3: word-level tokenizer, the real image processor (no splitting) and processor."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    from mfv.models.tokenizer import build_word_tokenizer, prompt_words

    tokenizer = build_word_tokenizer([*prompt_words(words), "System", "User", "Assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<global-img>"]},
                                 replace_additional_special_tokens=False)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    patch_size, scale_factor = 8, 2
    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": image_size},
                                    max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                  image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id),
        scale_factor=scale_factor, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id)
    return random_model(FAMILY, config, processor, seed)
