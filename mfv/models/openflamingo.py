"""OpenFlamingo backbone adapter: real releases (3B/4B/9B) and tiny random models.

Real releases are assembled from three pieces that all must be on disk (no network):
the CLIP ViT-L/14 weights (open_clip, ``ViT-L-14-quickgelu``), the language model
(transformers, Hugging Face cache or a local folder) and the OpenFlamingo
``checkpoint.pt`` (perceiver, cross-attention, embeddings). Tiny models are built from
a :class:`TinyFlamingoConfig` with the same open_flamingo classes, random weights and a
word-level tokenizer, for tests and for the trained model organism.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mfv.compat import ensure_torchvision
from mfv.errors import MissingWeightsError
from mfv.models.base import BackboneAdapter, Example, PrefixState, Prompt, PromptBatch

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


@dataclass(frozen=True)
class Release:
    """One published OpenFlamingo checkpoint."""

    hf_repo: str
    language_model: str
    cross_attn_every_n_layers: int
    family: str


RELEASES: dict[str, Release] = {
    "openflamingo-3b": Release(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b", "anas-awadalla/mpt-1b-redpajama-200b", 1, "mpt"
    ),
    "openflamingo-3b-instruct": Release(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
        "anas-awadalla/mpt-1b-redpajama-200b-dolly",
        1,
        "mpt",
    ),
    "openflamingo-4b": Release(
        "openflamingo/OpenFlamingo-4B-vitl-rpj3b", "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, "gpt_neox"
    ),
    "openflamingo-4b-instruct": Release(
        "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
        "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
        2,
        "gpt_neox",
    ),
    "openflamingo-9b": Release("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", 4, "mpt"),
}


@dataclass
class TinyFlamingoConfig:
    """Sizes of a small OpenFlamingo built from the real classes with random weights.

    The stock factory fixes the resampler and cross-attention at 8 heads x 64; here
    every block is built directly so all sizes are small.
    """

    words: list[str] = field(default_factory=list)
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 1
    vision_head_width: int = 16
    perceiver_depth: int = 1
    perceiver_latents: int = 8
    perceiver_heads: int = 2
    perceiver_dim_head: int = 16
    xattn_heads: int = 2
    xattn_dim_head: int = 16
    xattn_ff_mult: int = 2
    cross_attn_every_n_layers: int = 1
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    gate_init: float = 0.5
    max_position_embeddings: int = 512
    seed: int = 0


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
    if lang_encoder.get_input_embeddings().num_embeddings < len(tokenizer):
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
        tiny_config: The config when the model is a tiny one (enables ``save``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_transform: Any,
        family: str = "gpt_neox",
        backbone_id: str = "openflamingo",
        tiny_config: TinyFlamingoConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_transform = image_transform
        self.family = LANGUAGE_FAMILIES[family]
        self.backbone_id = backbone_id
        self.tiny_config = tiny_config
        config = model.lang_encoder.config
        self._num_heads = int(getattr(config, self.family.heads_key))
        self._hidden = int(getattr(config, self.family.hidden_key))

    # ----- shape -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._layers)

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
    def _layers(self) -> nn.ModuleList:
        return self.model.lang_encoder._get_decoder_layers()

    # ----- sites -------------------------------------------------------------------
    def head_site(self, layer: int) -> nn.Module:
        return _getattr_path(self._layers[layer], self.family.attn_out_attr)

    def residual_site(self, layer: int) -> nn.Module:
        return self._layers[layer]

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
    def _lm_kwargs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.family.accepts_position_ids:
            # Rotary positions must count real tokens only, or left padding shifts them.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    @contextmanager
    def _conditioned(self, pixel_values: torch.Tensor) -> Iterator[None]:
        """Encodes each prompt's images once and conditions every cross-attention layer."""
        try:
            self.model._encode_vision_x(vision_x=pixel_values.to(self.device, self.dtype))
            yield
        finally:
            self.model.lang_encoder.clear_conditioned_layers()
            self.model.lang_encoder._use_cached_vision_x = False

    def forward(self, batch: PromptBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        with self._conditioned(batch.pixel_values):
            out = self.model.lang_encoder(
                **self._lm_kwargs(batch.input_ids, batch.attention_mask), logits_to_keep=1, use_cache=False
            )
        return out.logits[:, -1]

    def prefill(self, batch: PromptBatch) -> PrefixState:
        from transformers import DynamicCache

        batch = batch.to(self.device)
        kwargs = self._lm_kwargs(batch.input_ids, batch.attention_mask)
        with self._conditioned(batch.pixel_values):
            vis_x = self._layers[0].vis_x
            prefix_kwargs = {k: v[:, :-1] for k, v in kwargs.items()}
            out = self.model.lang_encoder(
                **prefix_kwargs, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1
            )
            media_locations = self._layers[0].media_locations
        cache = out.past_key_values
        data = {
            "keys": [layer.keys for layer in cache.layers],
            "values": [layer.values for layer in cache.layers],
            "vis_x": vis_x,
            "media_locations": media_locations,
            "last_ids": batch.input_ids[:, -1:],
            "attention_mask": batch.attention_mask,
            "position_ids": kwargs.get("position_ids"),
        }
        return PrefixState(data=data, batch_size=len(batch))

    def forward_last(self, state: PrefixState, rows: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        data = state.data
        rows = rows.to(self.device)
        cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in zip(data["keys"], data["values"])])
        lang = self.model.lang_encoder
        try:
            for layer in self._layers:
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

    # ----- persistence of tiny models ------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Saves a tiny model (config, weights, tokenizer) to ``directory``."""
        from safetensors.torch import save_model

        if self.tiny_config is None:
            raise ValueError("only tiny models are saved by mfv; real releases load from their checkpoints")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(asdict(self.tiny_config), indent=2))
        # save_model de-duplicates the tensors open_flamingo registers under two names.
        save_model(self.model, str(directory / "model.safetensors"), metadata={"backbone_id": self.backbone_id})
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))


def build_tiny_openflamingo(
    config: TinyFlamingoConfig, backbone_id: str = "openflamingo-tiny"
) -> OpenFlamingoAdapter:
    """Builds a small random OpenFlamingo from the real open_flamingo/open_clip/transformers classes.

    Args:
        config: Sizes; ``config.words`` are added to the tokenizer as single tokens.
        backbone_id: Name stored with function vectors extracted from it.
    """
    ensure_torchvision()
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mfv.models.tokenizer import build_word_tokenizer

    torch.manual_seed(config.seed)
    tokenizer = build_word_tokenizer(config.words)
    vision_cfg = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=config.vision_head_width,
        patch_size=config.patch_size,
        image_size=config.image_size,
        output_tokens=True,
    )
    vision = nn.Module()
    vision.visual = _build_vision_tower(config.vision_width, vision_cfg, quick_gelu=True)
    lm_config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    lang = GPTNeoXForCausalLM(lm_config)
    model = assemble_flamingo(
        vision, lang, tokenizer, config.vision_width, "gpt_neox", config.cross_attn_every_n_layers
    )
    # Replace the stock-size resampler and cross-attention blocks with small ones.
    model.perceiver = PerceiverResampler(
        dim=config.vision_width,
        depth=config.perceiver_depth,
        dim_head=config.perceiver_dim_head,
        heads=config.perceiver_heads,
        num_latents=config.perceiver_latents,
    )
    lang.gated_cross_attn_layers = nn.ModuleList(
        [
            GatedCrossAttentionBlock(
                dim=config.hidden_size,
                dim_visual=config.vision_width,
                dim_head=config.xattn_dim_head,
                heads=config.xattn_heads,
                ff_mult=config.xattn_ff_mult,
            )
            if (i + 1) % config.cross_attn_every_n_layers == 0
            else None
            for i in range(config.num_layers)
        ]
    )
    for block in lang.gated_cross_attn_layers:
        if block is not None:
            # Zero gates (the stock init) would make a random model ignore its images.
            block.attn_gate.data.fill_(config.gate_init)
            block.ff_gate.data.fill_(config.gate_init)
    lang.init_flamingo_layers(False)
    adapter = OpenFlamingoAdapter(
        model, tokenizer, _image_transform(config.image_size), "gpt_neox", backbone_id, tiny_config=config
    )
    adapter.freeze()
    return adapter


def load_tiny_openflamingo(directory: str | os.PathLike) -> OpenFlamingoAdapter:
    """Loads a tiny model saved by :meth:`OpenFlamingoAdapter.save`."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    directory = Path(directory)
    weights = directory / "model.safetensors"
    for required in (directory / "config.json", weights):
        if not required.is_file():
            raise MissingWeightsError(
                f"tiny OpenFlamingo not found: expected {required}. Train one with "
                f"`python -m mfv.organism.train --out {directory}` or point the config at another folder."
            )
    config = TinyFlamingoConfig(**json.loads((directory / "config.json").read_text()))
    with safe_open(str(weights), "pt") as handle:
        backbone_id = (handle.metadata() or {}).get("backbone_id", "openflamingo-tiny")
    adapter = build_tiny_openflamingo(config, backbone_id=backbone_id)
    load_model(adapter.model, str(weights))
    adapter.freeze()
    return adapter


def remap_checkpoint_keys(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Adapts an OpenFlamingo ``checkpoint.pt`` state dict to the installed library versions.

    Handles the ``module.`` prefix of DDP-saved checkpoints and transformers' rename of
    GPT-NeoX's ``embed_out`` to ``lm_head`` (in either direction).
    """
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    remapped = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key not in model_keys:
            for old, new in ((".embed_out.", ".lm_head."), (".lm_head.", ".embed_out.")):
                if old in key and key.replace(old, new) in model_keys:
                    key = key.replace(old, new)
                    break
        remapped[key] = value
    return remapped


def _resolve_hf_file(repo: str, filename: str, cache_dir: str | None, hint: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:  # the hub raises several types for "not in the cache"
        raise MissingWeightsError(
            f"{filename} of {repo} is not in the Hugging Face cache ({cache_dir or 'default cache'}). "
            f"Download it where you have network: `huggingface-cli download {repo} {filename}`, "
            f"or {hint}."
        ) from exc


def load_openflamingo(
    release: str = "openflamingo-4b",
    checkpoint_path: str | None = None,
    language_model_path: str | None = None,
    clip_weights_path: str | None = None,
    cache_dir: str | None = None,
    dtype: str = "float32",
) -> OpenFlamingoAdapter:
    """Loads a published OpenFlamingo release from local files only.

    Args:
        release: Key of :data:`RELEASES`.
        checkpoint_path: The release's ``checkpoint.pt``; default: the Hugging Face cache.
        language_model_path: Folder of the language model; default: its hub id in the cache.
        clip_weights_path: open_clip weights file of ViT-L/14 (OpenAI); default: the cache.
        cache_dir: Hugging Face cache folder; default: ``HF_HOME``'s.
        dtype: ``float32``, ``bfloat16`` or ``float16``; the whole backbone is cast to it.

    Raises:
        MissingWeightsError: A piece is missing; the message names the file and how to get it.
        ConfigError: Unknown release or dtype.
    """
    from mfv.errors import ConfigError

    if release not in RELEASES:
        raise ConfigError(f"unknown OpenFlamingo release {release!r}; valid: {sorted(RELEASES)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    spec = RELEASES[release]
    torch_dtype = getattr(torch, dtype)

    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise MissingWeightsError(
                f"OpenFlamingo checkpoint not found: {checkpoint_path} (model.checkpoint_path). "
                f"Download it with `huggingface-cli download {spec.hf_repo} checkpoint.pt` and point "
                f"model.checkpoint_path at the file."
            )
    else:
        checkpoint_path = _resolve_hf_file(
            spec.hf_repo, "checkpoint.pt", cache_dir, "set model.checkpoint_path to the file"
        )

    ensure_torchvision()
    import open_clip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_source = language_model_path or spec.language_model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            lm_source, local_files_only=True, trust_remote_code=True, cache_dir=cache_dir
        )
        lang = AutoModelForCausalLM.from_pretrained(
            lm_source, local_files_only=True, trust_remote_code=True, cache_dir=cache_dir, torch_dtype=torch_dtype
        )
    except OSError as exc:
        raise MissingWeightsError(
            f"language model {lm_source} not found locally (model.language_model_path). Download it with "
            f"`huggingface-cli download {spec.language_model}` or set model.language_model_path to its folder."
        ) from exc

    previous_offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # open_clip must not try the network
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            "ViT-L-14-quickgelu", pretrained=clip_weights_path or "openai", cache_dir=cache_dir
        )
    except Exception as exc:
        raise MissingWeightsError(
            f"CLIP ViT-L/14 (openai) weights not found ({clip_weights_path or 'Hugging Face cache'}; "
            f"model.clip_weights_path). Download `timm/vit_large_patch14_clip_224.openai` with "
            f"huggingface-cli or set model.clip_weights_path to open_clip's weights file."
        ) from exc
    finally:
        if previous_offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_offline
    # OpenFlamingo was trained with the final LayerNorm applied after pooling.
    clip.visual.final_ln_after_pool = True

    model = assemble_flamingo(clip, lang, tokenizer, 1024, spec.family, spec.cross_attn_every_n_layers)
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = remap_checkpoint_keys(state, set(model.state_dict()))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise MissingWeightsError(
            f"{checkpoint_path} does not match {release}: unexpected keys {result.unexpected_keys[:5]}; "
            f"is it the checkpoint of another release?"
        )
    model.to(torch_dtype)
    # open_clip's eval transform: resize the short side, centre crop, CLIP normalisation.
    adapter = OpenFlamingoAdapter(model, tokenizer, preprocess, spec.family, release)
    adapter.freeze()
    return adapter
