"""One adapter for Hugging Face image-text-to-text models, driven by a declarative :class:`Family`.

A family (``mfv/models/families/<name>.py``) says where things are and how prompts look:
the decoder layers (each layer's ``self_attn.o_proj`` is the per-head site; the residual site
is the layer itself), the chat template (a system message, one user turn), how
``pixel_values`` are laid out (per image, per patch with grids, per tile, or per row), how
positions are computed (rotary from the attention mask, or the model's multimodal rotary
index), and its release's config from which a reduced stand-in is built offline
(:mod:`mfv.models.families.release`). Everything else lives here once:

* ``forward``: the last position's logits of a left-padded batch, with explicit positions
  so that a row gives the same logits alone and in any batch;
* ``prefill`` / ``forward_last``: the contract's one last-position mechanism (the prompt
  once, into transformers' cache; then the last position for any rows under hooks), and on
  the same prefill the minimal path (the shared last-position replay, :mod:`mfv.models.replay`,
  running the family's own layers through :mod:`mfv.models.hf_last_position`: each row from its
  patched or injection layer up) on which fast AIE, the fine-tuning graph and shared
  evaluation passes run for every family;
* loading from a local folder or the Hugging Face cache, offline, naming what to download.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
from torch import nn

from mfv.compat import offline_hub
from mfv.errors import ConfigError, MissingWeightsError
from mfv.hooks import keep_input_contiguous
from mfv.models import replay
from mfv.models.base import BackboneAdapter, Example, LayerKind, MaskKind, PrefixState, Prompt, PromptBatch
from mfv.models.hf_last_position import HFLayers

if TYPE_CHECKING:
    from mfv.models.families.release import StandIn

# The authors' system message (paper v2): the answer template, the relation never stated.
SYSTEM_PROMPT = "Use the following template to answer the question:\nQ:object1. A:object2"


@dataclass(frozen=True)
class Family:
    """Where a Hugging Face vision-language family keeps what the method needs.

    Attributes:
        name: Registry name (``<name>-random`` is its stand-in).
        model_class: The transformers class (``"LlavaForConditionalGeneration"``).
        default_path: Hub id or folder loaded when none is given.
        description: One line for ``--help`` and error messages.
        stand_in: The release's config and how its reduced stand-in is built offline
            (:class:`mfv.models.families.release.StandIn`).
        layers: Attribute path from the model to the decoder layers (the final norm is beside them).
        images: ``per_image`` (``pixel_values`` one entry per image), ``per_patch`` (flattened
            patches, ``image_grid_thw`` per image), ``per_tile`` (a varying number of tiles per image,
            counted by the image processor) or ``per_row``.
        positions: ``rotary`` (from the attention mask) or a function ``(model, batch) ->
            position_ids`` (multimodal rotary, shaped ``(..., B, S)``).
        processor_options: Keyword options of ``AutoProcessor.from_pretrained`` (the loader takes them).
        load_options: Further processor options the loader takes (with their defaults).
        images_by_prompt: The processor takes images as one list per prompt (not one flat list).
        call_options: Keyword options of every processor call (they override the processor's defaults).
        chat_template: A chat template used instead of the processor's (e.g. one that keeps each
            image in place where the release's template moves every image first).
        layer_kinds: What each decoder layer attends to (:data:`~mfv.models.base.LayerKind`), a
            function of the text config (e.g. ``cross`` at its ``cross_attention_layers``);
            ``None``: self-attention only. The last-position replay reads it.
        attention_mask: ``causal`` or ``prefix_lm`` (the prompt attends both ways): under
            ``prefix_lm`` the family has no last-position replay (:func:`mfv.models.replay.replayable`).
    """

    name: str
    model_class: str
    default_path: str
    description: str
    stand_in: StandIn
    layers: str = "model.language_model.layers"
    images: Literal["per_image", "per_patch", "per_tile", "per_row"] = "per_image"
    positions: str | Callable[[nn.Module, PromptBatch], torch.Tensor] = "rotary"
    processor_options: dict[str, Any] = field(default_factory=dict)
    load_options: dict[str, Any] = field(default_factory=dict)
    images_by_prompt: bool = False
    call_options: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    layer_kinds: Callable[[Any], Sequence[LayerKind]] | None = None
    attention_mask: MaskKind = "causal"

    def model_type(self) -> type:
        return getattr(importlib.import_module("transformers"), self.model_class)

    def config_type(self) -> type:
        return self.model_type().config_class


# Batch entries mfv adds for selecting rows; the model never takes them.
_BOOKKEEPING = ("images_per_row", "tiles_per_image")


def _path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


class HFAdapter(BackboneAdapter):
    """The adapter of every :class:`Family`.

    Args:
        model: The ``...ForConditionalGeneration`` model.
        processor: Its processor (tokenizer, image processor, chat template).
        family: The family's description.
        backbone_id: Name stored with function vectors.
        system_prompt: The system message of ``chat`` prompts.
    """

    def __init__(self, model: nn.Module, processor: Any, family: Family, backbone_id: str | None = None,
                 system_prompt: str = SYSTEM_PROMPT) -> None:
        self.model = model
        self.processor = processor
        self.family = family
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.backbone_id = backbone_id or family.name
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
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        kinds = self.family.layer_kinds
        return super().layer_kinds if kinds is None else tuple(kinds(self.text_config))

    @property
    def attention_mask_kind(self) -> MaskKind:
        return self.family.attention_mask

    @property
    def layers(self) -> nn.ModuleList:
        """The language model's decoder layers."""
        return _path(self.model, self.family.layers)

    @property
    def final_norm(self) -> nn.Module:
        """The norm between the last decoder layer and the output embeddings."""
        return _path(self.model, self.family.layers.rsplit(".", 1)[0] + ".norm")

    def attention(self, layer: int) -> nn.Module:
        """The attention module of ``layer`` (the parent of its output projection)."""
        return self.layers[layer].self_attn

    def head_site(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn.o_proj

    def residual_site(self, layer: int) -> nn.Module:
        return self.layers[layer]

    # ----- prompts -----------------------------------------------------------------
    def build_prompt(self, demonstrations: Sequence[Example], query: Example) -> Prompt:
        pairs = [(d.image, f"Q:{d.question}. A:{d.answer}.\n") for d in demonstrations]
        pairs.append((query.image, f"Q:{query.question}. A:"))
        images = [image for image, _ in pairs]
        content: list[dict[str, str]] = []
        for _, text in pairs:
            content += [{"type": "image"}, {"type": "text", "text": text}]
        messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
                    {"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, chat_template=self.family.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and self.tokenizer("")["input_ids"][:1] == [self.tokenizer.bos_token_id]:
            text = text[len(bos):]  # the template writes BOS and the tokenizer adds it again: keep one
        return Prompt(text, images)

    def collate(self, prompts: Sequence[Prompt]) -> PromptBatch:
        images = [image for p in prompts for image in p.images]
        if any(isinstance(image, torch.Tensor) for image in images):
            raise TypeError(f"the {self.family.name} adapter preprocesses PIL images itself; pass PIL images")
        by_prompt = [list(p.images) for p in prompts] if self.family.images_by_prompt else images
        out = self.processor(text=[p.text for p in prompts], images=by_prompt, padding=True, return_tensors="pt",
                             **self.family.call_options)
        extra = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "pixel_values")
                 and isinstance(v, torch.Tensor)}
        extra["images_per_row"] = torch.tensor([len(p.images) for p in prompts])
        if self.family.images == "per_tile":  # the processor does not return its tile counts
            count = self.processor.image_processor.get_number_of_image_patches
            extra["tiles_per_image"] = torch.tensor([count(i.height, i.width, self.family.call_options) for i in images])
        return PromptBatch(out["input_ids"], out["attention_mask"], out["pixel_values"], extra)

    def select_rows(self, batch: PromptBatch, rows: torch.Tensor) -> PromptBatch:
        """Rows of a batch: per-row tensors by row, per-image tensors by the rows' images,
        flattened patches by the rows' images' patches."""
        per_row = batch.extra["images_per_row"]
        start = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])
        image_ids = torch.cat([torch.arange(start[r], start[r + 1]) for r in rows.tolist()])
        count, total = len(batch), int(per_row.sum())

        def pick(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if name == "pixel_values" and self.family.images in ("per_patch", "per_tile"):
                patches = (batch.extra["image_grid_thw"].prod(-1) if self.family.images == "per_patch"
                           else batch.extra["tiles_per_image"])
                first = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
                return tensor[torch.cat([torch.arange(first[i], first[i + 1]) for i in image_ids.tolist()])]
            per_image = self.family.images != "per_row" and name != "images_per_row" and total != count
            return tensor[image_ids] if per_image and tensor.shape[0] == total else tensor[rows]

        extra = {name: pick(name, value) for name, value in batch.extra.items()}
        return PromptBatch(batch.input_ids[rows], batch.attention_mask[rows], pick("pixel_values", batch.pixel_values),
                           extra)

    # ----- forward -----------------------------------------------------------------
    def _inputs(self, batch: PromptBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-token inputs (ids, mask, positions, token types) and the vision inputs."""
        per_token = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                     "position_ids": self._positions(batch)}
        vision = {"pixel_values": batch.pixel_values.to(self.dtype)}
        for name, value in batch.extra.items():
            if name in _BOOKKEEPING:
                continue
            if value.shape == batch.input_ids.shape:
                per_token[name] = value
            else:
                vision[name] = value.to(self.dtype) if value.is_floating_point() else value
        return per_token, vision

    def _positions(self, batch: PromptBatch) -> torch.Tensor:
        if self.family.positions == "rotary":
            # Rotary positions must count real tokens only, or left padding shifts them.
            return (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.family.positions(self.model, batch)

    def forward(self, batch: PromptBatch) -> torch.Tensor:
        per_token, vision = self._inputs(batch.to(self.device))
        out = self.model(**per_token, **vision, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, batch: PromptBatch, max_new_tokens: int = 5, min_new_tokens: int = 0) -> torch.Tensor:
        batch = batch.to(self.device)
        per_token, vision = self._inputs(batch)
        per_token.pop("position_ids")  # generation continues positions itself
        out = self.model.generate(**per_token, **vision, max_new_tokens=max_new_tokens,
                                  min_new_tokens=min_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return out[:, batch.input_ids.shape[1]:]

    def prefill(self, batch: PromptBatch) -> PrefixState:
        """The whole prompt once (:meth:`mfv.models.hf_last_position.HFLayers.prefill`): the cache
        for :meth:`forward_last`, the last-position replay state and the unsteered logits."""
        return HFLayers(self).prefill(batch.to(self.device))

    def steered_logits(self, state: PrefixState, vectors: torch.Tensor, layers: list[int]) -> torch.Tensor | None:
        """Only the last position from ``layers[0] + 1`` up is recomputed (and carries a graph)
        (:func:`mfv.models.replay.steered_logits`)."""
        minimal = state.data.get("minimal")
        return None if minimal is None else replay.steered_logits(HFLayers(self), minimal, vectors, layers)

    def single_head_patch_probabilities(self, batch: PromptBatch, values: torch.Tensor,
                                        answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The minimal exact computation (:func:`mfv.models.replay.single_head_patch_probabilities`)."""
        return replay.single_head_patch_probabilities(HFLayers(self), batch, values, answers)

    def forward_last(self, state: PrefixState, rows: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        data = state.data
        rows = rows.to(self.device)
        cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in zip(data["keys"], data["values"])])
        last = {k: v.index_select(-2, rows) for k, v in data["last"].items()}
        out = self.model(**last, attention_mask=data["attention_mask"][rows], past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]


def _missing(family: Family, path: str) -> MissingWeightsError:
    local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    fix = (f"check that {path} holds config.json, the processor files and the weights"
           if local else f"download them where you have network: `huggingface-cli download {path}`")
    return MissingWeightsError(f"{family.name} weights not found at {path} (model.backbone_options.model_path); {fix}")


def load_family(family: Family, model_path: str | None = None, cache_dir: str | None = None,
                dtype: str = "bfloat16", system_prompt: str = SYSTEM_PROMPT, **processor_options: Any) -> HFAdapter:
    """Loads a family's model and processor from a local folder or the Hugging Face cache (no network).

    Every family's registry loader is this function with its family bound.

    Args:
        family: The family.
        model_path: Hub id or folder (default: the family's).
        cache_dir: Hugging Face cache folder (default: the standard one).
        dtype: ``float32``, ``bfloat16`` or ``float16``; weights are built in it.
        system_prompt: The system message of chat prompts.
        **processor_options: Processor options over the family's (its ``processor_options`` and
            ``load_options``, e.g. ``max_pixels``, ``do_image_splitting``).

    Raises:
        ConfigError: a bad dtype or option, or a folder of another family (named by config.json).
        MissingWeightsError: files missing or damaged (one line naming the file).
    """
    from safetensors import SafetensorError
    from transformers import AutoProcessor

    from mfv.models.families.checks import check_folder, local_folder
    from mfv.models.patch_embedding import speed_up_patch_embeddings

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r} (model.backbone_dtype)")
    valid = {**family.processor_options, **family.load_options}
    unknown = sorted(set(processor_options) - set(valid))
    if unknown:
        raise ConfigError(f"{family.name} does not take option(s) {unknown} (model.backbone_options); valid options: "
                          f"{sorted(['model_path', 'cache_dir', 'dtype', 'system_prompt', *valid])}")
    path = model_path or family.default_path
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise _missing(family, path)
    folder = local_folder(path, cache_dir)
    if folder is not None:
        check_folder(family, folder)  # before any weight is read
    options = {**valid, **processor_options}
    try:
        with offline_hub():
            processor = AutoProcessor.from_pretrained(path, cache_dir=cache_dir, local_files_only=True, use_fast=True,
                                                      **options)
            model = family.model_type().from_pretrained(path, cache_dir=cache_dir, local_files_only=True,
                                                         dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:  # the hub raises ValueError subclasses for bad local paths
        raise _missing(family, path) from exc
    except SafetensorError as exc:  # damaged inside, past the header check
        raise MissingWeightsError(f"{family.name} weights at {path} are damaged ({exc}): download them again") from exc
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise ConfigError(f"{path}: the weights do not fit its config.json ({str(exc).splitlines()[-1].strip()}); "
                          f"download the model again") from exc
    speed_up_patch_embeddings(model)  # Qwen's per-patch Conv3d as one matmul (32x on a CPU, same values)
    adapter = HFAdapter(model, processor, family, path.rstrip("/").split("/")[-1].lower(), system_prompt)
    adapter.freeze()
    return adapter


def random_model(family: Family, config: Any, processor: Any, seed: int = 0,
                 attn_implementation: str = "eager") -> HFAdapter:
    """A random model of ``family`` from a config built in code (stand-ins), with ``attn_implementation``
    (``eager`` or ``sdpa``) in the language model and the vision tower."""
    for sub in ("text_config", "vision_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = attn_implementation
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    adapter = HFAdapter(family.model_type()(config), processor, family, f"{family.name}-tiny")
    adapter.freeze()
    return adapter
