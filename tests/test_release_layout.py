"""The published OpenFlamingo-4B layout loads as downloaded: reduced width and depth, real vocabulary arithmetic.

Files are made as the release was (open_flamingo's factory and save rule, the LM folder with
RedPajama's padded 50432-row vocabulary and a 50277-token tokenizer, open_clip's CLIP file),
so the checkpoint's embeddings have 50280 rows. Only widths and depths are small.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mfv.errors import ConfigError, MissingWeightsError
from mfv.models.base import Example
from mfv.models.openflamingo.layout import REDPAJAMA_3B, write_release_layout
from mfv.models.openflamingo.releases import load_openflamingo
from mfv.models.weights import iter_tensors

SMALL_LM = dict(REDPAJAMA_3B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4,
                max_position_embeddings=64)
CLIP = "mfv-layout-test-vit"


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory):
    from mfv.compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    path = tmp_path_factory.mktemp("clip") / f"{CLIP}.json"
    path.write_text(json.dumps({
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(path)
    return CLIP


@pytest.fixture(scope="module")
def base_release(tmp_path_factory, clip_config):
    return write_release_layout(tmp_path_factory.mktemp("base"), SMALL_LM, clip_model=clip_config,
                                base_release_buffers=True)


def _load(files, **options):
    return load_openflamingo("openflamingo-4b", checkpoint_path=str(files.checkpoint),
                             language_model_path=str(files.language_model), clip_weights_path=str(files.clip_weights),
                             clip_model=CLIP, **options)


def test_the_layout_has_the_releases_vocabulary_arithmetic(base_release):
    checkpoint = dict(iter_tensors(base_release.checkpoint))
    assert checkpoint["lang_encoder.gpt_neox.embed_in.weight"].shape[0] == 50280
    assert checkpoint["lang_encoder.embed_out.weight"].shape[0] == 50280
    assert json.loads((base_release.language_model / "config.json").read_text())["vocab_size"] == 50432
    lm = dict(iter_tensors(base_release.language_model / "pytorch_model.bin"))
    assert lm["gpt_neox.embed_in.weight"].shape[0] == 50432
    assert any(key.endswith(".attention.masked_bias") for key in checkpoint)
    # open_flamingo's save rule: no frozen language-model or vision weights in the checkpoint
    assert not any(".decoder_layer.mlp." in key or key.startswith("vision_encoder.") for key in checkpoint)


def test_the_base_release_loads_every_weight_from_its_file(base_release):
    adapter = _load(base_release, dtype="bfloat16")
    model = adapter.model
    assert len(adapter.tokenizer) == 50280
    assert model.lang_encoder.get_input_embeddings().weight.shape == (50280, 64)
    checkpoint = dict(iter_tensors(base_release.checkpoint))
    lm = dict(iter_tensors(base_release.language_model / "pytorch_model.bin"))
    clip = dict(iter_tensors(base_release.clip_weights))
    expected = {
        "perceiver.latents": checkpoint["perceiver.latents"],
        "lang_encoder.gpt_neox.embed_in.weight": checkpoint["lang_encoder.gpt_neox.embed_in.weight"],
        "lang_encoder.embed_out.weight": checkpoint["lang_encoder.embed_out.weight"],
        "lang_encoder.gpt_neox.layers.3.gated_cross_attn_layer.attn.to_q.weight":
            checkpoint["lang_encoder.gpt_neox.layers.3.gated_cross_attn_layer.attn.to_q.weight"],
        "lang_encoder.gpt_neox.layers.2.decoder_layer.mlp.dense_h_to_4h.weight":
            lm["gpt_neox.layers.2.mlp.dense_h_to_4h.weight"],
        "vision_encoder.conv1.weight": clip["visual.conv1.weight"],
    }
    state = model.state_dict()
    for key, value in expected.items():
        assert state[key].dtype == torch.bfloat16, key
        assert torch.equal(state[key], value.to(torch.bfloat16)), key
    assert all(not p.is_meta for p in model.parameters())
    # non-persistent rotary frequencies stay fp32 as transformers computes them
    assert model.lang_encoder.gpt_neox.rotary_emb.inv_freq.dtype == torch.float32
    image = Image.new("RGB", (40, 30), "white")
    prompt = adapter.build_prompt([Example(image, "cat", "dog")], Example(image, "dog", "cat"))
    logits = adapter.forward(adapter.collate([prompt]))
    assert logits.shape == (1, 50280) and torch.isfinite(logits).all()


def test_device_option_places_the_model(base_release):
    import mfv

    adapter = mfv.load("openflamingo", device="cpu", release="openflamingo-4b",
                       checkpoint_path=str(base_release.checkpoint), language_model_path=str(base_release.language_model),
                       clip_weights_path=str(base_release.clip_weights), clip_model=CLIP)
    assert {p.device.type for p in adapter.model.parameters()} == {"cpu"}
    assert {b.device.type for b in adapter.model.buffers()} == {"cpu"}
    tiny = mfv.load("openflamingo-random", device="meta")  # builders without the option are moved after
    assert {p.device.type for p in tiny.model.parameters()} == {"meta"}
    with pytest.raises(ConfigError, match="device"):
        _load(base_release, device="nowhere")


@pytest.mark.parametrize("drop, named", [
    (("perceiver.",), "the perceiver resampler"),
    (("lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.",), "gated cross-attention layer 1"),
    (("lang_encoder.embed_out.",), "the output embeddings"),
    (("perceiver.", "lang_encoder."), "gated cross-attention layer 3"),  # an (almost) empty checkpoint
])
def test_a_checkpoint_missing_a_group_is_one_clear_error(tmp_path, clip_config, drop, named):
    files = write_release_layout(tmp_path, SMALL_LM, clip_model=clip_config, drop_prefixes=drop)
    with pytest.raises(MissingWeightsError) as info:
        _load(files)
    message = str(info.value)
    assert named in message and str(files.checkpoint) in message and "\n" not in message


def test_an_empty_checkpoint_is_refused(base_release, tmp_path):
    empty = tmp_path / "checkpoint.pt"
    torch.save({}, empty)
    with pytest.raises(MissingWeightsError, match="perceiver resampler.*input embeddings|input embeddings.*perceiver"):
        load_openflamingo("openflamingo-4b", checkpoint_path=str(empty), language_model_path=str(base_release.language_model),
                          clip_weights_path=str(base_release.clip_weights), clip_model=CLIP)


def test_a_checkpoint_with_foreign_keys_is_refused(base_release, tmp_path):
    state = dict(iter_tensors(base_release.checkpoint))
    state["lang_encoder.gpt_neox.layers.0.decoder_layer.attention.extra.weight"] = torch.zeros(2)
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    with pytest.raises(MissingWeightsError, match="unexpected keys"):
        load_openflamingo("openflamingo-4b", checkpoint_path=str(path), language_model_path=str(base_release.language_model),
                          clip_weights_path=str(base_release.clip_weights), clip_model=CLIP)


def test_missing_pieces_are_listed_at_once(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        load_openflamingo("openflamingo-4b-instruct", checkpoint_path=str(tmp_path / "c.pt"),
                          language_model_path=str(tmp_path / "lm"), clip_weights_path=str(tmp_path / "clip.bin"))
    message = str(info.value)
    assert all(part in message for part in ("c.pt", "lm", "clip.bin"))


def test_mpt_releases_are_refused_as_unsupported():
    with pytest.raises(ConfigError, match="not supported"):
        load_openflamingo("openflamingo-3b")
