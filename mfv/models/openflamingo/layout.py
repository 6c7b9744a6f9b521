"""Files laid out exactly as a published OpenFlamingo release, with random weights.

No weights can be downloaded where mfv is tested, so the loading path is tested on files
made the way the releases were made:

* ``checkpoint.pt``: the key set comes from open_flamingo's own factory
  (``create_model_and_transforms``: special tokens added, embeddings resized to
  ``len(tokenizer)``, perceiver and gated cross-attention built, trainable groups marked) and
  its own training save rule (``filter_state_dict_to_trainable``: trainable keys plus every
  key containing "embed"), saved fp32 with ``torch.save``. ``base_release_buffers`` adds the
  transformers-4.28 buffers the base releases carry.
* the language-model folder: ``config.json``, the tokenizer files and ``pytorch_model.bin``
  (fp16, as RedPajama-INCITE-3B is published) of the given config;
* ``open_clip_pytorch_model.bin``: open_clip's full CLIP state dict (text tower included), fp32.

The factory runs with every parameter on the meta device (no memory), and values are drawn
tensor by tensor, so full size (4B) is written with a few GB of memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import torch

from mfv.compat import ensure_torchvision
from mfv.models.openflamingo.releases import ReleaseFiles
from mfv.models.weights import empty_parameters
from mfv.vocabulary import OBJECT_NAMES

# RedPajama-INCITE-3B-v1's config.json (the 4B releases' language model).
REDPAJAMA_3B = {
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 10240,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "num_attention_heads": 32, "num_hidden_layers": 32,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "tie_word_embeddings": False, "torch_dtype": "float16",
    "use_cache": True, "use_parallel_residual": False, "vocab_size": 50432,
}
REDPAJAMA_TOKENIZER_SIZE = 50277


def write_tokenizer(folder: Path, size: int) -> None:
    """A tokenizer of exactly ``size`` tokens, without a pad token (as GPT-NeoX-20B's).

    Object names and prompt words are single tokens; the rest is filler.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mfv.models.tokenizer import PROMPT_WORDS

    vocab: dict[str, int] = {}
    for token in ("<|endoftext|>", "<unk>", *PROMPT_WORDS, *sorted(set(OBJECT_NAMES))):
        vocab.setdefault(token, len(vocab))
    for index in range(size - len(vocab)):
        vocab[f"filler{index}"] = len(vocab)
    if len(vocab) != size:
        raise ValueError(f"tokenizer size {size} is smaller than the {len(vocab)} words it must hold")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))


def _random_like(key: str, shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Values a trained model could hold: unit norms, zero biases, open gates, small weights."""
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("_gate"):
        return torch.full(tuple(shape), 0.5, dtype=dtype)
    if len(shape) == 1 and (".ln" in key or "norm" in key or "layernorm" in key) and leaf == "weight":
        return torch.ones(tuple(shape), dtype=dtype)
    if leaf == "bias" or leaf == "logit_scale":
        return torch.zeros(tuple(shape), dtype=dtype)
    return (torch.randn(tuple(shape), generator=generator) * 0.02).to(dtype)


def _random_state(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype | None,
                  seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: _random_like(key, shape, dtype or kind, generator) for key, (shape, kind) in shapes.items()}


@contextlib.contextmanager
def _factory_on_meta(lm_folder: Path):
    """open_flamingo's factory with its pretrained pieces built from config on the meta device."""
    import open_clip
    from transformers import AutoConfig, AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained
    original_clip = open_clip.create_model_and_transforms

    def from_config_only(path: str, *args: Any, **kwargs: Any):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))

    def clip_on_meta(*args: Any, **kwargs: Any):
        return original_clip(*args, **kwargs, device="meta")

    # open_flamingo's training utilities import wandb at module level; only the save rule is used.
    stub = "wandb" not in sys.modules
    if stub:
        sys.modules["wandb"] = types.ModuleType("wandb")
    AutoModelForCausalLM.from_pretrained = from_config_only
    open_clip.create_model_and_transforms = clip_on_meta
    try:
        with empty_parameters(), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        AutoModelForCausalLM.from_pretrained = original
        open_clip.create_model_and_transforms = original_clip
        if stub:
            del sys.modules["wandb"]


def release_checkpoint_shapes(lm_folder: Path, clip_model: str, cross_attn_every_n_layers: int,
                              ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the ``checkpoint.pt`` open_flamingo's training would save."""
    ensure_torchvision()
    from open_flamingo.src.factory import create_model_and_transforms

    with _factory_on_meta(lm_folder):
        model, _, _ = create_model_and_transforms(
            clip_model, None, str(lm_folder), str(lm_folder), cross_attn_every_n_layers=cross_attn_every_n_layers,
            use_local_files=True)
        from open_flamingo.train.train_utils import filter_state_dict_to_trainable

        state = filter_state_dict_to_trainable(model, model.state_dict())
    return {key: (tuple(value.shape), value.dtype) for key, value in state.items()}


def write_release_layout(
    out: str | Path,
    lm_config: dict[str, Any] | None = None,
    tokenizer_size: int = REDPAJAMA_TOKENIZER_SIZE,
    clip_model: str = "ViT-L-14-quickgelu",
    cross_attn_every_n_layers: int = 2,
    base_release_buffers: bool = False,
    drop_prefixes: Sequence[str] = (),
    seed: int = 0,
) -> ReleaseFiles:
    """Writes a release's three pieces under ``out`` with random values.

    Args:
        out: Folder; gets ``checkpoint.pt``, ``language_model/`` and ``open_clip_pytorch_model.bin``.
        lm_config: The language model's ``config.json`` (default: RedPajama-INCITE-3B's).
        tokenizer_size: Tokens in the tokenizer (RedPajama: 50277, fewer than the 50432 rows).
        clip_model: open_clip model config of the vision tower.
        cross_attn_every_n_layers: As the release (4B: 2).
        base_release_buffers: Add the transformers-4.28 GPT-NeoX buffers of the base releases.
        drop_prefixes: Checkpoint keys starting with any of these are left out (damaged files).
        seed: Seed of the random values.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    lm_folder = out / "language_model"
    lm_folder.mkdir(parents=True, exist_ok=True)
    config = dict(REDPAJAMA_3B if lm_config is None else lm_config)
    (lm_folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(lm_folder, tokenizer_size)

    with empty_parameters():
        lang = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(lm_folder)))
    lm_shapes = {key: (tuple(p.shape), p.dtype) for key, p in lang.state_dict().items()}
    torch.save(_random_state(lm_shapes, torch.float16, seed), lm_folder / "pytorch_model.bin")

    ensure_torchvision()
    import open_clip

    with empty_parameters():
        clip = open_clip.create_model(clip_model, pretrained=None, device="meta")
    clip_shapes = {key: (tuple(p.shape), p.dtype) for key, p in clip.state_dict().items()}
    torch.save(_random_state(clip_shapes, torch.float32, seed + 1), out / "open_clip_pytorch_model.bin")

    shapes = release_checkpoint_shapes(lm_folder, clip_model, cross_attn_every_n_layers)
    shapes = {k: v for k, v in shapes.items() if not any(k.startswith(p) for p in drop_prefixes)}
    state = _random_state(shapes, torch.float32, seed + 2)
    if base_release_buffers:
        positions = config["max_position_embeddings"]
        head_size = config["hidden_size"] // config["num_attention_heads"]
        rotary = int(head_size * config.get("rotary_pct", 1.0))
        inv_freq = 1.0 / (config.get("rotary_emb_base", 10000) ** (torch.arange(0, rotary, 2).float() / rotary))
        for layer in range(config["num_hidden_layers"]):
            prefix = f"lang_encoder.gpt_neox.layers.{layer}.decoder_layer.attention."
            state[prefix + "bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.bool))[None, None]
            state[prefix + "masked_bias"] = torch.tensor(-1e9)
            state[prefix + "rotary_emb.inv_freq"] = inv_freq
    torch.save(state, out / "checkpoint.pt")
    return ReleaseFiles(out / "checkpoint.pt", lm_folder, out / "open_clip_pytorch_model.bin")
