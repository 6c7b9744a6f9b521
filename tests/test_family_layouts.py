"""The Hugging Face release layouts the full-size rehearsals write, at reduced width and depth
(:func:`mfv.models.families.release.reduce_release`, the release's vocabulary kept): every
family's loads through the user's path (``mfv.load`` on the folder) and runs; a folder without
its weights, with a truncated shard, of another family or with weights that do not fit its config
is refused in one line naming the file."""

from __future__ import annotations

import json

import pytest
import torch

import mfv
from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.errors import ConfigError, MissingWeightsError
from mfv.models import hf_families
from mfv.models.families.release import reduce_release, write_release_layout

RELATIONS = ["above", "below", "left", "right"]


def _write(family_name: str, folder):
    family = hf_families()[family_name]
    config = reduce_release(family.stand_in.release, family.stand_in.reduction)
    return write_release_layout(family, folder, config, dtype="float32")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return read_scenes(generate_split(tmp_path_factory.mktemp("data"), "eval", 4, image_size=64, workers=1,
                                      progress=False))


@pytest.fixture(scope="module")
def qwen25_layout(tmp_path_factory):
    return _write("qwen2.5vl", tmp_path_factory.mktemp("qwen25") / "release")


@pytest.mark.parametrize("family", sorted(hf_families()))
def test_a_release_layout_loads_through_the_users_path_and_runs(tmp_path, scenes, family):
    folder = _write(family, tmp_path / "release")
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    model = mfv.load(family, model_path=str(folder), dtype="float32")
    vocab = hf_families()[family].stand_in.release["text_config"]["vocab_size"]
    assert model.text_config.vocab_size == vocab
    batch = encode_episodes(model, [EpisodeSampler(scenes, RELATIONS, shots=1).episode(0, "clean")], RELATIONS)
    logits = model.forward(batch.prompts)
    assert logits.shape == (1, vocab) and torch.isfinite(logits).all()
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(MissingWeightsError, match=str(folder)):
        mfv.load(family, model_path=str(folder), dtype="float32")


def test_a_truncated_shard_is_one_line_naming_the_file(tmp_path, qwen25_layout):
    folder = tmp_path / "truncated"
    folder.mkdir()
    for path in qwen25_layout.iterdir():
        data = path.read_bytes()
        (folder / path.name).write_bytes(data[: len(data) // 2] if path.suffix == ".safetensors" else data)
    with pytest.raises(MissingWeightsError) as error:
        mfv.load("qwen2.5vl", model_path=str(folder), dtype="float32")
    message = str(error.value)
    assert "\n" not in message and "model.safetensors" in message and "truncated" in message


def test_a_config_of_another_family_is_one_line_naming_both(qwen25_layout):
    with pytest.raises(ConfigError) as error:
        mfv.load("qwen3vl", model_path=str(qwen25_layout), dtype="float32")
    message = str(error.value)
    assert "\n" not in message and "config.json" in message
    assert "'qwen2_5_vl'" in message and "'qwen3vl'" in message and "load it as 'qwen2.5vl'" in message


@pytest.mark.parametrize("model_type", ["mllama", "paligemma"])
def test_a_folder_of_a_refused_architecture_is_refused_with_the_reason(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ConfigError) as error:
        mfv.load("llava", model_path=str(tmp_path), dtype="float32")
    message = str(error.value)
    assert "\n" not in message and "not supported" in message and "supported families: gemma3" in message


def test_weights_that_do_not_fit_config_json_are_one_line(tmp_path, qwen25_layout):
    """config.json of the same family but other sizes: one line naming the folder, no traceback."""
    for path in qwen25_layout.iterdir():
        (tmp_path / path.name).symlink_to(path)
    config = json.loads((qwen25_layout / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 2
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as error:
        mfv.load("qwen2.5vl", model_path=str(tmp_path), dtype="float32")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "size mismatch" in message
