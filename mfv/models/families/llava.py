"""LLaVA-1.5 (and LLaVA models of the same layout): CLIP vision tower, MLP projector, a
Llama/Vicuna language model (full multi-head attention); ``<image>`` expanded by the processor
to one token per patch of the grid (576 for the release); one image tensor per image; the Llama
tokenizer adds ``<s>``."""

from __future__ import annotations

from typing import Any, Sequence

from mfv.models.families.release import Reduction, StandIn, bpe_tokenizer
from mfv.models.hf import Family

# LLaVA-1.5's conversation format as a chat template (the released processors ship one).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% else %}{{ message['role'].upper() }}: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's config.json (the token ids come from the saved tokenizer).
RELEASE: dict[str, Any] = {
    "text_config": dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "vision_config": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "image_seq_length": 576, "tie_word_embeddings": False,
}


def tokenizer(words: Sequence[str] | None = None) -> Any:
    """Byte-level BPE in the Llama class, adding ``<s>`` as the release's tokenizer does."""
    return bpe_tokenizer("LlamaTokenizerFast", words, ["</s>", "<image>"], bos="<s>",
                         eos_token="</s>")


def processor(config: dict[str, Any], tokenizer: Any) -> Any:
    """CLIP's image processor and LLaVA's processor at the config's image and patch sizes."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision = config["vision_config"]
    size = vision["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision["patch_size"],
                          vision_feature_select_strategy=config["vision_feature_select_strategy"],
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


# The released llava-hf template puts every image of a turn first; this one keeps each in place.
FAMILY = Family(
    "llava", "LlavaForConditionalGeneration", "llava-hf/llava-1.5-7b-hf",
    "LLaVA-1.5 from a local folder or the Hugging Face cache",
    StandIn(RELEASE, Reduction(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=42, projection_dim=32),  # a 3x3 grid
                               fields={"image_seq_length": 9}),
            tokenizer, lambda tok: {"image_token_index": tok.convert_tokens_to_ids("<image>")}, processor),
    chat_template=CHAT_TEMPLATE)
