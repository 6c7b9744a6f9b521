"""Qwen3-VL backbone adapter (transformers' ``Qwen3VLForConditionalGeneration``).

Prompts go through the chat template as in the paper's v2: a system message with the
answer template, then one user turn with the images interleaved with ``Q:{a}. A:{b}.``
lines and the query last, then the generation prompt. Per-head site: the input of each
decoder layer's ``self_attn.o_proj`` (query heads; keys and values are grouped).
Images are capped at 256*28*28 pixels by default, as in the paper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mfv.compat import offline_hub
from mfv.errors import ConfigError, MissingWeightsError
from mfv.hooks import keep_input_contiguous
from mfv.models.base import BackboneAdapter, Example, PrefixState, Prompt, PromptBatch

# The authors' system message and pixel budget (min = max: every image gets the same token count).
SYSTEM_PROMPT = "Use the following template to answer the question:\nQ:object1. A:object2"
PAPER_MAX_PIXELS = 256 * 28 * 28
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen3VLAdapter(BackboneAdapter):
    """Adapter for Qwen3-VL models.

    Args:
        model: A ``Qwen3VLForConditionalGeneration``.
        processor: Its ``Qwen3VLProcessor`` (tokenizer, image processor, chat template).
        backbone_id: Name stored with function vectors.
        system_prompt: The answer template sent as the system message.
    """

    def __init__(self, model: nn.Module, processor: Any, backbone_id: str = "qwen3vl",
                 system_prompt: str = SYSTEM_PROMPT) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.backbone_id = backbone_id
        self.system_prompt = system_prompt
        self.text_config = model.config.text_config
        # Batched last-position logits without a copy of the head's weight per row (see the hook).
        self._head_hook = keep_input_contiguous(model.get_output_embeddings())

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def _layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def head_site(self, layer: int) -> nn.Module:
        return self._layers[layer].self_attn.o_proj

    def residual_site(self, layer: int) -> nn.Module:
        return self._layers[layer]

    # ----- prompts -----------------------------------------------------------------
    def build_prompt(self, demonstrations: Sequence[Example], query: Example) -> Prompt:
        content: list[dict[str, str]] = []
        for demo in demonstrations:
            content += [{"type": "image"}, {"type": "text", "text": f"Q:{demo.question}. A:{demo.answer}.\n"}]
        content += [{"type": "image"}, {"type": "text", "text": f"Q:{query.question}. A:"}]
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": content},
        ]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Prompt(text=text, images=[d.image for d in demonstrations] + [query.image])

    def collate(self, prompts: Sequence[Prompt]) -> PromptBatch:
        images = [self._as_pil(im) for p in prompts for im in p.images]
        out = self.processor(text=[p.text for p in prompts], images=images, padding=True, return_tensors="pt")
        return PromptBatch(
            out["input_ids"], out["attention_mask"], out["pixel_values"],
            {"image_grid_thw": out["image_grid_thw"],
             "images_per_row": torch.tensor([len(p.images) for p in prompts])},
        )

    @staticmethod
    def _as_pil(image: Any) -> Any:
        if isinstance(image, torch.Tensor):
            raise TypeError("the Qwen3-VL adapter preprocesses PIL images itself; pass PIL images")
        return image

    def select_rows(self, batch: PromptBatch, rows: torch.Tensor) -> PromptBatch:
        """Rows of a batch; image patches and grids are per image, not per row."""
        grids = batch.extra["image_grid_thw"]
        per_row = batch.extra["images_per_row"]
        image_start = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
        patches = grids.prod(-1)
        patch_start = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
        image_ids = torch.cat([torch.arange(image_start[r], image_start[r + 1]) for r in rows.tolist()])
        patch_ids = torch.cat([torch.arange(patch_start[i], patch_start[i + 1]) for i in image_ids.tolist()])
        return PromptBatch(
            batch.input_ids[rows], batch.attention_mask[rows], batch.pixel_values[patch_ids],
            {"image_grid_thw": grids[image_ids], "images_per_row": per_row[rows]},
        )

    # ----- forward -----------------------------------------------------------------
    def _vision_kwargs(self, batch: PromptBatch) -> dict[str, torch.Tensor]:
        return {"pixel_values": batch.pixel_values.to(self.dtype), "image_grid_thw": batch.extra["image_grid_thw"]}

    def forward(self, batch: PromptBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **self._vision_kwargs(batch),
                         use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, batch: PromptBatch, max_new_tokens: int = 5, min_new_tokens: int = 0) -> torch.Tensor:
        batch = batch.to(self.device)
        out = self.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  **self._vision_kwargs(batch), max_new_tokens=max_new_tokens,
                                  min_new_tokens=min_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return out[:, batch.input_ids.shape[1]:]

    def prefill(self, batch: PromptBatch) -> PrefixState:
        from transformers import DynamicCache

        batch = batch.to(self.device)
        # Multimodal rotary positions of the whole prompt, computed once.
        positions, _ = self.model.model.get_rope_index(
            batch.input_ids, batch.extra["image_grid_thw"], None, attention_mask=batch.attention_mask
        )
        out = self.model(
            input_ids=batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
            position_ids=positions[..., :-1], **self._vision_kwargs(batch),
            past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1,
        )
        cache = out.past_key_values
        data = {
            "keys": [layer.keys for layer in cache.layers],
            "values": [layer.values for layer in cache.layers],
            "last_ids": batch.input_ids[:, -1:],
            "attention_mask": batch.attention_mask,
            "positions": positions[..., -1:],
        }
        return PrefixState(data=data, batch_size=len(batch))

    def forward_last(self, state: PrefixState, rows: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        data = state.data
        rows = rows.to(self.device)
        cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in zip(data["keys"], data["values"])])
        out = self.model(
            input_ids=data["last_ids"][rows], attention_mask=data["attention_mask"][rows],
            position_ids=data["positions"][:, rows], past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1]


def _processor_error(path: str, exc: Exception) -> MissingWeightsError:
    return MissingWeightsError(
        f"Qwen3-VL weights not found at {path} (model.backbone_options.model_path). Download them where you have "
        f"network: `huggingface-cli download {path}`, or point model_path at a local folder."
    )


def load_qwen3vl(
    model_path: str = "Qwen/Qwen3-VL-4B-Instruct",
    cache_dir: str | None = None,
    dtype: str = "bfloat16",
    max_pixels: int = PAPER_MAX_PIXELS,
    min_pixels: int = PAPER_MAX_PIXELS,
    system_prompt: str = SYSTEM_PROMPT,
) -> Qwen3VLAdapter:
    """Loads a Qwen3-VL model and processor from a local folder or the Hugging Face cache (no network)."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    looks_local = model_path.startswith((".", "/", "~")) or Path(model_path).expanduser().exists()
    if looks_local and not Path(model_path).expanduser().is_dir():
        raise _processor_error(model_path, FileNotFoundError(model_path))
    try:
        with offline_hub():
            # use_fast: transformers' default since 4.52; saying so silences its notice.
            processor = AutoProcessor.from_pretrained(model_path, cache_dir=cache_dir, local_files_only=True,
                                                      use_fast=True, min_pixels=min_pixels, max_pixels=max_pixels)
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                model_path, cache_dir=cache_dir, local_files_only=True, dtype=getattr(torch, dtype)
            )
    except (OSError, ValueError) as exc:  # the hub raises ValueError subclasses for bad local paths
        raise _processor_error(model_path, exc) from exc
    adapter = Qwen3VLAdapter(model, processor, backbone_id=model_path.rstrip("/").split("/")[-1].lower(),
                             system_prompt=system_prompt)
    adapter.freeze()
    return adapter


def random_qwen3vl(
    words: Sequence[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    max_pixels: int = 64 * 64,
    seed: int = 0,
) -> Qwen3VLAdapter:
    """A tiny random Qwen3-VL with a tokenizer, image processor and chat template built in code."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = stand_in_processor(words, max_pixels=max_pixels)
    ids = special_token_ids(processor.tokenizer)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(processor.tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            head_dim=head_dim, max_position_embeddings=4096,
            rope_scaling={"rope_type": "default", "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
                          "mrope_interleaved": True},
        ),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=hidden_size, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **ids,
    )
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    adapter = Qwen3VLAdapter(model, processor, backbone_id="qwen3vl-tiny")
    adapter.freeze()
    return adapter


SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def stand_in_processor(words: Sequence[str] | None = None, min_pixels: int = 32 * 32,
                       max_pixels: int = 64 * 64) -> Any:
    """A Qwen3-VL processor built in code: a word-level tokenizer over ``words`` (default: the
    object names) and the prompt's words, Qwen's special tokens, the real image processor
    (16-pixel patches, 2x2 merge) and the chat template. No download."""
    from transformers import Qwen2TokenizerFast, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from mfv.models.tokenizer import build_word_tokenizer

    if words is None:
        from mfv.vocabulary import OBJECT_NAMES

        words = OBJECT_NAMES
    prompt_words = [w.strip(".,:'<>") for w in SYSTEM_PROMPT.split()] + ["system", "user", "assistant"]
    base = build_word_tokenizer([*words, *prompt_words])
    tokenizer = Qwen2TokenizerFast(tokenizer_object=base._tokenizer, unk_token="<unk>", pad_token="<PAD>",
                                   eos_token="<|im_end|>", bos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    image_processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                            min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The config fields naming the image and video tokens, as ``tokenizer`` numbers them."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}


# Qwen/Qwen3-VL-4B-Instruct's config.json (text and vision towers). The token ids come from
# the tokenizer that is saved beside it (see write_qwen3vl_layout).
QWEN3VL_4B_INSTRUCT: dict[str, Any] = {
    "text_config": dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_theta=5000000, attention_bias=False, tie_word_embeddings=True,
        rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    ),
    "vision_config": dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, hidden_act="gelu_pytorch_tanh",
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
        num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
    ),
    "tie_word_embeddings": True,
}


def write_qwen3vl_layout(out: str | Path, config: dict[str, Any] | None = None, dtype: str = "bfloat16",
                         seed: int = 0) -> Path:
    """Writes a random Qwen3-VL in the published layout: ``save_pretrained`` of the model
    (safetensors shards, ``config.json``) and of a processor (tokenizer, image processor at
    the paper's pixel budget, chat template), the folder a user's download is.

    Args:
        out: The model folder (created).
        config: ``Qwen3VLConfig`` keyword arguments; default: Qwen3-VL-4B-Instruct's.
        dtype: The dtype the weights are built and saved in (the release is bfloat16).
        seed: Seed of the random weights.

    Returns:
        ``out``.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    out = Path(out)
    processor = stand_in_processor(min_pixels=PAPER_MAX_PIXELS, max_pixels=PAPER_MAX_PIXELS)
    config = Qwen3VLConfig(**(config or QWEN3VL_4B_INSTRUCT), **special_token_ids(processor.tokenizer))
    torch.manual_seed(seed)
    # Built directly in the release dtype: a float32 copy of 4B parameters would double the memory.
    model = Qwen3VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
