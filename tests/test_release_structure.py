"""Each Hugging Face stand-in has its release's structure at reduced size (issue #32): the
grouped-query ratio, hidden against heads x head_dim, the layer-type pattern with a window
shorter than the prompts, rotary sections, qk-norm, tied embeddings, BOS, multi-token answers
and the release's image mechanism; refused architectures are refused with their reason."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

import mfv
from mfv.data.datamodule import first_token_clashes
from mfv.errors import ConfigError
from mfv.models import BACKBONES, hf_families
from mfv.models.base import Example
from mfv.models.families.release import Reduction, reduce_release
from mfv.models.hf import Family
from mfv.vocabulary import OBJECT_NAMES

FAMILIES = sorted(hf_families())
BOS = {"llava": "<s>", "gemma3": "<bos>"}  # the others' release tokenizers add none
QK_NORM = {"qwen3vl", "gemma3"}


@pytest.fixture(scope="module")
def stand_ins():
    return {name: BACKBONES[f"{name}-random"].build_stand_in() for name in FAMILIES}


def _release_text(name: str) -> dict:
    return hf_families()[name].stand_in.release["text_config"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_attention_layout_is_the_releases(stand_ins, name):
    adapter, release = stand_ins[name], _release_text(name)
    config = adapter.text_config
    heads, kv_heads = release["num_attention_heads"], release.get("num_key_value_heads", release["num_attention_heads"])
    release_width = heads * (release.get("head_dim") or release["hidden_size"] // heads)
    assert adapter.num_heads // config.num_key_value_heads == heads // kv_heads
    assert adapter.num_heads * adapter.head_dim / adapter.hidden_size == release_width / release["hidden_size"]
    attention = adapter.attention(0)
    assert hasattr(attention, "q_norm") == (name in QK_NORM)
    tied = adapter.model.get_output_embeddings().weight is adapter.model.get_input_embeddings().weight
    assert tied == release["tie_word_embeddings"]  # every release states it
    sections = (release.get("rope_scaling") or {}).get("mrope_section")
    if sections:
        reduced = config.rope_scaling["mrope_section"]
        assert [s / sum(reduced) for s in reduced] == [s / sum(sections) for s in sections]


def test_gemma3_alternates_five_sliding_layers_to_one_full_with_a_window_shorter_than_the_prompts(stand_ins):
    adapter = stand_ins["gemma3"]
    assert adapter.text_config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert adapter.text_config.layer_types == _release_text("gemma3")["layer_types"][:6]
    image = Image.new("RGB", (64, 64))
    prompt = adapter.build_prompt([], Example(image, "what is above the cup", "box"))
    assert adapter.collate([prompt]).input_ids.shape[1] > 4 * adapter.text_config.sliding_window


@pytest.mark.parametrize("name", FAMILIES)
def test_answers_are_several_tokens_with_distinct_first_tokens_and_bos_is_the_releases(stand_ins, name):
    adapter = stand_ins[name]
    tokenizer = adapter.tokenizer
    assert all(len(tokenizer(n, add_special_tokens=False)["input_ids"]) >= 2 for n in OBJECT_NAMES)
    assert first_token_clashes(adapter, list(OBJECT_NAMES)) == []
    ids = tokenizer("Q:x. A:")["input_ids"]
    assert tokenizer.bos_token == BOS.get(name)
    assert (ids[0] == tokenizer.bos_token_id) == (name in BOS)
    prompt = adapter.build_prompt([], Example(Image.new("RGB", (64, 64)), "what is above the cup", "box"))
    assert adapter.collate([prompt]).input_ids[0].tolist().count(tokenizer.bos_token_id) == (name in BOS)


def _one_and_two_images(adapter):
    image = Image.new("RGB", (64, 64), (200, 40, 90))
    example = Example(image, "what is above the cup", "box")
    one, two = adapter.build_prompt([], example), adapter.build_prompt([example], example)
    return adapter.collate([one]), adapter.collate([two])


def test_the_image_mechanisms_are_the_releases(stand_ins):
    one, two = _one_and_two_images(stand_ins["idefics3"])
    assert one.pixel_values.shape[1] == 5  # split into 2x2 tiles plus the global view
    one, two = _one_and_two_images(stand_ins["internvl"])
    assert one.extra["tiles_per_image"].tolist() == [10]  # 3x3 dynamic tiles plus a thumbnail
    assert len(two.pixel_values) == 20
    one, two = _one_and_two_images(stand_ins["llava-onevision"])
    assert one.pixel_values.shape[1] > 1 and two.pixel_values.shape[1] == 1  # anyres only for a row's only image
    adapter = stand_ins["llava"]
    one, _ = _one_and_two_images(adapter)
    grid = adapter.model.config.vision_config.image_size // adapter.model.config.vision_config.patch_size
    assert (one.input_ids == adapter.model.config.image_token_index).sum() == grid**2 == 9


def test_a_reduction_keeps_hidden_against_heads_and_refuses_uneven_rotary_sections():
    release = hf_families()["qwen3vl"].stand_in.release
    reduced = reduce_release(release, Reduction(head_dim=32))["text_config"]
    assert reduced["num_attention_heads"] * reduced["head_dim"] / reduced["hidden_size"] == 32 * 128 / 2560
    assert reduced["rope_scaling"]["mrope_section"] == [6, 5, 5]
    with pytest.raises(ValueError, match="rotary sections"):
        reduce_release(release, Reduction(head_dim=16))


@pytest.mark.parametrize("name", ["mllama", "llama-3.2-vision", "paligemma2"])
def test_refused_architectures_are_one_line_with_the_reason(name):
    with pytest.raises(ConfigError) as error:
        mfv.load(name)
    message = str(error.value)
    assert "\n" not in message and "not supported" in message
    assert ("cross-attention" if "llama" in name else "prefix-LM") in message
    assert "supported families: gemma3, idefics3, internvl, llava" in message


def test_the_registry_is_built_from_the_family_files_and_family_has_no_unused_field():
    families = hf_families()
    assert {f"{n}{suffix}" for n in families for suffix in ("", "-random")} <= set(BACKBONES)
    # The replay seam's declarations (#32.3): every supported family is causal self-attention,
    # so none sets them; tests/test_replay.py sets each and checks the replay refuses.
    seam = {"layer_kinds", "attention_mask"}
    for field in dataclasses.fields(Family):
        if field.name in seam or (field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING):
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert any(getattr(f, field.name) != default for f in families.values()), f"Family.{field.name} is never set"
