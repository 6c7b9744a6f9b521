"""Idefics3 and SmolVLM: SigLIP vision tower, pixel-shuffle connector, a Llama-style language
model; ``<image>`` expanded by the processor to ``<fake_token_around_image><global-img>`` plus
the image tokens; images split into tiles plus a global view as the release does by default;
``pixel_values`` per row ``(B, images, C, H, W)`` zero-padded, with a mask. Its release:
HuggingFaceTB/SmolVLM-Instruct (full multi-head attention, pixel shuffle by 3, no BOS)."""

from __future__ import annotations

from typing import Any, Sequence

from mfv.models.families.release import Reduction, StandIn, bpe_tokenizer
from mfv.models.hf import Family

# SmolVLM-Instruct's chat template (Idefics3-8B's differs only in its first token).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct's config.json (the token ids come from the saved tokenizer).
RELEASE: dict[str, Any] = {
    "text_config": dict(model_type="llama", vocab_size=49155, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                        max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=273768.0, tie_word_embeddings=False),
    "vision_config": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          image_size=384, patch_size=14),
    "scale_factor": 3, "tie_word_embeddings": False,
}
# The processor's tile grid markers, as the release's tokenizer holds them.
GRID_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


def tokenizer(words: Sequence[str] | None = None) -> Any:
    """Byte-level BPE, no BOS (as the release's), with the release's image and grid tokens."""
    specials = ["<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>",
                *GRID_TOKENS]
    return bpe_tokenizer("PreTrainedTokenizerFast", words, specials, eos_token="<end_of_utterance>",
                         model_input_names=["input_ids", "attention_mask"])


def processor(config: dict[str, Any], tokenizer: Any) -> Any:
    """Idefics3's image processor, splitting as the release (tiles of the vision image size; the
    release resizes to 4 tiles a side, the stand-in to 2) and its processor."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    vision = config["vision_config"]
    tile = vision["image_size"]
    images = Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 2 * tile},
                                    max_image_size={"longest_edge": tile})
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                             image_seq_len=(tile // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2)


FAMILY = Family(
    "idefics3", "Idefics3ForConditionalGeneration", "HuggingFaceTB/SmolVLM-Instruct",
    "Idefics3 / SmolVLM from a local folder or the Hugging Face cache",
    StandIn(RELEASE, Reduction(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           # 6x6 patches, shuffled by 3: 4 tokens per tile
                                           num_attention_heads=2, image_size=48, patch_size=8)),
            tokenizer, lambda tok: {"image_token_id": tok.convert_tokens_to_ids("<image>"),
                                    "pad_token_id": tok.pad_token_id}, processor),
    layers="model.text_model.layers", images="per_row", load_options={"do_image_splitting": True})
