"""The OpenFlamingo adapter and the intervention hooks on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from mfv.errors import ConfigError, MissingWeightsError
from mfv.hooks import HeadPatch, add_to_residual, head_output_contributions, patch_heads, record_heads
from mfv.models import load_backbone
from mfv.models.openflamingo import load_openflamingo, load_tiny_openflamingo, remap_checkpoint_key, save_tiny_openflamingo
from mfv.models.weights import cast_weights

from .conftest import random_patch_values


def test_prompt_format_is_the_papers(tiny_adapter, prompts):
    assert prompts[0].text == "<image>Q:dog. A:"
    assert prompts[2].text == (
        "<image>Q:apple. A:ball.<|endofchunk|>\n<image>Q:egg. A:fish.<|endofchunk|>\n<image>Q:hat. A:"
    )
    assert len(prompts[2].images) == 3


def test_left_padded_batch_equals_rows_one_at_a_time(tiny_adapter, prompts):
    batched = tiny_adapter.forward(tiny_adapter.collate(prompts))
    for i, prompt in enumerate(prompts):
        single = tiny_adapter.forward(tiny_adapter.collate([prompt]))
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=0)


def test_images_change_the_output(tiny_adapter, prompts):
    batch = tiny_adapter.collate([prompts[1]])
    other = tiny_adapter.collate([prompts[1]])
    other.pixel_values = torch.randn_like(other.pixel_values)
    assert not torch.allclose(tiny_adapter.forward(batch), tiny_adapter.forward(other))


def test_forward_last_reuses_the_prefix_exactly(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    full = tiny_adapter.forward(batch)
    state = tiny_adapter.prefill(batch)
    rows = torch.tensor([2, 0, 1, 1])
    torch.testing.assert_close(tiny_adapter.forward_last(state, rows), full[rows], atol=1e-5, rtol=0)


def test_answer_token_is_the_object_word(tiny_adapter, prompts):
    token = tiny_adapter.answer_token_id(prompts[1].text, "fish")
    assert token == tiny_adapter.tokenizer.convert_tokens_to_ids("fish")


def test_per_head_decomposition_reproduces_the_projection(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    outputs = {}
    site = tiny_adapter.head_site(1)
    handle = site.register_forward_hook(lambda m, a, out: outputs.__setitem__("dense", out[:, -1].detach()))
    try:
        with record_heads(tiny_adapter) as recording:
            tiny_adapter.forward(batch)
    finally:
        handle.remove()
    contributions = head_output_contributions(tiny_adapter, 1, recording.by_layer[1])
    reconstructed = contributions.sum(dim=1) + site.bias
    torch.testing.assert_close(reconstructed, outputs["dense"], atol=1e-5, rtol=0)
    assert recording.stacked().shape == (3, tiny_adapter.num_layers, tiny_adapter.num_heads, tiny_adapter.head_dim)


def test_replacing_a_head_with_its_own_activation_changes_nothing(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    with record_heads(tiny_adapter) as recording:
        clean = tiny_adapter.forward(batch)
    own = recording.by_layer[1][torch.arange(3), torch.tensor([0, 2, 3])]
    patch = HeadPatch(torch.arange(3), torch.ones(3, dtype=torch.long), torch.tensor([0, 2, 3]), own)
    with patch_heads(tiny_adapter, patch):
        patched = tiny_adapter.forward(batch)
    torch.testing.assert_close(patched, clean, atol=1e-6, rtol=0)


def test_patching_changes_the_logits(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    clean = tiny_adapter.forward(batch)
    patch = HeadPatch(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), 10 * random_patch_values(tiny_adapter, 1))
    with patch_heads(tiny_adapter, patch):
        patched = tiny_adapter.forward(batch)
    assert not torch.allclose(patched[0], clean[0], atol=1e-4)
    torch.testing.assert_close(patched[1:], clean[1:], atol=1e-6, rtol=0)


def test_rows_patching_different_heads_equal_rows_run_one_at_a_time(tiny_adapter, prompts):
    batch = tiny_adapter.collate([prompts[2]] * 3)
    values = random_patch_values(tiny_adapter, 4, seed=1)
    rows = torch.tensor([0, 0, 1, 2])
    layers = torch.tensor([0, 2, 1, 2])
    heads = torch.tensor([1, 3, 0, 2])
    with patch_heads(tiny_adapter, HeadPatch(rows, layers, heads, values)):
        together = tiny_adapter.forward(batch)
    single_batch = tiny_adapter.collate([prompts[2]])
    for row in range(3):
        mask = rows == row
        patch = HeadPatch(torch.zeros(int(mask.sum()), dtype=torch.long), layers[mask], heads[mask], values[mask])
        with patch_heads(tiny_adapter, patch):
            alone = tiny_adapter.forward(single_batch)
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=0)


def _all_position_logits(adapter, batch):
    with adapter.conditioned(batch.pixel_values):
        out = adapter.model.lang_encoder(**adapter.lm_inputs(batch.input_ids, batch.attention_mask))
    return out.logits


def test_zero_vector_changes_nothing(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    clean = tiny_adapter.forward(batch)
    with add_to_residual(tiny_adapter, 1, torch.zeros(tiny_adapter.hidden_size)):
        torch.testing.assert_close(tiny_adapter.forward(batch), clean, atol=0, rtol=0)


def test_vector_changes_only_the_last_position(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    clean = _all_position_logits(tiny_adapter, batch)
    vector = torch.randn(tiny_adapter.hidden_size, generator=torch.Generator().manual_seed(3))
    with add_to_residual(tiny_adapter, 1, vector):
        steered = _all_position_logits(tiny_adapter, batch)
    # Padding positions are never read; every real earlier position must be untouched.
    real = batch.attention_mask[:, :-1].bool()
    torch.testing.assert_close(steered[:, :-1][real], clean[:, :-1][real], atol=0, rtol=0)
    assert (steered[:, -1] - clean[:, -1]).abs().max() > 1e-3


def test_vector_is_not_added_at_generated_tokens(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    vector = torch.randn(tiny_adapter.hidden_size, generator=torch.Generator().manual_seed(4))
    state_plain = tiny_adapter.prefill(batch)
    rows = torch.arange(len(batch))
    plain = tiny_adapter.forward_last(state_plain, rows)
    with add_to_residual(tiny_adapter, 1, vector):
        continued = tiny_adapter.forward_last(state_plain, rows)
    torch.testing.assert_close(continued, plain, atol=0, rtol=0)


def test_per_row_vectors(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    vectors = torch.randn(3, tiny_adapter.hidden_size, generator=torch.Generator().manual_seed(5))
    with add_to_residual(tiny_adapter, 2, vectors):
        together = tiny_adapter.forward(batch)
    with add_to_residual(tiny_adapter, 2, vectors[1]):
        alone = tiny_adapter.forward(tiny_adapter.collate([prompts[1]]))
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("context", ["record", "patch", "add"])
def test_no_hook_remains_after_an_exception(tiny_adapter, context):
    def hook_count() -> int:
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny_adapter.model.modules())

    before = hook_count()
    managers = {
        "record": lambda: record_heads(tiny_adapter),
        "patch": lambda: patch_heads(
            tiny_adapter,
            HeadPatch(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.zeros(1, tiny_adapter.head_dim)),
        ),
        "add": lambda: add_to_residual(tiny_adapter, 0, torch.zeros(tiny_adapter.hidden_size)),
    }
    with pytest.raises(RuntimeError, match="boom"):
        with managers[context]():
            assert hook_count() > before
            raise RuntimeError("boom")
    assert hook_count() == before


def test_layer_out_of_range_is_a_clear_error(tiny_adapter):
    with pytest.raises(ValueError, match="layers 0..2"):
        with add_to_residual(tiny_adapter, 7, torch.zeros(tiny_adapter.hidden_size)):
            pass


def test_missing_checkpoint_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    with pytest.raises(MissingWeightsError) as info:
        load_openflamingo("openflamingo-4b", checkpoint_path=str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "huggingface-cli download openflamingo/OpenFlamingo-4B-vitl-rpj3b checkpoint.pt" in message


def test_release_absent_from_the_cache_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="not in the Hugging Face cache"):
        load_openflamingo("openflamingo-4b", cache_dir=str(tmp_path))


def test_missing_tiny_model_names_the_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="config.json"):
        load_tiny_openflamingo(tmp_path)


def test_tiny_model_round_trip(tiny_adapter, prompts, tmp_path):
    save_tiny_openflamingo(tiny_adapter, tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("card")
    save_tiny_openflamingo(tiny_adapter, tmp_path / "m")  # a re-save keeps the model card, leaves no staging
    assert (tmp_path / "m" / "README.md").read_text() == "card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded = load_backbone("openflamingo-tiny", directory=str(tmp_path / "m"))
    batch = tiny_adapter.collate(prompts)
    torch.testing.assert_close(loaded.forward(loaded.collate(prompts)), tiny_adapter.forward(batch), atol=0, rtol=0)


def test_checkpoint_key_drifts_are_remapped():
    model_keys = {"lang_encoder.lm_head.weight", "perceiver.latents"}
    state = {"module.lang_encoder.embed_out.weight": torch.zeros(1), "perceiver.latents": torch.ones(1)}
    assert {remap_checkpoint_key(key, model_keys) for key in state} == model_keys


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="valid backbones"):
        load_backbone("no-such-model")
    with pytest.raises(ConfigError, match="valid options"):
        load_backbone("openflamingo-tiny", directory="x", colour="red")


def test_reuse_context_encodes_each_image_once_and_changes_nothing(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    plain = tiny_adapter.forward(batch)
    calls = []
    handle = tiny_adapter.model.vision_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        with tiny_adapter.reuse_context():
            first = tiny_adapter.forward(batch)
            again = tiny_adapter.forward(batch)
    finally:
        handle.remove()
    torch.testing.assert_close(first, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, plain, atol=1e-6, rtol=0)
    # 6 image slots, 5 distinct images (the zero padding is one more): each encoded once, alone
    # (its latents then never depend on the batch that first met it), never again.
    assert calls == [1] * 6


def test_immediate_media_attention_equals_the_masked_original(tiny_adapter):
    """Grouped by image, without the masked products: the same output at every position,
    including left padding, text before the first image and prompts with fewer images."""
    from mfv.models.openflamingo.cross_attention import attend_immediate_media_only, immediate_media_attention

    attn = next(layer.gated_cross_attn_layer.attn for layer in tiny_adapter.blocks if layer.gated_cross_attn_layer)
    generator = torch.Generator().manual_seed(0)
    media_dim = attn.to_kv.in_features
    x = torch.randn(3, 12, attn.to_q.in_features, generator=generator)
    media = torch.randn(3, 4, 5, media_dim, generator=generator)
    locations = torch.zeros(3, 12, dtype=torch.bool)
    locations[0, [0, 3, 4, 9]] = True  # four images, one segment of a single token
    locations[1, [5, 8]] = True  # two images after five text-only (or padding) positions
    locations[2, 11] = True  # one image, at the last position
    with torch.no_grad():
        expected = type(attn).forward(attn, x, media, media_locations=locations)
        got = immediate_media_attention(attn, x, media, media_locations=locations)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got[1, :5].abs().max() == 0  # nothing before the first image, as in the original
    with attend_immediate_media_only(tiny_adapter.blocks):
        assert "forward" in vars(attn)
    assert "forward" not in vars(attn)  # restored on exit


def test_reuse_context_changes_no_generation(tiny_adapter, prompts):
    batch = tiny_adapter.collate(prompts)
    plain = tiny_adapter.generate(batch, max_new_tokens=3)
    with tiny_adapter.reuse_context():
        reused = tiny_adapter.generate(batch, max_new_tokens=3)
    assert torch.equal(plain, reused)


def test_reuse_context_works_on_a_bf16_backbone(prompts):
    """Image keys come from raw bytes: bf16 pixels (no numpy dtype) are cached like fp32 ones."""
    from mfv.models.openflamingo import build_tiny_openflamingo

    from .conftest import tiny_config

    adapter = build_tiny_openflamingo(tiny_config())
    cast_weights(adapter.model, torch.bfloat16)
    batch = adapter.collate(prompts)
    plain = adapter.forward(batch)
    with adapter.reuse_context():
        reused = adapter.forward(batch)
    assert reused.dtype == torch.bfloat16
    torch.testing.assert_close(reused.float(), plain.float(), atol=2e-2, rtol=0)
