"""The adapter contract, checked for every registered backbone on its tiny stand-in."""

from __future__ import annotations

import pytest
import torch

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.hooks import add_to_residual, head_output_contributions, record_heads
from mfv.method.aie import indirect_effects, mean_head_activations
from mfv.models import BACKBONES, TINY_STAND_INS, load_backbone

RELATIONS = ["above", "below", "left", "right"]
SIZES = {"openflamingo-random": {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_layers": 2,
                                 "num_heads": 4, "intermediate_size": 64},
         "qwen3vl-random": {}}


def test_every_registered_backbone_has_a_tiny_stand_in():
    assert set(BACKBONES) == set(TINY_STAND_INS)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return read_scenes(generate_split(tmp_path_factory.mktemp("c"), "eval", 12, image_size=64, workers=1, progress=False))


@pytest.fixture(scope="module", params=sorted({name for name, _ in TINY_STAND_INS.values()}))
def adapter(request):
    name = request.param
    return load_backbone(name, **SIZES[name])


def test_shapes_are_consistent(adapter):
    assert adapter.output_projection(0).shape == (adapter.hidden_size, adapter.num_heads * adapter.head_dim)
    assert 0 < adapter.num_layers and adapter.residual_site(adapter.num_layers - 1) is not None


def test_prompt_has_every_demonstration_and_the_query(adapter, scenes):
    sampler = EpisodeSampler(scenes, RELATIONS, shots=2)
    episode = sampler.episode(0, "clean")
    prompt = adapter.build_prompt(episode.demonstrations, episode.query)
    for demo in episode.demonstrations:
        assert f"Q:{demo.question}. A:{demo.answer}." in prompt.text
    assert f"Q:{episode.query.question}. A:" in prompt.text and len(prompt.images) == 3
    token = adapter.answer_token_id(prompt.text, episode.answer)
    assert adapter.tokenizer.convert_ids_to_tokens(token) == episode.answer


def test_batches_rows_cache_and_heads(adapter, scenes):
    sampler = EpisodeSampler(scenes, RELATIONS, shots=2)
    episodes = [sampler.episode(0, "clean"), sampler.episode(1, "zero_shot"), sampler.episode(2, "clean", shots=1)]
    # Rows with 3, 1 and 2 images in one batch.
    batch = encode_episodes(adapter, episodes, RELATIONS)
    with record_heads(adapter) as recording:
        logits = adapter.forward(batch.prompts)
    for row in range(len(episodes)):
        alone = adapter.forward(adapter.select_rows(batch.prompts, torch.tensor([row])))
        torch.testing.assert_close(alone[0], logits[row], atol=1e-5, rtol=0)
    state = adapter.prefill(batch.prompts)
    torch.testing.assert_close(adapter.forward_last(state, torch.tensor([2, 0, 1])), logits[[2, 0, 1]], atol=1e-5, rtol=0)
    # Per-head decomposition reproduces the output projection.
    outputs = {}
    site = adapter.head_site(0)
    handle = site.register_forward_hook(lambda m, a, out: outputs.__setitem__("o", out[:, -1].detach()))
    try:
        adapter.forward(batch.prompts)
    finally:
        handle.remove()
    reconstructed = head_output_contributions(adapter, 0, recording.by_layer[0]).sum(1)
    if site.bias is not None:
        reconstructed = reconstructed + site.bias
    torch.testing.assert_close(reconstructed, outputs["o"], atol=1e-5, rtol=0)
    with add_to_residual(adapter, 0, torch.zeros(adapter.hidden_size)):
        torch.testing.assert_close(adapter.forward(batch.prompts), logits, atol=0, rtol=0)


def test_fast_aie_equals_reference(adapter, scenes):
    sampler = EpisodeSampler(scenes, RELATIONS, shots=1)
    clean = encode_episodes(adapter, [sampler.episode(i, "clean") for i in range(4)], RELATIONS)
    means = 30 * mean_head_activations(adapter, [clean], 4, progress=False).means
    corrupted = encode_episodes(adapter, [sampler.episode(i, "corrupted") for i in range(2)], RELATIONS)
    fast = indirect_effects(adapter, corrupted, means, "fast", rows_per_pass=5)
    reference = indirect_effects(adapter, corrupted, means, "reference")
    assert fast.abs().max() > 1e-6
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
