"""The adapter contract, checked for every registered backbone on its tiny stand-in.

The backbones come from the registry (:data:`mfv.models.BACKBONES`): a new entry is
checked here without editing this file. Each check is a plain function of
``(adapter, scenes)`` listed in :data:`CONTRACT_CHECKS`. The Hugging Face stand-ins keep their
release's structure (:mod:`mfv.models.families.release`) and run under both attention
implementations a loaded model may use (``eager``, and ``sdpa`` that ``from_pretrained`` gives);
each (stand-in, attention) is built once for the module.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.synthetic import generate_split
from mfv.hooks import head_output_contributions, record_heads
from mfv.method.aie import indirect_effects, mean_head_activations
from mfv.models import BACKBONES, BackboneSpec
from mfv.steering import Injection, prompt_pass, steered_logits, steering

RELATIONS = ["above", "below", "left", "right"]


def check_shapes(adapter, scenes) -> None:
    adapter.check_fast_path_preconditions()
    assert adapter.output_projection(0).shape == (adapter.hidden_size, adapter.num_heads * adapter.head_dim)
    assert 0 < adapter.num_layers and adapter.residual_site(adapter.num_layers - 1) is not None


def check_prompt(adapter, scenes) -> None:
    sampler = EpisodeSampler(scenes, RELATIONS, shots=2)
    episode = sampler.episode(0, "clean")
    prompt = adapter.build_prompt(episode.demonstrations, episode.query)
    for demo in episode.demonstrations:
        assert f"Q:{demo.question}. A:{demo.answer}." in prompt.text
    assert f"Q:{episode.query.question}. A:" in prompt.text and len(prompt.images) == 3
    token = adapter.answer_token_id(prompt.text, episode.answer)
    pieces = adapter.tokenizer(episode.answer, add_special_tokens=False)["input_ids"]
    assert token == pieces[0]  # the first token of the answer, whole word or not
    if adapter.tokenizer.convert_ids_to_tokens(token) != episode.answer:  # a BPE stand-in: BOS as the release's
        encoded = adapter.tokenizer("Q")["input_ids"]
        assert (encoded[0] == adapter.tokenizer.bos_token_id) == (adapter.tokenizer.bos_token is not None)


def check_batches_rows_cache_and_heads(adapter, scenes) -> None:
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
    with steering(adapter, Injection.at(0, torch.zeros(adapter.hidden_size))):
        torch.testing.assert_close(adapter.forward(batch.prompts), logits, atol=0, rtol=0)


def check_every_steering_path_gives_the_same_logits(adapter, scenes) -> None:
    """The one steering function: full forward under hooks (no graph), the last-position path
    with a graph (fine-tuning), and conditions sharing one prompt pass, on one and on two layers."""
    sampler = EpisodeSampler(scenes, RELATIONS, shots=2)
    batch = encode_episodes(adapter, [sampler.episode(i, "zero_shot") for i in range(3)], RELATIONS).prompts
    generator = torch.Generator().manual_seed(0)
    last = adapter.num_layers - 1
    for layers in ([0], sorted({0, last - 1}), [last]):
        vectors = torch.randn(3, len(layers), adapter.hidden_size, generator=generator)
        injection = Injection.at(layers, vectors)
        with torch.no_grad():
            full = steered_logits(adapter, batch, injection)
            shared = steered_logits(adapter, batch, injection, prompt_pass(adapter, batch))
        trainable = vectors.clone().requires_grad_(True)
        graph = steered_logits(adapter, batch, Injection.at(layers, trainable))
        graph.sum().backward()
        assert trainable.grad is not None and trainable.grad.abs().sum() > 0
        assert (full - steered_logits(adapter, batch, None).detach()).abs().max() > 1e-4  # it steers
        torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(graph.detach(), full, atol=1e-5, rtol=0)
    with torch.no_grad():
        base = steered_logits(adapter, batch, None, prompt_pass(adapter, batch))
    torch.testing.assert_close(base, adapter.forward(batch), atol=1e-5, rtol=0)


def check_fast_aie_equals_reference(adapter, scenes) -> None:
    sampler = EpisodeSampler(scenes, RELATIONS, shots=1)
    clean = encode_episodes(adapter, [sampler.episode(i, "clean") for i in range(4)], RELATIONS)
    means = 30 * mean_head_activations(adapter, [clean], 4, progress=False).means
    corrupted = encode_episodes(adapter, [sampler.episode(i, "corrupted") for i in range(2)], RELATIONS)
    fast = indirect_effects(adapter, corrupted, means, "fast", rows_per_pass=5)
    reference = indirect_effects(adapter, corrupted, means, "reference")
    assert fast.abs().max() > 1e-6
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def check_minimal_paths_are_taken_and_a_null_patch_is_zero(adapter, scenes) -> None:
    """Every family runs fast AIE and steering at the minimal computation (no fallback), and
    patching each head with its own output changes nothing (to 1e-7: the
    recorded outputs come from `forward`, the replay from `prefill`)."""
    sampler = EpisodeSampler(scenes, RELATIONS, shots=1)
    batch = encode_episodes(adapter, [sampler.episode(i, "corrupted") for i in range(2)], RELATIONS)
    with torch.no_grad(), record_heads(adapter) as recording:
        adapter.forward(batch.prompts)
    own = recording.stacked()
    minimal = adapter.single_head_patch_probabilities(batch.prompts, own, batch.answer_ids)
    assert minimal is not None, "no minimal fast-AIE path: fast AIE would recompute every layer per row"
    base, patched = minimal
    assert (patched - base[..., None]).abs().max() <= 1e-7
    with torch.no_grad():
        state = adapter.prefill(batch.prompts)
        vectors = torch.zeros(len(batch), 1, adapter.hidden_size)
        assert adapter.steered_logits(state, vectors, [0]) is not None, "no minimal steering path"


CONTRACT_CHECKS: list[Callable] = [check_shapes, check_prompt, check_batches_rows_cache_and_heads,
                                   check_every_steering_path_gives_the_same_logits,
                                   check_fast_aie_equals_reference,
                                   check_minimal_paths_are_taken_and_a_null_patch_is_zero]


def _stand_in_groups() -> dict[str, list[str]]:
    """Registered names grouped by identical stand-in (each distinct stand-in is built once)."""
    groups: dict[str, list[str]] = {}
    for name, spec in sorted(BACKBONES.items()):
        groups.setdefault(repr((spec.stand_in, sorted(spec.stand_in_options.items()))), []).append(name)
    return groups


def _stand_ins() -> list:
    """(name, attention) of every distinct stand-in: both implementations where it takes one."""
    cases = []
    for names in _stand_in_groups().values():
        takes = BACKBONES[names[0]].stand_in_takes("attn_implementation")
        cases += [pytest.param((names[0], a), id=f"{names[0]}-{a}") for a in (("eager", "sdpa") if takes else (None,))]
    return cases


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return read_scenes(generate_split(tmp_path_factory.mktemp("c"), "eval", 12, image_size=64, workers=1, progress=False))


@pytest.fixture(scope="module", params=_stand_ins())
def adapter(request):
    name, attention = request.param
    options = {} if attention is None else {"attn_implementation": attention}
    return BACKBONES[name].build_stand_in(**options)


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=lambda c: c.__name__)
def test_contract(adapter, scenes, check):
    check(adapter, scenes)


def test_a_new_registry_entry_is_checked_without_editing_tests(monkeypatch, scenes):
    """One spec (here: another stand-in shape) is all a new backbone needs to be in the suite."""
    spec = BackboneSpec("mfv.models.openflamingo.tiny:random_openflamingo",
                        "mfv.models.openflamingo.tiny:random_openflamingo",
                        {"image_size": 64, "patch_size": 16, "hidden_size": 48, "num_layers": 3, "num_heads": 6,
                         "intermediate_size": 64}, "throwaway")
    monkeypatch.setitem(BACKBONES, "throwaway", spec)
    assert any("throwaway" in names for names in _stand_in_groups().values())
    adapter = BACKBONES["throwaway"].build_stand_in()
    assert (adapter.num_layers, adapter.num_heads) == (3, 6)
    for check in CONTRACT_CHECKS:
        check(adapter, scenes)
