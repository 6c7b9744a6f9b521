"""Gemma 3: SigLIP vision tower, pooled to ``mm_tokens_per_image`` soft tokens per image, a
Gemma 3 language model (sliding-window and global layers); ``<start_of_image>`` expanded by the
processor; per-token ``token_type_ids`` make each image's tokens attend to each other. Its
release: google/gemma-3-4b-it (8 heads x 256 = 2048 against a hidden size of 2560, 4 key-value
heads, 5 sliding-window layers of 1024 tokens to 1 global, qk-norm, tied embeddings, <bos> added)."""

from __future__ import annotations

from typing import Any, Sequence

from mfv.models.families.release import Reduction, StandIn, bpe_tokenizer
from mfv.models.hf import Family

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

# google/gemma-3-4b-it's config.json (the token ids come from the saved tokenizer).
RELEASE: dict[str, Any] = {
    "text_config": dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=1024, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}, rms_norm_eps=1e-6,
                        max_position_embeddings=131072, hidden_activation="gelu_pytorch_tanh",
                        tie_word_embeddings=True,  # Gemma3TextConfig's default, which the release keeps
                        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]),
    "vision_config": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          image_size=896, patch_size=14, vision_use_head=False),
    "mm_tokens_per_image": 256,
}


def tokenizer(words: Sequence[str] | None = None) -> Any:
    """Byte-level BPE in Gemma's class, adding ``<bos>`` as the release's tokenizer does."""
    return bpe_tokenizer("GemmaTokenizerFast", words,
                         ["<eos>", "<start_of_turn>", "<end_of_turn>", *IMAGE_TOKENS.values()], bos="<bos>",
                         eos_token="<eos>", extra_special_tokens=IMAGE_TOKENS)


def token_fields(tokenizer: Any) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    return {"boi_token_index": ids["boi_token"], "eoi_token_index": ids["eoi_token"],
            "image_token_index": ids["image_token"]}


def processor(config: dict[str, Any], tokenizer: Any) -> Any:
    """Gemma 3's image processor and processor at the config's image size and tokens per image."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    size = config["vision_config"]["image_size"]
    images = Gemma3ImageProcessor(size={"height": size, "width": size})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                           image_seq_length=config["mm_tokens_per_image"])


FAMILY = Family(
    "gemma3", "Gemma3ForConditionalGeneration", "google/gemma-3-4b-it",
    "Gemma 3 from a local folder or the Hugging Face cache",
    StandIn(RELEASE, Reduction(layers=6,  # one whole 5 sliding : 1 full pattern, a 16-token window
                               vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                               fields={"mm_tokens_per_image": 4}),  # 4x4 patches pooled to 2x2 (release 64x64 to 16x16)
            tokenizer, token_fields, processor),
    images_by_prompt=True)
