"""The Hugging Face families' layer runner of the shared last-position replay (:mod:`mfv.models.replay`).

One forward of the whole prompt leaves every decoder layer's keys and values and its
last-position input and call arguments. The runner replays the family's own decoder layers
on last-position rows, with no per-family code:

* each layer is called as the text model calls it, with the recorded keyword arguments cut
  to the last position (rotary or multimodal rotary embeddings, position ids), and a mask
  over the prompt's earlier positions (padding and sliding windows as the model built them);
* attention runs through transformers' attention interface, swapped for
  :func:`last_position_attention` while the layers run: a prompt's rows are extra queries
  that attend to the prompt's cached keys and values (one batched product, never a per-row
  copy of the cache) and to their own key, which is what the full forward computes.

Fast AIE, steered logits and the prompt store's shares are the shared replay's. Families
whose layers take other per-token arguments, that declare cross-attention layers
(:attr:`mfv.models.hf.Family.layer_kinds`) or a prefix-LM mask have no replay and fall back
to the generic cached path (:meth:`mfv.models.hf.HFAdapter.forward_last`); equal to the
reference loop to float rounding (contract test).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mfv.hooks import record_last_inputs, record_layer_calls
from mfv.models.base import PrefixState, PromptBatch
from mfv.models.replay import LayerRunner, Replay, head_sites, replayable

ATTENTION = "mfv_last_position"
# Layer arguments that only concern the cache or the output format: a replay does without them.
_DROPPED = {"past_key_values", "past_key_value", "cache_position", "use_cache", "output_attentions"}


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


def _rows_call(call: dict[str, Any], rows: int) -> dict[str, Any]:
    """``call`` for ``rows`` rows per prompt: every row sits at the prompt's last position."""
    out = dict(call)
    for name, value in call.items():
        if name.startswith("position_embeddings"):
            out[name] = tuple(t.expand(*t.shape[:-2], rows, t.shape[-1]) for t in value)
        elif name == "position_ids" and value is not None:
            out[name] = value.expand(*value.shape[:-1], rows)
    return out


class HFLayers(LayerRunner):
    """The replay's runner for every :class:`~mfv.models.hf.Family`: the family's own decoder
    layers, cut call arguments, :func:`last_position_attention`.

    Args:
        adapter: An :class:`~mfv.models.hf.HFAdapter`.
    """

    def prefill(self, batch: PromptBatch, record_heads: bool = False) -> PrefixState:
        """The whole prompt once (no graph): the cache of positions ``0..S-2`` for
        :meth:`~mfv.models.hf.HFAdapter.forward_last`, the :class:`~mfv.models.replay.Replay` under ``"minimal"``
        (``None`` where the family's layers take arguments it cannot cut, or the family declares
        cross-attention layers or a prefix-LM mask), and the unsteered logits."""
        from transformers import DynamicCache

        adapter = self.adapter
        per_token, vision = adapter._inputs(batch)
        with (torch.no_grad(), record_layer_calls(adapter.layers) as calls,
              record_last_inputs([adapter.final_norm, *head_sites(adapter, record_heads)]) as last):
            out = adapter.model(**per_token, **vision, past_key_values=DynamicCache(), use_cache=True,
                                logits_to_keep=1)
        mask = per_token["attention_mask"]
        keys = [layer.keys[:, :, :-1] for layer in out.past_key_values.layers]
        values = [layer.values[:, :, :-1] for layer in out.past_key_values.layers]
        replay = None
        # A cross-attention layer (mllama) would need its image keys and values recorded here
        # and run by kind in layer(); no supported family declares one.
        if replayable(adapter) and all(kind == "self" for kind in adapter.layer_kinds):
            cut = [_last_call(kwargs, mask) for _, kwargs in calls]
            if all(c is not None for c in cut):
                replay = Replay([inputs for inputs, _ in calls] + [last[0]], keys, values, cut,
                                [None] * len(cut), last[1:] if record_heads else None)
        final = {k: v[..., -1:] for k, v in per_token.items() if k != "attention_mask"}
        return PrefixState({"keys": keys, "values": values, "attention_mask": mask, "last": final,
                            "minimal": replay}, len(batch), base_logits=out.logits[:, -1])

    @contextmanager
    def running(self) -> Iterator[None]:
        """Routes the decoder layers' attention through :func:`last_position_attention`."""
        adapter = self.adapter
        configs = {id(c): c for c in (adapter.attention(i).config for i in range(adapter.num_layers))}.values()
        saved = [c._attn_implementation for c in configs]
        try:
            for config in configs:
                config._attn_implementation = ATTENTION
            yield
        finally:
            for config, implementation in zip(configs, saved):
                config._attn_implementation = implementation

    def layer(self, replay: Replay, index: int, x: torch.Tensor, joining: int = 0) -> torch.Tensor:
        """The family's layer on every row (one call: the joining rows' attention runs too, and
        their head outputs are overwritten at the head site)."""
        call = _rows_call(replay.calls[index], x.shape[1])
        out = self.adapter.layers[index](x, **call, prefix=(replay.keys[index], replay.values[index]))
        return out[0] if isinstance(out, tuple) else out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.model.get_output_embeddings()(self.adapter.final_norm(x))
