"""The minimal exact last-position computation for every Hugging Face family.

A patch or an injection at the last position changes nothing before its layer and nothing
at earlier positions. So after one forward of the whole prompt (which leaves every layer's
keys and values, and every layer's last-position input and call arguments) a patched or
steered row needs only the last position of the layers above its site. This module runs
the family's own decoder layers on such rows, with no per-family code:

* each layer is called as the text model calls it, with the recorded keyword arguments cut
  to the last position (rotary or multimodal rotary embeddings, position ids), and a mask
  over the prompt's earlier positions (padding and sliding windows as the model built them);
* attention runs through transformers' attention interface, swapped for
  :func:`last_position_attention` while the layers run: a prompt's rows are extra queries
  that attend to the prompt's cached keys and values (one batched product, never a per-row
  copy of the cache) and to their own key, which is what the full forward computes;
* fast AIE (:func:`single_head_patch_probabilities`): rows patched at layer ``l`` join at
  ``l`` from the recorded input and head outputs, with one baseline row per layer through
  the same computation, so a patch writing a head's own output gives exactly zero in any dtype;
* fine-tuning and evaluation (:func:`steered_logits`): one row per prompt from the first
  injection layer up, differentiable in the vectors.

Families whose layers take other per-token arguments fall back to the generic cached path
(:meth:`mfv.models.hf.HFAdapter.forward_last`); equal to the reference loop to float rounding
(contract test).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mfv.hooks import overwrite_input_rows, record_last_inputs, record_layer_calls
from mfv.models.base import (PrefixState, PromptBatch, first_attended, join_inputs, join_positions,
                             pad_left_cat, share_inputs, share_positions, steer_upward)

if TYPE_CHECKING:
    from mfv.models.hf import HFAdapter

ATTENTION = "mfv_last_position"
# Layer arguments that only concern the cache or the output format: a replay does without them.
_DROPPED = {"past_key_values", "past_key_value", "cache_position", "use_cache", "output_attentions"}
# Bytes of attention scores one replay may hold: bounds the prompts replayed together.
SCORE_BUDGET = 1 << 30


def last_position_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor, scaling: float, dropout: float = 0.0,
                            prefix: tuple[torch.Tensor, torch.Tensor] | None = None, softcap: float | None = None,
                            **_: Any) -> tuple[torch.Tensor, None]:
    """Attention of ``M`` last-position rows per prompt over the prompt's cached keys and values
    and each row's own key: transformers' eager attention, without materialising a per-row cache.

    Args:
        module: The attention module (unused beyond the interface).
        query: ``(P, H, M, d)``, rotary applied.
        key: ``(P, KV, M, d)``, the rows' own keys, rotary applied.
        value: ``(P, KV, M, d)``.
        attention_mask: ``(P, 1, 1, S')`` additive mask over the cached positions.
        scaling: Score scale.
        dropout: Ignored (frozen models run in eval mode).
        prefix: ``(keys, values)`` of the cached positions, ``(P, KV, S', d)`` each.
        softcap: Score soft-capping where the family uses it.

    Returns:
        ``((P, M, H, d), None)`` as the attention interface returns it.
    """
    keys, values = prefix
    prompts, heads, rows, size = query.shape
    groups = heads // keys.shape[1]
    grouped = query.reshape(prompts, keys.shape[1], groups * rows, size)  # head h uses key head h // groups
    scores = (grouped @ keys.transpose(-1, -2)).reshape(prompts, heads, rows, -1) * scaling
    own_keys = key[:, :, None].expand(-1, -1, groups, -1, -1).reshape(prompts, heads, rows, size)
    own_values = value[:, :, None].expand(-1, -1, groups, -1, -1).reshape(prompts, heads, rows, size)
    own = (query * own_keys).sum(-1, keepdim=True) * scaling
    if softcap is not None:
        scores, own = (torch.tanh(s / softcap) * softcap for s in (scores, own))
    scores = scores + attention_mask.to(scores.dtype)
    weights = torch.cat([scores, own], dim=-1).softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    prefix_part = weights[..., :-1].reshape(prompts, keys.shape[1], groups * rows, -1) @ values
    out = prefix_part.reshape(prompts, heads, rows, size) + weights[..., -1:] * own_values
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTENTION, last_position_attention)


@dataclass
class Replay:
    """What one whole-prompt forward leaves for last-position replays.

    Attributes:
        inputs: ``L + 1`` tensors ``(P, D)``: the last-position input of each layer, then of the final norm.
        keys: Per layer ``(P, KV, S-1, d)``: cached keys of the earlier positions.
        values: Per layer, the same for values.
        calls: Per layer, the keyword arguments of its call cut to the last position.
        heads: Per layer ``(P, H * d)``: the heads' last-position outputs (recorded for fast AIE only).
    """

    inputs: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    calls: list[dict[str, Any]]
    heads: list[torch.Tensor] | None = None

    def share(self, row: int, first_layer: int) -> "Replay":
        """Prompt ``row``'s share from ``first_layer`` up (:class:`~mfv.models.base.PromptShare`)."""
        above = range(first_layer, len(self.keys))
        start = first_attended([self.calls[i]["attention_mask"][row] for i in above]) if len(above) else 0
        return Replay(share_inputs(self.inputs, row, first_layer), share_positions(self.keys, row, first_layer, start),
                      share_positions(self.values, row, first_layer, start),
                      [None] * first_layer + [_call_share(self.calls[i], row, start) for i in above])

    @classmethod
    def join(cls, shares: Sequence["Replay"]) -> "Replay":
        """A batch of shares, keys and values left-padded and masked (:class:`~mfv.models.base.PromptShare`)."""
        first, inputs = join_inputs([s.inputs for s in shares])
        calls = [None] * first + [_call_join([s.calls[i] for s in shares]) for i in range(first, len(shares[0].calls))]
        return cls(inputs, join_positions([s.keys for s in shares], first),
                   join_positions([s.values for s in shares], first), calls)


def _prefix_mask(recorded: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """The last query's additive mask over positions ``0..S-2`` ``(P, 1, 1, S-1)``: the batch's
    padding, and whatever else the model masked for that query (sliding windows)."""
    valid = mask[:, None, None, :-1].bool()
    if recorded is not None:
        row = recorded[:, :, -1:, :-1]
        valid = valid & (row if row.dtype == torch.bool else row == 0)
    return torch.zeros(valid.shape, device=mask.device).masked_fill(~valid, torch.finfo(torch.float32).min)


def _last_call(kwargs: dict[str, Any], mask: torch.Tensor) -> dict[str, Any] | None:
    """A layer's call arguments cut to the last position; ``None`` if one is not understood."""
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _DROPPED:
            continue
        if name == "attention_mask":
            out[name] = _prefix_mask(value, mask)
        elif name.startswith("position_embeddings"):
            out[name] = tuple(t[..., -1:, :] for t in value)
        elif name == "position_ids":
            out[name] = None if value is None else value[..., -1:]
        elif isinstance(value, torch.Tensor) or (isinstance(value, tuple) and any(
                isinstance(v, torch.Tensor) for v in value)):
            return None  # a per-token argument this replay does not know how to cut
        else:
            out[name] = value
    out.setdefault("attention_mask", _prefix_mask(None, mask))
    return out


# A call's per-prompt tensors and their prompt axis, counted from the end: the mask
# (P, 1, 1, S'), rotary tables (..., P, 1, d), position ids (..., P, 1).
def _prompt_axis(name: str) -> int | None:
    if name.startswith("position_embeddings"):
        return -3
    return -2 if name == "position_ids" else None


def _call_share(call: dict[str, Any], row: int, start: int) -> dict[str, Any]:
    """One prompt's share of a layer's replay call: its own rows, the mask from ``start`` on."""
    def own(t: torch.Tensor, axis: int) -> torch.Tensor:  # a table shared by every prompt (size 1) stays so
        return t.narrow(axis, row if t.shape[axis] > 1 else 0, 1).clone()

    out = dict(call)
    out["attention_mask"] = call["attention_mask"][row:row + 1, ..., start:].clone()
    for name, value in call.items():
        axis = _prompt_axis(name)
        if axis is not None and value is not None:
            out[name] = tuple(own(t, axis) for t in value) if isinstance(value, tuple) else own(value, axis)
    return out


def _call_join(calls: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shares' calls as one batch's: masks left-padded (padding masked out), the rest stacked."""
    out = dict(calls[0])
    mask = calls[0]["attention_mask"]
    out["attention_mask"] = pad_left_cat([c["attention_mask"] for c in calls], -1, torch.finfo(mask.dtype).min)
    for name, value in calls[0].items():
        axis = _prompt_axis(name)
        if axis is None or value is None:
            continue
        if isinstance(value, tuple):
            out[name] = tuple(torch.cat([c[name][k] for c in calls], dim=axis) for k in range(len(value)))
        else:
            out[name] = torch.cat([c[name] for c in calls], dim=axis)
    return out


def _rows_call(call: dict[str, Any], rows: int) -> dict[str, Any]:
    """``call`` for ``rows`` rows per prompt: every row sits at the prompt's last position."""
    out = dict(call)
    for name, value in call.items():
        if name.startswith("position_embeddings"):
            out[name] = tuple(t.expand(*t.shape[:-2], rows, t.shape[-1]) for t in value)
        elif name == "position_ids" and value is not None:
            out[name] = value.expand(*value.shape[:-1], rows)
    return out


def prefill(adapter: HFAdapter, batch: PromptBatch, record_heads: bool = False) -> PrefixState:
    """The whole prompt once (no graph): the cache of positions ``0..S-2`` for
    :meth:`HFAdapter.forward_last`, the :class:`Replay` under ``"minimal"`` (``None`` where
    the family's layers take arguments it cannot cut), and the unsteered logits."""
    from transformers import DynamicCache

    per_token, vision = adapter._inputs(batch)
    layers = adapter.layers
    sites = [adapter.head_site(i) for i in range(adapter.num_layers)] if record_heads else []
    with (torch.no_grad(), record_layer_calls(layers) as calls,
          record_last_inputs([adapter.final_norm, *sites]) as last):
        out = adapter.model(**per_token, **vision, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    mask = per_token["attention_mask"]
    keys = [layer.keys[:, :, :-1] for layer in out.past_key_values.layers]
    values = [layer.values[:, :, :-1] for layer in out.past_key_values.layers]
    cut = [_last_call(kwargs, mask) for _, kwargs in calls]
    replay = None if any(c is None for c in cut) else Replay(
        [inputs for inputs, _ in calls] + [last[0]], keys, values, cut, last[1:] if record_heads else None)
    final = {k: v[..., -1:] for k, v in per_token.items() if k != "attention_mask"}
    return PrefixState({"keys": keys, "values": values, "attention_mask": mask, "last": final, "minimal": replay},
                       len(batch), base_logits=out.logits[:, -1])


@contextmanager
def _replaying(adapter: HFAdapter) -> Iterator[None]:
    """Routes the decoder layers' attention through :func:`last_position_attention`."""
    configs = {id(c): c for c in (adapter.attention(i).config for i in range(adapter.num_layers))}.values()
    saved = [c._attn_implementation for c in configs]
    try:
        for config in configs:
            config._attn_implementation = ATTENTION
        yield
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation = implementation


def _layer(adapter: HFAdapter, replay: Replay, index: int, x: torch.Tensor) -> torch.Tensor:
    """Decoder layer ``index`` at the last position for rows ``x`` ``(P, M, D)``."""
    call = _rows_call(replay.calls[index], x.shape[1])
    out = adapter.layers[index](x, **call, prefix=(replay.keys[index], replay.values[index]))
    return out[0] if isinstance(out, tuple) else out


def _logits(adapter: HFAdapter, x: torch.Tensor) -> torch.Tensor:
    return adapter.model.get_output_embeddings()(adapter.final_norm(x))


def steered_logits(adapter: HFAdapter, replay: Replay, vectors: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Last-position logits with ``vectors[:, i]`` (``(B, len(layers), D)``) added after
    ``layers[i]`` (increasing), differentiable in ``vectors``: the layers above the first
    injection, at one position."""
    with _replaying(adapter):
        x = steer_upward(replay.inputs[layers[0] + 1][:, None], vectors, layers, adapter.num_layers,
                         lambda index, rows: _layer(adapter, replay, index, rows))
    return _logits(adapter, x)[:, 0]


def _patched_rows(adapter: HFAdapter, replay: Replay, values: torch.Tensor) -> torch.Tensor:
    """Last-position states ``(P, L * (H + 1), D)`` after the last layer: row ``l * (H + 1) + h``
    has head ``h`` of layer ``l`` written with ``values[:, l, h]``, row ``l * (H + 1) + H`` is
    layer ``l``'s baseline (every head its recorded output)."""
    num_prompts, num_layers, heads = values.shape[:3]
    slots = torch.arange(heads, device=values.device)
    rows = None
    with _replaying(adapter):
        for index in range(num_layers):
            written = replay.heads[index].reshape(num_prompts, 1, heads, -1).repeat(1, heads + 1, 1, 1)
            written[:, slots, slots] = values[:, index]
            joining = replay.inputs[index][:, None].expand(num_prompts, heads + 1, -1)
            x = joining if rows is None else torch.cat([rows, joining], dim=1)
            # The joining rows' own attention output is replaced by the recorded one (patched).
            with overwrite_input_rows(adapter.head_site(index), x.shape[1] - heads - 1,
                                      written.reshape(num_prompts, heads + 1, -1)):
                rows = _layer(adapter, replay, index, x)
    return rows


@torch.no_grad()
def single_head_patch_probabilities(adapter: HFAdapter, batch: PromptBatch, values: torch.Tensor,
                                    answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Answer probabilities of a per-layer baseline ``(P, L)`` and with each single head patched
    ``(P, L, H)`` (:meth:`BackboneAdapter.single_head_patch_probabilities`); ``None`` where the
    family's layers cannot be replayed. Prompts are replayed in groups whose attention scores
    stay within :data:`SCORE_BUDGET`."""
    values = values.to(adapter.device, adapter.dtype)
    num_prompts, num_layers, heads = values.shape[:3]
    rows_per_prompt = num_layers * (heads + 1)
    score_bytes = 4 * rows_per_prompt * heads * batch.input_ids.shape[1]
    group = max(1, SCORE_BUDGET // score_bytes)
    base, patched = [], []
    for start in range(0, num_prompts, group):
        index = torch.arange(start, min(num_prompts, start + group))
        rows = batch if len(index) == num_prompts else adapter.select_rows(batch, index)
        state = prefill(adapter, rows.to(adapter.device), record_heads=True)
        replay = state.data["minimal"]
        if replay is None:
            return None
        logits = _logits(adapter, _patched_rows(adapter, replay, values[index]))
        chosen = answers[index].to(adapter.device)[:, None, None].expand(-1, rows_per_prompt, 1)
        probabilities = logits.float().softmax(-1).gather(-1, chosen)[..., 0]
        probabilities = probabilities.reshape(len(index), num_layers, heads + 1).cpu()
        base.append(probabilities[..., heads])
        patched.append(probabilities[..., :heads])
    return torch.cat(base), torch.cat(patched)
