"""The one last-position replay (:mod:`mfv.models.replay`): OpenFlamingo and the Hugging Face
families run the same loop (an injection after the last layer included, through a prompt
store's shares too), and the layer kinds and mask kind a family declares decide whether it applies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from mfv.models import replay
from mfv.models.base import Example, PrefixState
from mfv.models.families.llava import FAMILY as LLAVA
from mfv.models.families.release import build_stand_in
from mfv.models.openflamingo import build_tiny_openflamingo
from mfv.steering import Injection, steered_logits
from tests.conftest import tiny_config

COLORS = ["red", "green", "blue", "yellow", "white"]


@pytest.fixture(scope="module")
def llava():
    return build_stand_in(LLAVA, num_layers=3)


@pytest.fixture(scope="module")
def flamingo():
    """Cross-attention before every second layer, as OpenFlamingo-4B."""
    return build_tiny_openflamingo(tiny_config(num_layers=4, cross_attn_every_n_layers=2))


def _batch(adapter):
    """Three prompts of 0, 1 and 2 demonstrations (different lengths: left padding)."""
    words = ["dog", "cat", "apple", "ball"]
    prompts = []
    for i in range(3):
        demos = [Example(Image.new("RGB", (32, 32), COLORS[i + d + 1]), words[d], words[d + 1]) for d in range(i)]
        prompts.append(adapter.build_prompt(demos, Example(Image.new("RGB", (32, 32), COLORS[i]), words[i])))
    return adapter.collate(prompts)


@pytest.mark.parametrize("fixture", ["flamingo", "llava"])
def test_both_backbones_replay_an_injection_after_the_last_layer_in_the_one_loop(fixture, request, monkeypatch):
    """Both adapters hand their runner to the shared loop; an injection after the last layer
    (nothing left to run but the final norm and head) equals the full forward under hooks,
    from the whole batch's replay and from per-prompt shares joined again (the prompt store)."""
    adapter = request.getfixturevalue(fixture)
    runners = []
    shared = replay.steered_logits

    def spy(runner, *args):
        runners.append(runner)
        return shared(runner, *args)

    monkeypatch.setattr(replay, "steered_logits", spy)
    batch = _batch(adapter)
    last = adapter.num_layers - 1
    vectors = torch.randn(3, 1, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = steered_logits(adapter, batch, Injection.at([last], vectors))
        state = adapter.prefill(batch)
        minimal = adapter.steered_logits(state, vectors, [last])
        shares = [state.data["minimal"].share(row, last + 1) for row in range(3)]
        joined = replay.Replay.join(shares[::-1])
        stored = adapter.steered_logits(PrefixState({"minimal": joined}, 3), vectors.flip(0), [last])
    assert minimal is not None and stored is not None
    assert (full - adapter.forward(batch)).abs().max() > 1e-4  # the injection steers
    torch.testing.assert_close(minimal, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(stored, full.flip(0), atol=1e-5, rtol=0)
    assert len(runners) == 2 and all(isinstance(r, replay.LayerRunner) and r.adapter is adapter for r in runners)


def test_openflamingo_declares_its_cross_attention_layers(flamingo, llava):
    assert flamingo.layer_kinds == ("self", "cross_self", "self", "cross_self")
    assert flamingo.attention_mask_kind == "causal"
    assert llava.layer_kinds == ("self",) * 3 and llava.attention_mask_kind == "causal"


@pytest.mark.parametrize("declared", [
    {"attention_mask": "prefix_lm"},
    {"layer_kinds": lambda config: ["self", "cross", "self"][:config.num_hidden_layers]},
], ids=["prefix_lm", "cross_attention"])
def test_a_family_the_replay_cannot_run_has_no_minimal_path(declared):
    """A prefix-LM mask (a patch at the last position would change earlier positions) and
    cross-attention layers (no image keys and values are recorded for them) leave a family on
    the generic cached path: no replay, no minimal steering, no minimal fast AIE."""
    adapter = build_stand_in(dataclasses.replace(LLAVA, **declared), num_layers=3)
    assert (adapter.attention_mask_kind, adapter.layer_kinds) != ("causal", ("self",) * 3)
    batch = _batch(adapter)
    with torch.no_grad():
        state = adapter.prefill(batch)
    assert state.data["minimal"] is None
    assert adapter.steered_logits(state, torch.zeros(3, 1, adapter.hidden_size), [0]) is None
    values = torch.zeros(3, adapter.num_layers, adapter.num_heads, adapter.head_dim)
    assert adapter.single_head_patch_probabilities(batch, values, torch.zeros(3, dtype=torch.long)) is None
    # The generic cached path still gives the model's logits.
    torch.testing.assert_close(state.base_logits, adapter.forward(batch), atol=1e-5, rtol=0)
