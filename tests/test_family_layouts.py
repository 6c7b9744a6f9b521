"""The Hugging Face release layouts the full-size rehearsals write, at reduced width and
depth: they load through the user's path (``mfv.load`` on the folder) and run; a folder
without its weights is refused in one line naming it."""

from __future__ import annotations

import pytest
import torch

import mfv
from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.errors import MissingWeightsError
from mfv.models.families import layouts

RELATIONS = ["above", "below", "left", "right"]


def _reduced(release: dict, **vision) -> dict:
    """The release config at 2 layers of width 64 (vocabulary, rotary sections and token ids kept)."""
    text = dict(release["text_config"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    scaling = dict(text["rope_scaling"], mrope_section=[4, 2, 2])
    vision = dict(release["vision_config"], depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, **vision)
    return dict(release, text_config=dict(text, rope_scaling=scaling), vision_config=vision)


CASES = {
    "qwen3vl": (layouts.write_qwen3vl_layout, _reduced(layouts.QWEN3VL_4B_INSTRUCT, deepstack_visual_indexes=[0])),
    "qwen2.5vl": (layouts.write_qwen25vl_layout, _reduced(layouts.QWEN25VL_3B_INSTRUCT, fullatt_block_indexes=[1])),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_release_layout_loads_through_the_users_path_and_runs(tmp_path, family):
    write, config = CASES[family]
    folder = write(tmp_path / "release", config, dtype="float32")
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    model = mfv.load(family, model_path=str(folder), dtype="float32")
    assert model.model.config.text_config.vocab_size == 151936
    scenes = read_scenes(generate_split(tmp_path / "data", "eval", 4, image_size=64, workers=1, progress=False))
    batch = encode_episodes(model, [EpisodeSampler(scenes, RELATIONS, shots=1).episode(0, "clean")], RELATIONS)
    logits = model.forward(batch.prompts)
    assert logits.shape == (1, 151936) and torch.isfinite(logits).all()
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(MissingWeightsError, match=str(folder)):
        mfv.load(family, model_path=str(folder), dtype="float32")
