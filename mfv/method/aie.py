"""Causal mediation analysis: mean head activations and average indirect effects (AIE).

IE of head (l, h) on a corrupted prompt =
P(answer | corrupted, head's last-token output := relation mean) - P(answer | corrupted).

Two exact algorithms and one estimate (:func:`indirect_effects` picks one):

* ``reference`` (:func:`_reference_effects`): one full forward per (prompt, layer, head),
  as the published scripts do.
* ``fast`` (:func:`_fast_effects`): the patch only touches the last position, so every
  earlier position's keys and values equal the corrupted run's. Each corrupted prompt is
  run once (images encoded once, prefix cached); then only the last position is
  recomputed, for many (prompt, head) pairs per batch. Backbones with a minimal path
  (:meth:`BackboneAdapter.single_head_patch_probabilities`; OpenFlamingo and every Hugging
  Face family) recompute each site only from its patched layer upward, sharing the prompt's
  prefix (and image) keys/values. They agree to float rounding (tested to 1e-5).
* ``attribution`` (:func:`attribution_effects`; attribution patching, a first-order
  estimate): one forward and one backward per batch of corrupted prompts;
  IE(l, h) ~ dP/da_{l,h} . (mean_{l,h} - a_{l,h}) at the last position. Not exact: its
  agreement with exact AIE is measured in ``benchmarks/attribution.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from mfv.console import progress as tqdm  # plain lines in a log
from mfv.data.episodes import EncodedBatch
from mfv.hooks import HeadPatch, patch_heads, record_heads
from mfv.models.base import BackboneAdapter

Algorithm = Literal["fast", "reference", "attribution"]


@dataclass
class MeanActivations:
    """Per-relation mean last-token output of every head.

    Attributes:
        means: ``(relations, layers, heads, head_dim)``.
        kept: prompts averaged per relation (answered correctly, unless a fallback).
        seen: prompts seen per relation.
        fallback: relations with no correct prompt, averaged over all their prompts.
    """

    means: torch.Tensor
    kept: list[int]
    seen: list[int]
    fallback: list[int]


@torch.no_grad()
def accumulate_means(
    adapter: BackboneAdapter, batches: Iterable[EncodedBatch], num_relations: int, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of head activations over correct and over all prompts, per relation.

    Returns ``(sum_correct, count_correct, sum_all, count_all)``; sums are fp64 so that
    shards can be added in any order without changing the result.
    """
    shape = (num_relations, adapter.num_layers, adapter.num_heads, adapter.head_dim)
    sum_correct = torch.zeros(shape, dtype=torch.float64)
    sum_all = torch.zeros(shape, dtype=torch.float64)
    count_correct = torch.zeros(num_relations, dtype=torch.long)
    count_all = torch.zeros(num_relations, dtype=torch.long)
    for batch in tqdm(batches, desc="mean activations", disable=not progress, leave=False):
        with record_heads(adapter) as recording:
            logits = adapter.forward(batch.prompts)
        activations = recording.stacked().double().cpu()
        correct = (logits.argmax(-1).cpu() == batch.answer_ids).long()
        relations = batch.relation_ids.cpu()
        sum_all.index_add_(0, relations, activations)
        sum_correct.index_add_(0, relations, activations * correct[:, None, None, None])
        count_all.index_add_(0, relations, torch.ones_like(relations))
        count_correct.index_add_(0, relations, correct)
    return sum_correct, count_correct, sum_all, count_all


def finalize_means(
    sum_correct: torch.Tensor, count_correct: torch.Tensor, sum_all: torch.Tensor, count_all: torch.Tensor
) -> MeanActivations:
    """Means over correct prompts; a relation with none falls back to all its prompts."""
    fallback = [r for r in range(len(count_all)) if count_correct[r] == 0]
    sums = sum_correct.clone()
    counts = count_correct.clone()
    for r in fallback:
        sums[r], counts[r] = sum_all[r], count_all[r]
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"no prompt at all for relation index(es) {missing}: give the extraction more prompts")
    means = (sums / counts[:, None, None, None]).float()
    return MeanActivations(means, count_correct.tolist(), count_all.tolist(), fallback)


def mean_head_activations(
    adapter: BackboneAdapter, batches: Iterable[EncodedBatch], num_relations: int, progress: bool = True
) -> MeanActivations:
    """Per-relation means over clean N-shot prompts the model answers correctly."""
    return finalize_means(*accumulate_means(adapter, batches, num_relations, progress))


def answer_probability(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The softmax probability of each row's answer token, ``(B,)`` fp32."""
    return logits.float().softmax(-1).gather(-1, answers[:, None].to(logits.device)).squeeze(-1)


def _all_heads(adapter: BackboneAdapter, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    layer_index = torch.tensor(layers).repeat_interleave(adapter.num_heads)
    head_index = torch.arange(adapter.num_heads).repeat(len(layers))
    return layer_index, head_index


@torch.no_grad()
def indirect_effects(
    adapter: BackboneAdapter,
    batch: EncodedBatch,
    means: torch.Tensor,
    algorithm: Algorithm = "fast",
    layers: list[int] | None = None,
    rows_per_pass: int = 512,
) -> torch.Tensor:
    """IE of every head of ``layers`` on every corrupted prompt of ``batch``.

    Picks one algorithm: :func:`_reference_effects`, :func:`_fast_effects` or
    :func:`attribution_effects` (see module docstring).

    Args:
        adapter: The backbone.
        batch: Corrupted prompts with answers and relation ids.
        means: ``(relations, layers, heads, head_dim)`` mean activations.
        algorithm: ``fast``, ``reference`` or ``attribution``.
        layers: Layers to analyse (default: all).
        rows_per_pass: Patched rows per forward of the fast algorithm.

    Returns:
        ``(prompts, len(layers), heads)`` indirect effects (fp32, on the CPU).
    """
    adapter.check_fast_path_preconditions()
    layers = list(range(adapter.num_layers)) if layers is None else list(layers)
    if algorithm == "reference":
        return _reference_effects(adapter, batch, means, layers)
    if algorithm == "attribution":
        return attribution_effects(adapter, batch, means, layers)
    if algorithm != "fast":
        raise ValueError(f"algorithm must be 'fast', 'reference' or 'attribution', got {algorithm!r}")
    return _fast_effects(adapter, batch, means, layers, rows_per_pass)


def _patch_values(adapter: BackboneAdapter, batch: EncodedBatch, means: torch.Tensor,
                  layers: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sites of ``layers`` (layer and head index of each) and ``values[p, s]``, the mean
    activation of site ``s`` for prompt ``p``'s relation, ``(P, sites, head_dim)``."""
    layer_index, head_index = _all_heads(adapter, layers)
    values = means[batch.relation_ids.cpu()][:, layer_index, head_index]
    return layer_index, head_index, values


@torch.no_grad()
def _reference_effects(adapter: BackboneAdapter, batch: EncodedBatch, means: torch.Tensor,
                      layers: list[int]) -> torch.Tensor:
    """Exact IE, the published scripts' way: one full forward per (prompt, layer, head).

    Returns:
        ``(prompts, len(layers), heads)`` indirect effects (fp32, on the CPU).
    """
    layer_index, head_index, values = _patch_values(adapter, batch, means, layers)
    num_prompts, answers = len(batch), batch.answer_ids
    effects = torch.empty(num_prompts, len(layer_index))
    for p in range(num_prompts):
        single = adapter.select_rows(batch.prompts, torch.tensor([p]))
        base = answer_probability(adapter.forward(single), answers[p : p + 1])
        for s in range(len(layer_index)):
            patch = HeadPatch(torch.tensor([0]), layer_index[s : s + 1], head_index[s : s + 1], values[p, s : s + 1])
            with patch_heads(adapter, patch):
                patched = answer_probability(adapter.forward(single), answers[p : p + 1])
            effects[p, s] = (patched - base).cpu()
    return effects.reshape(num_prompts, len(layers), adapter.num_heads)


@torch.no_grad()
def _fast_effects(adapter: BackboneAdapter, batch: EncodedBatch, means: torch.Tensor, layers: list[int],
                 rows_per_pass: int = 512) -> torch.Tensor:
    """Exact IE from one pass per corrupted prompt plus last-position recomputations.

    Over all layers, a backbone's minimal path
    (:meth:`BackboneAdapter.single_head_patch_probabilities`) is used where it has one;
    otherwise the generic cached last-position pass (:func:`_generic_fast_effects`).

    Returns:
        ``(prompts, len(layers), heads)`` indirect effects (fp32, on the CPU).
    """
    _, _, values = _patch_values(adapter, batch, means, layers)
    if layers == list(range(adapter.num_layers)):
        minimal = adapter.single_head_patch_probabilities(
            batch.prompts, values.reshape(len(batch), len(layers), adapter.num_heads, -1), batch.answer_ids)
        if minimal is not None:
            base, patched = minimal  # base: (P, L), through the same computation as its rows
            return patched - base[..., None]
    return _generic_fast_effects(adapter, batch, values, layers, rows_per_pass)


ROW_COPY_BUDGET = 1 << 30  # least bytes of per-row cache copies allowed in one pass of the generic fast path


def _generic_fast_effects(adapter: BackboneAdapter, batch: EncodedBatch, values: torch.Tensor, layers: list[int],
                          rows_per_pass: int) -> torch.Tensor:
    """Fast AIE through the adapter's cached last-position pass (:meth:`BackboneAdapter.forward_last`).

    Every row of layer ``l`` (one per head, plus that layer's baseline) has all heads of
    ``l`` set to the full forward's own outputs (what the reference loop's hook sees), and
    its head ``h`` to the patch value. Baseline and patched rows thus run the same
    computation, so a patch that writes a head's own activation gives exactly zero, in any dtype.
    """
    heads = adapter.num_heads
    num_prompts = len(batch)
    state = adapter.prefill(batch.prompts)
    # forward_last copies a prompt's cached keys and values per row (transformers' cache
    # concatenates), and every pass reads all weights: rows of a pass are bounded by copies of
    # at most half the weights' bytes (at least 1 GiB), which balances the two (162 MB a row
    # for a 4B model at 1100 tokens: 512 rows would need 83 GB; 27 rows copy 4.4 GB).
    weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
    budget = max(ROW_COPY_BUDGET, weights // 2)
    rows_per_pass = max(1, min(rows_per_pass, budget // max(1, state.row_bytes())))
    with record_heads(adapter, layers) as recording:
        adapter.forward(batch.prompts)
    own = recording.stacked()  # (P, len(layers), H, head_dim), the full forward's
    slots = heads + 1  # slot h patches head h; slot H is the layer's baseline
    prompt_of = torch.arange(num_prompts).repeat_interleave(len(layers) * slots)
    position_of = torch.arange(len(layers)).repeat_interleave(slots).repeat(num_prompts)
    slot_of = torch.arange(slots).repeat(num_prompts * len(layers))
    layer_numbers = torch.tensor(layers)
    probabilities = torch.empty(len(prompt_of))
    for start in range(0, len(prompt_of), rows_per_pass):
        prompts = prompt_of[start : start + rows_per_pass]
        positions = position_of[start : start + rows_per_pass]
        slot = slot_of[start : start + rows_per_pass]
        written = own[prompts.to(own.device), positions.to(own.device)].clone()  # (n, H, head_dim)
        patched = (slot < heads).nonzero().flatten()
        written[patched.to(own.device), slot[patched].to(own.device)] = values[
            prompts[patched], positions[patched] * heads + slot[patched]].to(own.device, own.dtype)
        count = len(prompts)
        patch = HeadPatch(torch.arange(count).repeat_interleave(heads),
                          layer_numbers[positions].repeat_interleave(heads), torch.arange(heads).repeat(count),
                          written.reshape(count * heads, -1))
        with patch_heads(adapter, patch):
            logits = adapter.forward_last(state, prompts)
        probabilities[start : start + count] = answer_probability(logits, batch.answer_ids[prompts]).cpu()
    probabilities = probabilities.reshape(num_prompts, len(layers), slots)
    return probabilities[..., :heads] - probabilities[..., heads:]


def attribution_effects(
    adapter: BackboneAdapter, batch: EncodedBatch, means: torch.Tensor, layers: list[int] | None = None
) -> torch.Tensor:
    """First-order estimate of every head's IE from one forward and one backward pass.

    A zero offset that requires grad is added to each head site's last-position input, so
    its gradient is the total derivative of the answer probability with respect to that
    activation (every downstream path included); rows do not interact, so one backward of
    the summed probabilities gives every row's gradient.

    Returns:
        ``(prompts, len(layers), heads)`` estimated effects (fp32, CPU).
    """
    layers = list(range(adapter.num_layers)) if layers is None else list(layers)
    offsets: dict[int, torch.Tensor] = {}
    activations: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            offset = torch.zeros_like(x[:, -1:], requires_grad=True)
            offsets[layer], activations[layer] = offset, x[:, -1].detach()
            return (torch.cat([x[:, :-1], x[:, -1:] + offset], dim=1), *args[1:])
        return hook

    handles = [adapter.head_site(layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            logits = adapter.forward(batch.prompts)
            answer_probability(logits, batch.answer_ids).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    relation = batch.relation_ids.cpu()
    effects = []
    for layer in layers:
        grad = offsets[layer].grad[:, 0].float().reshape(len(batch), adapter.num_heads, -1).cpu()
        act = activations[layer].float().reshape(len(batch), adapter.num_heads, -1).cpu()
        effects.append((grad * (means[relation, layer].float().cpu() - act)).sum(-1))
    return torch.stack(effects, dim=1)


def top_heads(aie: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs of largest AIE, best first.

    Args:
        aie: ``(layers, heads)`` average indirect effects.
    """
    if not 1 <= k <= aie.numel():
        raise ValueError(f"k must be in 1..{aie.numel()}, got {k}")
    order = torch.argsort(aie.flatten(), descending=True, stable=True)[:k]
    heads = aie.shape[1]
    return [(int(i) // heads, int(i) % heads) for i in order]


def positive_mass_share(aie: torch.Tensor, k: int) -> float:
    """Share of the total positive AIE carried by the top ``k`` heads."""
    positive = aie.clamp(min=0)
    total = float(positive.sum())
    if total == 0:
        return 0.0
    return float(positive.flatten().sort(descending=True).values[:k].sum()) / total
