"""Gemma 3: SigLIP vision tower, pooled to ``mm_tokens_per_image`` soft tokens per image, a
Gemma 3 language model (sliding-window and global layers); ``<start_of_image>`` expanded by the
processor; per-token ``token_type_ids`` make each image's tokens attend to each other."""

from __future__ import annotations

from typing import Sequence

from mfv.models.hf import SYSTEM_PROMPT, Family, HFAdapter, load_family, random_model

IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
# Gemma 3's chat template: the system message opens the first user turn; texts are trimmed.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

FAMILY = Family("gemma3", "Gemma3ForConditionalGeneration", "google/gemma-3-4b-it", "mfv.models.families.gemma3:tiny",
                images_by_prompt=True)


def load(model_path: str = FAMILY.default_path, cache_dir: str | None = None, dtype: str = "bfloat16",
         system_prompt: str = SYSTEM_PROMPT) -> HFAdapter:
    """Gemma 3 from a local folder or the Hugging Face cache (no network)."""
    return load_family(FAMILY, model_path, cache_dir, dtype, system_prompt)


def tiny(words: Sequence[str] | None = None, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, head_dim: int = 16, image_size: int = 32, sliding_window: int = 24,
         seed: int = 0) -> HFAdapter:
    """A tiny random Gemma 3: word-level tokenizer, the real image processor and processor; a short
    sliding window so that the stand-in's prompts cross it."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, GemmaTokenizerFast

    from mfv.models.tokenizer import build_word_tokenizer, prompt_words

    base = build_word_tokenizer([*prompt_words(words), "user", "model"])
    tokenizer = GemmaTokenizerFast(tokenizer_object=base._tokenizer, unk_token="<unk>", pad_token="<PAD>",
                                   bos_token="<bos>", eos_token="<eos>", extra_special_tokens=IMAGE_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>",
                                                                *IMAGE_TOKENS.values()]})
    tokens_per_image = 4  # pooled from (image_size / 8)^2 patches
    images = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                image_seq_length=tokens_per_image)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=head_dim, query_pre_attn_scalar=head_dim, max_position_embeddings=4096,
                         sliding_window=sliding_window,
                         layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)],
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=tokens_per_image, boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"])
    return random_model(FAMILY, config, processor, seed)
