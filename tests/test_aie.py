"""AIE, head selection and function vectors on a tiny random OpenFlamingo."""

from __future__ import annotations

import pytest
import torch

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.errors import ConfigError, IncompatibleVectorError
from mfv.hooks import add_to_residual
from mfv.method import extraction
from mfv.method.aie import indirect_effects, mean_head_activations, positive_mass_share, top_heads
from mfv.method.extraction import ExtractionSettings, extract
from mfv.method.function_vector import FunctionVectorSet, build_function_vector
from mfv.models.openflamingo import build_tiny_openflamingo

from .conftest import tiny_config

RELATIONS = ["above", "below", "left", "right"]


def _all_words():
    from mfv.vocabulary import OBJECT_NAMES

    return list(OBJECT_NAMES)


WORDS_ALL = _all_words()


@pytest.fixture(scope="module")
def adapter():
    from mfv.vocabulary import OBJECT_NAMES

    return build_tiny_openflamingo(tiny_config(words=list(OBJECT_NAMES), num_layers=3, num_heads=4))


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    split = generate_split(tmp_path_factory.mktemp("eval"), "eval", 24, image_size=64, workers=1, progress=False)
    return EpisodeSampler(read_scenes(split), RELATIONS, shots=2, seed=0)


def _batch(adapter, sampler, mode, indices):
    return encode_episodes(adapter, [sampler.episode(i, mode) for i in indices], RELATIONS)


def test_fast_equals_reference(adapter, sampler):
    clean = _batch(adapter, sampler, "clean", range(8))
    # Scaled-up means give a random model effects well above float rounding.
    means = 30 * mean_head_activations(adapter, [clean], 4, progress=False).means
    corrupted = _batch(adapter, sampler, "corrupted", range(3))
    fast = indirect_effects(adapter, corrupted, means, "fast", rows_per_pass=7)
    reference = indirect_effects(adapter, corrupted, means, "reference")
    assert fast.shape == (3, adapter.num_layers, adapter.num_heads)
    assert fast.abs().max() > 1e-5  # patches have a measurable effect
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_patching_a_prompt_with_its_own_activation_has_no_effect(adapter, sampler):
    batch = encode_episodes(adapter, [sampler.episode(5, "clean")], ["below"])
    means = mean_head_activations(adapter, [batch], 1, progress=False)
    assert means.seen == [1]
    effects = indirect_effects(adapter, batch, means.means)
    assert effects.abs().max() < 1e-6


def test_means_keep_only_correct_prompts(adapter, sampler, monkeypatch):
    batch = _batch(adapter, sampler, "clean", range(4))
    # Make the model "answer" prompt 0 correctly only.
    real_forward = adapter.forward

    def forward(prompts):
        logits = real_forward(prompts).clone()
        logits[:, :] = 0
        logits[0, batch.answer_ids[0]] = 1.0
        return logits

    monkeypatch.setattr(adapter, "forward", forward)
    result = mean_head_activations(adapter, [batch], 4, progress=False)
    assert result.kept == [1, 0, 0, 0] and result.seen == [1, 1, 1, 1]
    assert result.fallback == [1, 2, 3]


def test_function_vector_is_the_explicit_sum_of_head_projections(adapter):
    means = torch.randn(adapter.num_layers, adapter.num_heads, adapter.head_dim, generator=torch.Generator().manual_seed(0))
    heads = [(2, 1), (0, 3), (2, 0)]
    explicit = torch.zeros(adapter.hidden_size)
    for layer, head in heads:
        weight = adapter.output_projection(layer)
        columns = slice(head * adapter.head_dim, (head + 1) * adapter.head_dim)
        explicit += weight[:, columns] @ means[layer, head]
    torch.testing.assert_close(build_function_vector(adapter, means, heads), explicit, atol=1e-5, rtol=0)


def test_top_heads_and_mass_share():
    aie = torch.tensor([[0.1, 0.5], [-0.2, 0.3]])
    assert top_heads(aie, 2) == [(0, 1), (1, 1)]
    assert positive_mass_share(aie, 1) == pytest.approx(0.5 / 0.9)


def _settings(**overrides):
    fields = dict(relations=RELATIONS, shots=2, num_mean_prompts=8, num_aie_prompts=6, batch_size=2, aie_filter="all")
    fields.update(overrides)
    return ExtractionSettings(**fields)


def test_interrupted_extraction_resumes_to_identical_results(adapter, sampler, tmp_path, monkeypatch):
    reference = extract(adapter, sampler, _settings(), tmp_path / "a", "data", progress=False)

    calls = {"n": 0}
    real = extraction.indirect_effects

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in the middle of the AIE
        return real(*args, **kwargs)

    monkeypatch.setattr(extraction, "indirect_effects", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract(adapter, sampler, _settings(), tmp_path / "b", "data", progress=False)
    folder = next((tmp_path / "b").iterdir())
    saved = sorted(p.name for p in folder.iterdir() if p.suffix == ".pt")
    assert "aie_0000000-0000002.pt" in saved and "aie_0000002-0000004.pt" not in saved
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    calls["n"] = -100  # no more failures; count the chunks actually recomputed
    resumed = extract(adapter, sampler, _settings(), tmp_path / "b", "data", progress=False)
    assert calls["n"] == -100 + 2  # chunks 2 and 4 only
    torch.testing.assert_close(resumed.aie_pooled, reference.aie_pooled, atol=0, rtol=0)
    torch.testing.assert_close(resumed.means, reference.means, atol=0, rtol=0)


def test_corrupt_cache_chunk_is_reported_and_recomputed(adapter, sampler, tmp_path):
    reference = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False)
    (reference.cache_dir / "extraction.pt").write_bytes(b"")  # a full disk left 0 bytes
    chunk = reference.cache_dir / "aie_0000002-0000004.pt"
    chunk.write_bytes(chunk.read_bytes()[:50])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        again = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False)
    torch.testing.assert_close(again.aie_pooled, reference.aie_pooled, atol=0, rtol=0)


def test_cache_key_holds_only_what_the_tensors_depend_on(adapter, sampler, tmp_path):
    first = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False)
    again = extract(adapter, sampler, _settings(batch_size=3), tmp_path, "data", progress=False)
    assert again.cache_dir == first.cache_dir  # the chunk size is not a result setting
    folders = {first.cache_dir}
    for change in (dict(shots=1), dict(num_aie_prompts=4), dict(algorithm="reference"), dict(aie_filter="clean_correct"),
                   dict(seed=1)):
        folders.add(extract(adapter, sampler, _settings(**change), tmp_path, "data", progress=False).cache_dir)
    folders.add(extract(adapter, sampler, _settings(), tmp_path, "other-data", progress=False).cache_dir)
    assert len(folders) == 7


def test_k_sweep_and_layer_change_reuse_the_cached_aie(adapter, sampler, tmp_path, monkeypatch):
    first = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("AIE recomputed")

    monkeypatch.setattr(extraction, "indirect_effects", must_not_run)
    monkeypatch.setattr(extraction, "accumulate_means", must_not_run)
    cached = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False)
    for k in range(1, 7):
        fvs = cached.function_vectors(adapter, k, layer=1)
        assert all(len(h) == k for h in fvs.heads.values())
    other_layer = cached.function_vectors(adapter, 3, layer=2)
    assert other_layer.layer == 2
    torch.testing.assert_close(other_layer.stacked(), first.function_vectors(adapter, 3, 1).stacked(), atol=0, rtol=0)


def test_per_relation_selection_is_top_k_of_each_relations_aie(adapter, sampler, tmp_path):
    result = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False)
    heads = result.heads(3, "per_relation")
    for i, relation in enumerate(RELATIONS):
        assert heads[relation] == top_heads(result.aie_per_relation[i], 3)
    pooled = result.heads(3, "pooled")
    assert all(h == top_heads(result.aie_pooled, 3) for h in pooled.values())


def test_clean_correct_filter_keeps_exactly_the_prompts_the_model_answers(adapter, sampler, tmp_path):
    settings = _settings(aie_filter="clean_correct", num_aie_prompts=6, batch_size=6)
    clean = _batch(adapter, sampler, "clean", range(6))
    correct = (adapter.forward(clean.prompts).argmax(-1) == clean.answer_ids)
    corrupted = _batch(adapter, sampler, "corrupted", range(6))
    result = extract(adapter, sampler, settings, tmp_path, "data", progress=False)
    effects = indirect_effects(adapter, corrupted, result.means)
    for r, relation in enumerate(RELATIONS):
        kept = correct & (corrupted.relation_ids == r)
        if kept.any():
            assert result.aie_prompts[r] == int(kept.sum())
            torch.testing.assert_close(result.aie_per_relation[r], effects[kept].mean(0), atol=1e-6, rtol=0)
        else:  # none answered: falls back to all of the relation's prompts, and says so
            assert relation in result.aie_fallback


def test_bad_head_choice_fails_before_any_compute(adapter, sampler, tmp_path):
    result = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False)
    for k in (0, 99):
        with pytest.raises(ConfigError, match="aie.k"):
            result.function_vectors(adapter, k, 1)
    with pytest.raises(ConfigError, match="shots"):
        extract(adapter, sampler, _settings(shots=0), tmp_path, "data", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        extract(adapter, sampler, _settings(batch_size=0), tmp_path, "data", progress=False)


def test_fv_file_round_trip_and_wrong_backbone(adapter, sampler, tmp_path):
    fvs = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False).function_vectors(adapter, 3, 1)
    path = fvs.save(tmp_path / "fv.safetensors")
    loaded = FunctionVectorSet.load(path, adapter)
    assert loaded.heads == fvs.heads and loaded.layer == 1
    assert loaded.metadata["k"] == 3 and loaded.metadata["data_fingerprint"] == "data"
    other = build_tiny_openflamingo(tiny_config(hidden_size=48, num_heads=4))
    with pytest.raises(IncompatibleVectorError, match="hidden_size"):
        FunctionVectorSet.load(path, other)
    other.backbone_id = "someone-else"
    with pytest.raises(IncompatibleVectorError, match="backbone_id"):
        FunctionVectorSet.load(path, other)


def test_fv_injection_changes_zero_shot_logits(adapter, sampler, tmp_path):
    fvs = extract(adapter, sampler, _settings(), tmp_path, "data", progress=False).function_vectors(adapter, 3, 1)
    batch = _batch(adapter, sampler, "zero_shot", range(4))
    plain = adapter.forward(batch.prompts)
    with add_to_residual(adapter, fvs.layer, fvs.stacked()[batch.relation_ids]):
        steered = adapter.forward(batch.prompts)
    assert (steered - plain).abs().max() > 1e-4


@pytest.mark.parametrize("parallel_residual", [True, False])
def test_minimal_path_equals_reference_with_sparse_cross_attention_and_mixed_lengths(sampler, parallel_residual):
    """The minimal path (layers from the patched one up, shared prefix and image keys/values)
    on a model with cross-attention every 2nd layer (as OpenFlamingo-4B), both residual
    layouts (4B's RedPajama is sequential), and prompts of 3, 1 and 2 images."""
    from mfv.models.openflamingo import last_position
    from mfv.vocabulary import OBJECT_NAMES

    model = build_tiny_openflamingo(tiny_config(words=list(OBJECT_NAMES), num_layers=4, num_heads=4,
                                                cross_attn_every_n_layers=2))
    for layer in model.blocks:
        layer.decoder_layer.use_parallel_residual = parallel_residual
    assert last_position.supports(model)
    clean = _batch(model, sampler, "clean", range(4))
    means = 30 * mean_head_activations(model, [clean], 4, progress=False).means
    episodes = [sampler.episode(0, "corrupted"), sampler.episode(1, "zero_shot"), sampler.episode(2, "corrupted", 1)]
    corrupted = encode_episodes(model, episodes, RELATIONS)
    fast = indirect_effects(model, corrupted, means, "fast")
    reference = indirect_effects(model, corrupted, means, "reference")
    assert fast.abs().max() > 1e-4
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=0)


def test_clean_correct_filter_on_a_model_that_answers_some_prompts(tmp_path):
    """On the trained organism some clean prompts are answered and some are not: the AIE of
    each relation averages exactly the corrupted prompts whose clean version was answered."""
    from pathlib import Path

    from mfv.models.openflamingo import load_tiny_openflamingo

    organism = load_tiny_openflamingo(Path(__file__).resolve().parents[1] / "checkpoints" / "organism")
    split = generate_split(tmp_path / "scenes", "eval", 40, image_size=64, workers=1, progress=False)
    sampler = EpisodeSampler(read_scenes(split), RELATIONS, shots=1, seed=3)
    count = 24
    clean = encode_episodes(organism, [sampler.episode(i, "clean") for i in range(count)], RELATIONS)
    correct = organism.forward(clean.prompts).argmax(-1) == clean.answer_ids
    assert 0 < int(correct.sum()) < count  # a real filter: some kept, some dropped
    settings = ExtractionSettings(relations=RELATIONS, shots=1, num_mean_prompts=count, num_aie_prompts=count,
                                  batch_size=count, aie_filter="clean_correct")
    result = extract(organism, sampler, settings, tmp_path / "cache", "data", progress=False)
    corrupted = encode_episodes(organism, [sampler.episode(i, "corrupted") for i in range(count)], RELATIONS)
    effects = indirect_effects(organism, corrupted, result.means)
    for r, relation in enumerate(RELATIONS):
        kept = correct & (corrupted.relation_ids == r)
        assert result.aie_prompts[r] == int(kept.sum()) > 0
        torch.testing.assert_close(result.aie_per_relation[r], effects[kept].mean(0), atol=1e-6, rtol=0)


def _low_precision(build, dtype):
    from mfv.models.weights import cast_weights

    adapter = build()
    cast_weights(adapter.model, dtype)
    return adapter


def _own_activation_means(adapter, batch):
    """Each prompt's own head outputs as its "relation mean": every patch is a null patch."""
    from dataclasses import replace

    from mfv.hooks import record_heads

    with torch.no_grad(), record_heads(adapter) as recording:
        adapter.forward(batch.prompts)
    return recording.stacked().float(), replace(batch, relation_ids=torch.arange(len(batch)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["openflamingo", "qwen3vl"])
def test_a_null_patch_is_exactly_zero_in_low_precision(sampler, dtype, family):
    from mfv.models import backbone_spec

    adapter = _low_precision(backbone_spec(family).build_stand_in, dtype)
    batch = _batch(adapter, sampler, "corrupted", range(3))
    means, batch = _own_activation_means(adapter, batch)
    fast = indirect_effects(adapter, batch, means, "fast", rows_per_pass=5)
    assert fast.shape == (3, adapter.num_layers, adapter.num_heads)
    assert fast.abs().max() <= 1e-7
    # the generic cached path (all layers but one) holds the same guarantee
    partial = indirect_effects(adapter, batch, means, "fast", layers=[0, adapter.num_layers - 1], rows_per_pass=4)
    assert partial.abs().max() <= 1e-7


def test_bf16_fast_top_heads_equal_the_references_with_planted_effects(sampler):
    """Heads whose patch pushes the answer by known, separated amounts: same ranking as the reference."""
    adapter = _low_precision(lambda: build_tiny_openflamingo(tiny_config(words=WORDS_ALL, num_layers=3, num_heads=4)),
                             torch.bfloat16)
    batch = _batch(adapter, sampler, "corrupted", range(3))
    means, batch = _own_activation_means(adapter, batch)
    answer = adapter.model.lang_encoder.get_output_embeddings().weight[batch.answer_ids].float()  # (P, D)
    planted = [(2, 1, 3.0), (1, 3, 2.0), (0, 2, 1.2), (2, 0, 0.6)]
    for layer, head, strength in planted:
        weight = adapter.output_projection(layer).float()  # (D, H*hs)
        block = weight[:, head * adapter.head_dim:(head + 1) * adapter.head_dim]  # (D, hs)
        push = answer @ block  # the head direction that raises each prompt's answer logit
        means[:, layer, head] += strength * push / push.norm(dim=-1, keepdim=True)
    fast = indirect_effects(adapter, batch, means, "fast").mean(0)
    reference = indirect_effects(adapter, batch, means, "reference").mean(0)
    assert top_heads(fast, 4) == top_heads(reference, 4) == [(layer, head) for layer, head, _ in planted]


@pytest.mark.parametrize(("family", "attention"), [("qwen3vl", "sdpa"), ("gemma3", "eager"), ("gemma3", "sdpa")])
def test_minimal_hf_path_equals_the_reference_on_padded_batches(sampler, family, attention):
    """Prompts of different lengths (left padding), sliding windows (the Gemma 3 stand-in's
    window is shorter than its prompts), and both attention implementations a loaded model
    may use: the replay's masks come out as the full forward's."""
    from mfv.models import backbone_spec
    from mfv.steering import Injection, prompt_pass, steered_logits

    adapter = backbone_spec(family).build_stand_in()
    adapter.model.config._attn_implementation = attention
    clean = _batch(adapter, sampler, "clean", range(4))
    means = 30 * mean_head_activations(adapter, [clean], 4, progress=False).means
    episodes = [sampler.episode(0, "corrupted"), sampler.episode(1, "corrupted", shots=1)]
    corrupted = encode_episodes(adapter, episodes, RELATIONS)
    assert (corrupted.prompts.attention_mask == 0).any()  # the batch is padded
    fast = indirect_effects(adapter, corrupted, means, "fast")
    reference = indirect_effects(adapter, corrupted, means, "reference")
    assert fast.abs().max() > 1e-5
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    vectors = torch.randn(2, 1, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shared = steered_logits(adapter, corrupted.prompts, Injection.at([0], vectors), prompt_pass(adapter, corrupted.prompts))
        full = steered_logits(adapter, corrupted.prompts, Injection.at([0], vectors))
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
