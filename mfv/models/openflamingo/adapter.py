"""The OpenFlamingo adapter: sites, prompt format, batched and cached forward passes.

Published releases are loaded by :mod:`mfv.models.openflamingo.releases`, tiny models by
:mod:`mfv.models.openflamingo.tiny`; both assemble the same open_flamingo ``Flamingo``
here (:func:`assemble_flamingo`) and wrap it in :class:`OpenFlamingoAdapter`.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mfv.compat import ensure_torchvision
from mfv.hooks import keep_input_contiguous
from mfv.models import replay
from mfv.models.base import BackboneAdapter, Example, LayerKind, PrefixState, Prompt, PromptBatch
import mfv.models.openflamingo.last_position as last_position

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LanguageFamily:
    """Where the per-head and residual sites live in one language-model family.

    Attributes:
        layers_attr: Dotted path of the decoder-layer ``ModuleList``.
        attn_out_attr: Path, inside a ``FlamingoLayer``, of the attention output projection.
        heads_key: Config key holding the number of attention heads.
        hidden_key: Config key holding the residual width.
        accepts_position_ids: Whether the LM forward takes ``position_ids`` (needed for
            exact left padding with rotary embeddings).
    """

    layers_attr: str
    attn_out_attr: str
    heads_key: str
    hidden_key: str
    accepts_position_ids: bool


LANGUAGE_FAMILIES: dict[str, LanguageFamily] = {
    "gpt_neox": LanguageFamily(
        "gpt_neox.layers", "decoder_layer.attention.dense", "num_attention_heads", "hidden_size", True
    ),
    # MPT (OpenFlamingo 3B/9B) runs through trust_remote_code; sites per its modeling file.
    "mpt": LanguageFamily("transformer.blocks", "decoder_layer.attn.out_proj", "n_heads", "d_model", False),
}


def _getattr_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB")


def _image_transform(image_size: int):
    ensure_torchvision()
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.Lambda(_to_rgb),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def assemble_flamingo(
    vision_encoder: nn.Module,
    lang_encoder: nn.Module,
    tokenizer: Any,
    vis_dim: int,
    family: str,
    cross_attn_every_n_layers: int,
) -> nn.Module:
    """Builds an ``open_flamingo.Flamingo`` the way its factory does, minus downloads.

    Args:
        vision_encoder: An open_clip model exposing ``.visual`` (token outputs enabled here).
        lang_encoder: A Hugging Face causal LM.
        tokenizer: Its tokenizer; OpenFlamingo special tokens are added when missing.
        vis_dim: Width of the vision tokens.
        family: Key of :data:`LANGUAGE_FAMILIES`.
        cross_attn_every_n_layers: Cross-attention frequency of the release.
    """
    ensure_torchvision()
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    vision_encoder.visual.output_tokens = True
    missing = [t for t in (END_OF_CHUNK, IMAGE_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    tokenizer.padding_side = "left"
    extend_instance(lang_encoder, FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name(LANGUAGE_FAMILIES[family].layers_attr)
    # As open_flamingo's factory: the embeddings get exactly len(tokenizer) rows, fewer than the
    # language model's padded vocabulary where it has one (RedPajama-3B: 50432 -> 50280); the
    # releases' checkpoint.pt holds both embeddings at that size.
    if lang_encoder.get_input_embeddings().num_embeddings != len(tokenizer):
        lang_encoder.resize_token_embeddings(len(tokenizer))
    return Flamingo(
        vision_encoder,
        lang_encoder,
        tokenizer.convert_tokens_to_ids(END_OF_CHUNK),
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vis_dim=vis_dim,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )


class OpenFlamingoAdapter(BackboneAdapter):
    """Adapter for OpenFlamingo (open_flamingo's ``Flamingo`` around a HF causal LM).

    Args:
        model: The assembled ``Flamingo`` module.
        tokenizer: Its tokenizer (left padding is enforced).
        image_transform: PIL image -> ``(C, H, W)`` tensor.
        family: Language-model family key of :data:`LANGUAGE_FAMILIES`.
        backbone_id: Name stored with function vectors.
        tiny_config: The sizes when the model is a tiny one (see :func:`mfv.models.openflamingo.tiny.save_tiny_openflamingo`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_transform: Any,
        family: str = "gpt_neox",
        backbone_id: str = "openflamingo",
        tiny_config: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_transform = image_transform
        self.family = LANGUAGE_FAMILIES[family]
        self.backbone_id = backbone_id
        self.tiny_config = tiny_config
        self._vision_cache: dict[bytes, torch.Tensor] | None = None
        # Batched last-position logits without a copy of the head's weight per row (see the hook).
        self._head_hook = keep_input_contiguous(model.lang_encoder.get_output_embeddings())
        config = model.lang_encoder.config
        self._num_heads = int(getattr(config, self.family.heads_key))
        self._hidden = int(getattr(config, self.family.hidden_key))

    # ----- shape -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return self._num_heads

    @property
    def head_dim(self) -> int:
        return self._hidden // self._num_heads

    @property
    def hidden_size(self) -> int:
        return self._hidden

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """``cross_self`` where open_flamingo put a gated cross-attention block before the
        decoder layer (every ``cross_attn_every_n_layers``-th layer), ``self`` elsewhere."""
        return tuple("self" if layer.gated_cross_attn_layer is None else "cross_self" for layer in self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        """The language model's layers as open_flamingo wraps them (a gated cross-attention
        block, possibly ``None``, before each ``decoder_layer``)."""
        return self.model.lang_encoder._get_decoder_layers()

    # ----- sites -------------------------------------------------------------------
    def head_site(self, layer: int) -> nn.Module:
        return _getattr_path(self.blocks[layer], self.family.attn_out_attr)

    def residual_site(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    # ----- prompts -----------------------------------------------------------------
    def build_prompt(self, demonstrations: Sequence[Example], query: Example) -> Prompt:
        """``<image>Q:{a}. A:{b}.<|endofchunk|>`` per demonstration joined by newlines, then the query."""
        chunks = [f"{IMAGE_TOKEN}Q:{d.question}. A:{d.answer}.{END_OF_CHUNK}" for d in demonstrations]
        chunks.append(f"{IMAGE_TOKEN}Q:{query.question}. A:")
        return Prompt(text="\n".join(chunks), images=[d.image for d in demonstrations] + [query.image])

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """PIL image (or an already preprocessed ``(C, H, W)`` tensor) -> model input."""
        if isinstance(image, torch.Tensor):
            return image
        return self.image_transform(image)

    def collate(self, prompts: Sequence[Prompt]) -> PromptBatch:
        tokens = self.tokenizer([p.text for p in prompts], return_tensors="pt", padding=True)
        max_images = max(len(p.images) for p in prompts)
        per_prompt = []
        for prompt in prompts:
            images = torch.stack([self.preprocess_image(im) for im in prompt.images])
            if len(images) < max_images:
                # Extra all-zero images are never attended: no media token points at them.
                pad = images.new_zeros((max_images - len(images), *images.shape[1:]))
                images = torch.cat([images, pad])
            per_prompt.append(images)
        pixel_values = torch.stack(per_prompt).unsqueeze(2)  # (B, T_img, F=1, C, H, W)
        return PromptBatch(tokens["input_ids"], tokens["attention_mask"], pixel_values)

    # ----- forward -----------------------------------------------------------------
    def lm_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of the language model for a left-padded batch."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.family.accepts_position_ids:
            # Rotary positions must count real tokens only, or left padding shifts them.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    @contextmanager
    def conditioned(self, pixel_values: torch.Tensor) -> Iterator[None]:
        """Encodes each prompt's images once and conditions every cross-attention layer."""
        try:
            latents = self._encode_images(pixel_values.to(self.device, self.dtype))
            for layer in self.blocks:
                layer.condition_vis_x(latents)
            yield
        finally:
            self.model.lang_encoder.clear_conditioned_layers()
            self.model.lang_encoder._use_cached_vision_x = False

    @contextmanager
    def reuse_context(self, store: dict | None = None) -> Iterator[None]:
        """Inside the block each distinct image is encoded (ViT + resampler) once: the frozen
        vision tower's latents are kept by image content in ``store`` (a dict the caller owns
        and may pass again to later blocks; default: a fresh one for this block) and reused by
        every later batch. Text tokens attend to the latents of the image they follow only,
        instead of to every image under a mask (:mod:`mfv.models.openflamingo.cross_attention`)."""
        from mfv.models.openflamingo.cross_attention import attend_immediate_media_only

        outer = self._vision_cache
        self._vision_cache = store if store is not None else ({} if outer is None else outer)
        try:
            with attend_immediate_media_only(self.blocks):
                yield
        finally:
            self._vision_cache = outer

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, T, 1, C, H, W)`` images -> ``(B, T, latents, d)`` resampler latents, as
        open_flamingo's ``_encode_vision_x`` computes them (through the cache when active)."""
        b, t = pixel_values.shape[:2]
        flat = pixel_values.reshape(b * t, *pixel_values.shape[3:])

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                tokens = self.model.vision_encoder(images)[1]
            return self.model.perceiver(tokens[:, None, None])[:, 0]  # (n, latents, d)

        if self._vision_cache is None:
            latents = encode(flat)
            return latents.reshape(b, t, *latents.shape[1:])
        # Keys from the raw bytes (any dtype, bf16 included), one device-to-host copy per batch.
        raw = flat.detach().contiguous().view(torch.uint8).cpu().numpy()
        keys = [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in raw]
        for index, key in enumerate(keys):
            if key not in self._vision_cache:
                # One image at a time: its latents never depend on which batch first met it
                # (kernels may round differently by batch shape), so a resumed run reproduces
                # an uninterrupted one bit for bit.
                self._vision_cache[key] = encode(flat[index:index + 1])[0].detach()
        return torch.stack([self._vision_cache[key] for key in keys]).reshape(b, t, *self._vision_cache[keys[0]].shape)

    def forward(self, batch: PromptBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        with self.conditioned(batch.pixel_values):
            out = self.model.lang_encoder(
                **self.lm_inputs(batch.input_ids, batch.attention_mask), logits_to_keep=1, use_cache=False
            )
        return out.logits[:, -1]

    def single_head_patch_probabilities(self, batch: PromptBatch, values: torch.Tensor,
                                        answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The minimal exact computation (:func:`mfv.models.replay.single_head_patch_probabilities`
        with :class:`~mfv.models.openflamingo.last_position.FlamingoLayers`)."""
        if not last_position.supports(self):
            return None
        return replay.single_head_patch_probabilities(last_position.FlamingoLayers(self), batch, values, answers)

    def steered_logits(self, state: PrefixState, vectors: torch.Tensor, layers: list[int]) -> torch.Tensor | None:
        """Only the last position from ``layers[0] + 1`` up is recomputed (and carries a graph)
        (:func:`mfv.models.replay.steered_logits`)."""
        minimal = state.data.get("minimal")
        if minimal is None:
            return None
        return replay.steered_logits(last_position.FlamingoLayers(self), minimal, vectors, layers)

    @torch.no_grad()
    def generate(self, batch: PromptBatch, max_new_tokens: int = 5, min_new_tokens: int = 0) -> torch.Tensor:
        batch = batch.to(self.device)
        out = self.model.generate(
            vision_x=batch.pixel_values.to(self.dtype), lang_x=batch.input_ids, attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=1, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return out[:, batch.input_ids.shape[1]:]

    def prefill(self, batch: PromptBatch) -> PrefixState:
        """The prompt once. GPT-NeoX Flamingos run it whole
        (:meth:`~mfv.models.openflamingo.last_position.FlamingoLayers.prefill`: the state also
        feeds the last-position replay and holds the unsteered logits); others run every
        position but the last."""
        batch = batch.to(self.device)
        if last_position.supports(self):
            return last_position.FlamingoLayers(self).prefill(batch)
        from transformers import DynamicCache

        kwargs = self.lm_inputs(batch.input_ids, batch.attention_mask)
        with self.conditioned(batch.pixel_values):
            vis_x = self.blocks[0].vis_x
            out = self.model.lang_encoder(**{k: v[:, :-1] for k, v in kwargs.items()}, past_key_values=DynamicCache(),
                                          use_cache=True, logits_to_keep=1)
            media_locations = self.blocks[0].media_locations
        cache = out.past_key_values
        return PrefixState(data=self.cached_prompt(batch, [layer.keys for layer in cache.layers],
                                                   [layer.values for layer in cache.layers], vis_x, media_locations),
                           batch_size=len(batch))

    def cached_prompt(self, batch: PromptBatch, keys: list[torch.Tensor], values: list[torch.Tensor],
                      vis_x: torch.Tensor, media_locations: torch.Tensor) -> dict[str, Any]:
        """What :meth:`forward_last` reads: per-layer keys and values of positions ``0..S-2``,
        the image latents and where the images are, the last token and the mask."""
        return {"keys": keys, "values": values, "vis_x": vis_x, "media_locations": media_locations,
                "last_ids": batch.input_ids[:, -1:], "attention_mask": batch.attention_mask,
                "position_ids": self.lm_inputs(batch.input_ids, batch.attention_mask).get("position_ids")}

    def forward_last(self, state: PrefixState, rows: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        data = state.data
        rows = rows.to(self.device)
        cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in zip(data["keys"], data["values"])])
        lang = self.model.lang_encoder
        try:
            for layer in self.blocks:
                layer.condition_vis_x(data["vis_x"][rows])
                layer.condition_media_locations(data["media_locations"][rows])
            # The last token attends to the latest image of its prefix, exactly as in a
            # full forward: this is open_flamingo's own cached-media path.
            lang._use_cached_vision_x = True
            kwargs: dict[str, Any] = {
                "input_ids": data["last_ids"][rows],
                "attention_mask": data["attention_mask"][rows],
            }
            if data["position_ids"] is not None:
                kwargs["position_ids"] = data["position_ids"][rows, -1:]
            out = lang(**kwargs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            lang.clear_conditioned_layers()
            lang._use_cached_vision_x = False
        return out.logits[:, -1]

