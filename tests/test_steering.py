"""Beyond the anchors: attribution patching, distributed steering, steering during generation."""

from __future__ import annotations

import pytest
import torch

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.hooks import add_to_residual
from mfv.method.aie import indirect_effects, mean_head_activations
from mfv.method.extraction import ExtractionSettings, extract
from mfv.models import BACKBONES

RELATIONS = ["above", "below", "left", "right"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return read_scenes(generate_split(tmp_path_factory.mktemp("s"), "eval", 16, image_size=64, workers=1,
                                      progress=False))


@pytest.fixture(scope="module", params=["openflamingo-random", "qwen3vl-random"])
def adapter(request):
    return BACKBONES[request.param].build_stand_in()


def test_attribution_is_the_first_order_estimate_of_exact_aie(adapter, scenes):
    sampler = EpisodeSampler(scenes, RELATIONS, shots=1)
    clean = encode_episodes(adapter, [sampler.episode(i, "clean") for i in range(4)], RELATIONS)
    means = mean_head_activations(adapter, [clean], 4, progress=False).means
    corrupted = encode_episodes(adapter, [sampler.episode(i, "corrupted") for i in range(3)], RELATIONS)
    exact = indirect_effects(adapter, corrupted, means, "fast")
    estimate = indirect_effects(adapter, corrupted, means, "attribution")
    assert estimate.shape == exact.shape and exact.abs().max() > 0
    # Random weights: small patches, so the linear term dominates.
    assert (estimate - exact).abs().max() < 0.05 * exact.abs().max()
    correlation = torch.corrcoef(torch.stack([exact.flatten(), estimate.flatten()]))[0, 1]
    assert correlation > 0.99


def test_distributed_vectors_sum_to_the_single_layer_fv(adapter, scenes, tmp_path):
    sampler = EpisodeSampler(scenes, RELATIONS, shots=1)
    settings = ExtractionSettings(relations=RELATIONS, shots=1, num_mean_prompts=8, num_aie_prompts=4, batch_size=4,
                                  aie_filter="all")
    result = extract(adapter, sampler, settings, tmp_path, "data", progress=False)
    k = 4
    distributed = result.distributed_vectors(adapter, k)
    single = result.function_vectors(adapter, k, layer=0).stacked(RELATIONS)
    torch.testing.assert_close(distributed.sum(0), single, atol=1e-5, rtol=1e-5)
    heads = result.heads(k)
    for r, relation in enumerate(RELATIONS):
        layers_used = {l for l, _ in heads[relation]}
        assert {l for l in range(adapter.num_layers) if distributed[l, r].any()} == layers_used


def _steered_generation(adapter, scenes, vector, every_position):
    """Per forward call during generation, what the steering hook added at the last position."""
    sampler = EpisodeSampler(scenes, RELATIONS, shots=1)
    episode = sampler.episode(0, "clean")
    batch = adapter.collate([adapter.build_prompt(episode.demonstrations, episode.query)])
    site = adapter.residual_site(0)
    before, after = [], []

    def last(output):
        return (output[0] if isinstance(output, tuple) else output)[:, -1].detach().clone()

    first = site.register_forward_hook(lambda m, a, out: before.append(last(out)))
    try:
        with add_to_residual(adapter, 0, vector, every_generated_position=every_position):
            second = site.register_forward_hook(lambda m, a, out: after.append(last(out)))
            try:
                tokens = adapter.generate(batch, max_new_tokens=3, min_new_tokens=3)
            finally:
                second.remove()
    finally:
        first.remove()
    return tokens, [a - b for a, b in zip(after, before)]


def test_generation_steers_the_last_prompt_position_or_every_generated_one(adapter, scenes):
    vector = torch.randn(adapter.hidden_size)
    tokens, added = _steered_generation(adapter, scenes, vector, every_position=False)
    assert tokens.shape == (1, 3) and len(added) == 3  # one prompt pass, then two cached steps
    torch.testing.assert_close(added[0][0], vector, atol=1e-4, rtol=1e-4)
    assert all(a.abs().max() == 0 for a in added[1:])
    _, added = _steered_generation(adapter, scenes, vector, every_position=True)
    for step in added:
        torch.testing.assert_close(step[0], vector, atol=1e-4, rtol=1e-4)
    plain = adapter.generate(adapter.collate([adapter.build_prompt(*(lambda e: (e.demonstrations, e.query))(
        EpisodeSampler(scenes, RELATIONS, shots=1).episode(0, "clean")))]), max_new_tokens=3, min_new_tokens=3)
    zero, _ = _steered_generation(adapter, scenes, torch.zeros(adapter.hidden_size), every_position=True)
    assert torch.equal(zero, plain)


def test_distributed_steering_trains_exports_and_evaluates(tmp_path):
    """The training option: one trainable vector per layer holding a selected head, exported as
    a distributed FV file that evaluate.py injects layer by layer."""
    from mfv.commands.evaluate import main as evaluate_main
    from mfv.commands.train import main as train_main
    from mfv.method.function_vector import FunctionVectorSet
    from tests.test_drills import write_config

    path = write_config(tmp_path)
    metrics = train_main(["--config", str(path), "--model.injection", "distributed", "--model.init", "extracted",
                          "--trainer.max_epochs", "1"])
    fvs = FunctionVectorSet.load(metrics["exported_fv"])
    assert fvs.distributed and fvs.vectors["above"].shape == (3, 32)
    active = fvs.metadata["layers"]
    heads = {layer for hs in fvs.heads.values() for layer, _ in hs}
    assert set(active) == heads
    for layer in set(range(3)) - heads:  # never injected, never trained
        assert all(v[layer].abs().max() == 0 for v in fvs.vectors.values())
    result = evaluate_main(["--config", str(path), "--fv", metrics["exported_fv"], "--out", str(tmp_path / "eval"),
                            "--limit", "4", "--evaluation.max_k", "2", "--evaluation.sweep_limit", "4"])
    assert result["conditions"]["zero_shot_finetuned_fv"]["layer"] == active  # injected after each of its layers
    assert "analogy_composite_finetuned_normalized" not in result["summary"]  # composites use single-layer FVs
