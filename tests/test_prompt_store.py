"""The fine-tuning prompt store: stored prompt passes give the losses, trained FVs and
validation logits of recomputing every prompt at every step, within a budget that says when
it is full."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mfv.data.episodes import EncodedBatch
from mfv.models import BACKBONES
from mfv.models.base import Example
from mfv.steering import Injection, steered_logits
from mfv.training.prompt_store import PromptStore

COLORS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]


@pytest.fixture(scope="module")
def qwen3vl():
    return BACKBONES["qwen3vl-random"].build(num_layers=4)


def _encoded(adapter, count: int = 6) -> list[tuple[object, int]]:
    """``count`` prompts of different lengths (0-2 demonstrations, own images) with answer ids."""
    words = ["dog", "cat", "apple", "ball"]
    out = []
    for i in range(count):
        demos = [Example(Image.new("RGB", (64, 64), COLORS[(i + d + 1) % 8]), words[d], words[d + 1])
                 for d in range(i % 3)]
        prompt = adapter.build_prompt(demos, Example(Image.new("RGB", (64, 64), COLORS[i % 8]), words[i % 4]))
        out.append((prompt, adapter.answer_token_id(prompt.text, words[(i + 1) % 4])))
    return out


def _batch(adapter, items, rows: list[int]) -> EncodedBatch:
    prompts = adapter.collate([items[r][0] for r in rows])
    return EncodedBatch(prompts, torch.tensor([items[r][1] for r in rows]), torch.tensor([r % 2 for r in rows]),
                        torch.tensor(rows))


def _fit(adapter, items, store: PromptStore | None, layers: tuple[int, ...], epochs: int = 2, batch_size: int = 4):
    """Adam on one FV per relation (2 relations) over shuffled epochs; losses, FVs, val logits."""
    torch.manual_seed(0)
    fvs = torch.nn.Parameter(torch.randn(2, len(layers), adapter.hidden_size) * 0.1)
    optimizer = torch.optim.Adam([fvs], lr=0.05)
    order = torch.Generator().manual_seed(1)
    losses, validation = [], []

    def logits(batch: EncodedBatch, split: str) -> torch.Tensor:
        injection = Injection(layers, fvs[batch.relation_ids])
        if store is None:
            return steered_logits(adapter, batch.prompts, injection)
        return store.logits(adapter, batch, injection, split)

    for _ in range(epochs):
        rows = torch.randperm(len(items), generator=order).tolist()
        for start in range(0, len(rows), batch_size):
            batch = _batch(adapter, items, rows[start:start + batch_size])
            loss = torch.nn.functional.cross_entropy(logits(batch, "train").float(), batch.answer_ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        with torch.no_grad():  # validation: fixed prompts, in one batch
            validation.append(logits(_batch(adapter, items, [4, 1, 2]), "val"))
    return torch.stack(losses), fvs.detach(), torch.stack(validation)


@pytest.mark.parametrize("fixture", ["tiny_adapter", "qwen3vl"])
def test_stored_prompts_train_as_recomputing_them(fixture, request):
    adapter = request.getfixturevalue(fixture)
    items = _encoded(adapter)
    layers = (0, 1)  # injected after 0 and 1: the store keeps layers 1.. (distributed FVs)
    store = PromptStore(1.0, say=None)
    stored = _fit(adapter, items, store, layers)
    recomputed = _fit(adapter, items, None, layers)
    for mine, reference in zip(stored, recomputed):
        torch.testing.assert_close(mine, reference, atol=2e-5, rtol=1e-5)
    # Each prompt's pass ran once: 6 training prompts, then the 3 validation ones.
    assert store.recomputed == len(items) + 3 and len(store) == len(items) + 3


def test_a_full_store_recomputes_the_rest_and_says_so_once(tiny_adapter):
    items = _encoded(tiny_adapter)
    said: list[str] = []
    probe = PromptStore(1.0, say=None)
    with torch.no_grad():  # item 0 is the shortest prompt (no demonstration)
        probe.logits(tiny_adapter, _batch(tiny_adapter, items, [0]), Injection((1,), torch.zeros(1, 32)), "train")
    store = PromptStore(2.5 * probe.used / 1e9, say=said.append)  # room for two of the shortest prompts
    stored = _fit(tiny_adapter, items, store, (1,), epochs=3)
    recomputed = _fit(tiny_adapter, items, None, (1,), epochs=3)
    for mine, reference in zip(stored, recomputed):
        torch.testing.assert_close(mine, reference, atol=2e-5, rtol=1e-5)
    assert 1 <= len(store) < len(items) and store.used <= store.budget
    # Every epoch recomputes what is not kept: of 9 prompts (6 + 3 val), all in the first epoch.
    assert 3 * 9 - 2 * len(store) <= store.recomputed < 3 * 9
    assert len(said) == 1 and "model.prompt_store_gb" in said[0] and f"holds {len(store)} prompts" in said[0]


def test_a_prompt_at_a_known_index_that_changed_is_recomputed(tiny_adapter):
    items = _encoded(tiny_adapter)
    store = PromptStore(1.0, say=None)
    injection = Injection((1,), torch.zeros(1, tiny_adapter.hidden_size))
    store.logits(tiny_adapter, _batch(tiny_adapter, items, [0, 1]), injection, "train")
    swapped = _batch(tiny_adapter, items, [2, 1])
    swapped.indices[:] = torch.tensor([0, 1])  # index 0 now names another prompt
    with torch.no_grad():
        logits = store.logits(tiny_adapter, swapped, injection, "train")
        reference = steered_logits(tiny_adapter, swapped.prompts, injection)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert store.recomputed == 3


def _fit_module(tmp_path, budget_gb: float, monkeypatch) -> tuple[torch.Tensor, list[float], int, tuple[int, int]]:
    """A Lightning fit of 2 shuffled epochs with a validation pass each: FVs, val losses, prompt
    passes, and the counts of training and validation prompts."""
    import lightning as L

    from mfv.data.datamodule import SyntheticRelationDataModule
    from mfv.training.module import FunctionVectorModule

    module = FunctionVectorModule("openflamingo-random", {"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                                          "num_layers": 3, "num_heads": 4, "intermediate_size": 64},
                                  layer=1, init="random", lr=0.05, prompt_store_gb=budget_gb)
    data = SyntheticRelationDataModule(str(tmp_path / "data"), module.relations, shots=1, image_size=32, batch_size=3,
                                       num_images={"eval": 4, "train": 10, "test": 4, "novel": 4, "composite": 4})
    passes, val_losses = [0], []
    real_prefill = type(module.adapter).prefill
    monkeypatch.setattr(type(module.adapter), "prefill", lambda self, batch: (
        passes.__setitem__(0, passes[0] + len(batch)), real_prefill(self, batch))[1])

    class ValLoss(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            val_losses.append(float(trainer.callback_metrics["val/loss"]))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ValLoss()])
    trainer.fit(module, datamodule=data)
    sizes = len(trainer.train_dataloader.dataset), len(trainer.val_dataloaders.dataset)
    return module.function_vectors.detach().clone(), val_losses, passes[0], sizes


def test_a_fit_from_the_store_equals_a_fit_that_recomputes(tmp_path, monkeypatch):
    stored, stored_val, stored_passes, (train, val) = _fit_module(tmp_path, 2.0, monkeypatch)
    recomputed, recomputed_val, recomputed_passes, _ = _fit_module(tmp_path, 0.0, monkeypatch)
    torch.testing.assert_close(stored, recomputed, atol=1e-6, rtol=1e-5)
    assert stored_val == pytest.approx(recomputed_val, abs=1e-5) and len(stored_val) == 2
    # Each training and validation prompt passed once, in the first epoch (recomputing passes
    # every training prompt every epoch; its validation runs the full forward, not a prefill).
    assert train >= 4 and val >= 1 and stored_passes == train + val and recomputed_passes == 2 * train


def test_the_budget_is_checked_before_anything_is_built():
    from mfv.errors import ConfigError
    from mfv.training.prompt_store import check_budget

    with pytest.raises(ConfigError, match="model.prompt_store_gb = -1 must be a number of gigabytes >= 0"):
        check_budget(-1)
