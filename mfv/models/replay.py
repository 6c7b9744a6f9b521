"""The one last-position replay of every backbone: fast AIE, steered logits, the prompt store.

Under a causal mask a patch or an injection at the last position changes nothing before its
layer and nothing at earlier positions. So after one forward of the whole prompt, which
leaves every layer's last-position input (and the final norm's), every layer's cached keys
and values of the earlier positions and, for layers that attend to an image, the latest
image's keys and values (a :class:`Replay`), a patched or steered row needs only the last
position of the layers above its site. This module runs that loop once for every backbone:

* :func:`steered_logits` (fine-tuning, evaluation): one row per prompt from the first
  injection layer up, differentiable in the vectors; an injection after the last layer
  goes straight to the final norm and the output head;
* :func:`single_head_patch_probabilities` (fast AIE): rows patched at layer ``l`` join at
  ``l`` from the recorded layer input, ``H`` patched and one baseline per layer; their head
  outputs are written through the head site (the recorded ones, head ``h`` replaced in row
  ``h``), so baseline and patched rows run the same computation and a patch writing a head's
  own output gives exactly zero in any dtype;
* :meth:`Replay.share` / :meth:`Replay.join`: one prompt's part from a layer up, and shares
  of any prompts as one batch (the fine-tuning prompt store, :mod:`mfv.training.prompt_store`).

A backbone brings a :class:`LayerRunner`: how to prefill and record a :class:`Replay`, how to
run layer ``i`` at the last position for rows ``x`` over it (by the layer's
:data:`~mfv.models.base.LayerKind`), and the final norm and head. The Hugging Face families'
runner calls each family's own layers (:mod:`mfv.models.hf_last_position`), OpenFlamingo's
runs its gated cross-attention and GPT-NeoX layers (:mod:`mfv.models.openflamingo.last_position`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from mfv.hooks import overwrite_input_rows
from mfv.models.base import BackboneAdapter, PrefixState, PromptBatch

# Bytes of attention scores one fast-AIE replay may hold: bounds the prompts replayed together.
SCORE_BUDGET = 1 << 30


def replayable(adapter: BackboneAdapter) -> bool:
    """Whether the last-position replay is exact for ``adapter``'s mask. Under a prefix-LM mask
    the prompt's earlier positions attend to the last one, so a patch or an injection there
    changes them too and the cached keys and values would be stale: no minimal path."""
    return adapter.attention_mask_kind == "causal"


def attends_image(kind: str) -> bool:
    """Whether a layer of ``kind`` attends to the latest image's keys and values."""
    return kind != "self"


@dataclass
class Replay:
    """What one whole-prompt forward leaves for last-position replays (one batch of prompts).

    Lists indexed by layer keep their length; in a share they hold ``None`` below its first layer.

    Attributes:
        inputs: ``L + 1`` tensors ``(P, D)``: the last-position input of each layer, then of the final norm.
        keys: Per layer ``(P, KV, S', d)``: cached keys of the earlier positions (``None`` for a
            layer that attends to no prefix).
        values: Per layer, the same for values.
        calls: Per layer, the backbone's per-prompt arguments of the last position: an additive
            ``attention_mask`` ``(P, 1, 1, S')`` over the cached positions and, where the backbone
            has them, ``position_embeddings`` (tables ``(..., P, 1, d)``) and ``position_ids``
            ``(..., P, 1)``; other entries are the same for every prompt.
        images: Per layer ``(keys, values)`` ``(P, heads, n, d)`` of the latest image for layers
            that attend to one (:func:`attends_image`), else ``None``.
        heads: Per layer ``(P, H * d)``: the heads' last-position outputs (recorded for fast AIE only).
        attention_inputs: Per layer ``(P, D)``: the last-position input of the self-attention
            whose output projection is the head site, where it differs from the layer's (after a
            ``cross_self`` layer's cross-attention); recorded for fast AIE by runners that start
            joining rows there (:meth:`LayerRunner.layer`), else ``None``.
    """

    inputs: list[torch.Tensor | None]
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    calls: list[dict[str, Any] | None]
    images: list[tuple[torch.Tensor, torch.Tensor] | None]
    heads: list[torch.Tensor] | None = None
    attention_inputs: list[torch.Tensor] | None = None

    def share(self, row: int, first_layer: int) -> "Replay":
        """Prompt ``row``'s share from ``first_layer`` up (:class:`~mfv.models.base.PromptShare`)."""
        above = range(first_layer, len(self.calls))
        masks = [self.calls[i]["attention_mask"][row] for i in above if self.keys[i] is not None]
        start = first_attended(masks) if masks else 0
        below = [None] * first_layer
        return Replay(share_inputs(self.inputs, row, first_layer), share_positions(self.keys, row, first_layer, start),
                      share_positions(self.values, row, first_layer, start),
                      below + [_call_share(self.calls[i], row, start) for i in above],
                      below + [None if self.images[i] is None else tuple(t[row:row + 1].clone() for t in self.images[i])
                               for i in above])

    @classmethod
    def join(cls, shares: Sequence["Replay"]) -> "Replay":
        """A batch of shares, keys and values left-padded and masked (:class:`~mfv.models.base.PromptShare`)."""
        first, inputs = join_inputs([s.inputs for s in shares])
        above = range(first, len(shares[0].calls))
        below = [None] * first
        return cls(inputs, join_positions([s.keys for s in shares], first),
                   join_positions([s.values for s in shares], first),
                   below + [_call_join([s.calls[i] for s in shares]) for i in above],
                   below + [None if shares[0].images[i] is None else
                            tuple(torch.cat([s.images[i][n] for s in shares]) for n in (0, 1)) for i in above])


class LayerRunner(ABC):
    """One backbone's part of the replay: recording a :class:`Replay`, one layer at the last
    position, the final norm and head.

    Args:
        adapter: The backbone.
    """

    def __init__(self, adapter: BackboneAdapter) -> None:
        self.adapter = adapter

    @abstractmethod
    def prefill(self, batch: PromptBatch, record_heads: bool = False) -> PrefixState:
        """The whole prompt once (no graph): the backbone's cached state for
        :meth:`~mfv.models.base.BackboneAdapter.forward_last`, the :class:`Replay` under
        ``"minimal"`` (``None`` where the replay does not apply), the unsteered logits.

        Args:
            batch: Prompts on the adapter's device.
            record_heads: Also record every layer's head outputs (:attr:`Replay.heads`, fast AIE).
        """

    @abstractmethod
    def layer(self, replay: Replay, index: int, x: torch.Tensor, joining: int = 0) -> torch.Tensor:
        """Layer ``index`` at the last position for rows ``x`` ``(P, M, D)`` over ``replay``.

        Its attention output projection must be :meth:`~mfv.models.base.BackboneAdapter.head_site`
        called as a module: fast AIE writes the head outputs of the last ``joining`` rows through
        it. Those rows are the layer's recorded input (:attr:`Replay.inputs`); a runner may skip
        what only feeds their head outputs (and start them from :attr:`Replay.attention_inputs`),
        as long as all of them run one computation (a null patch is then exactly zero).
        """

    @abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and output head on states ``(P, M, D)`` after the last layer."""

    def running(self) -> ContextManager[Any]:
        """A context the layers run in (default: none)."""
        return nullcontext()


def head_sites(adapter: BackboneAdapter, record_heads: bool) -> list[nn.Module]:
    """The modules whose last-position inputs a prefill records for fast AIE (none for steering)."""
    return [adapter.head_site(i) for i in range(adapter.num_layers)] if record_heads else []


def steered_logits(runner: LayerRunner, replay: Replay, vectors: torch.Tensor,
                   layers: list[int]) -> torch.Tensor | None:
    """Last-position logits with ``vectors[:, i]`` (``(B, len(layers), D)``) added after
    ``layers[i]`` (increasing), differentiable in ``vectors``: the layers above the first
    injection, at one position (after the last layer: the final norm and head only).
    ``None`` without layers."""
    if not layers:
        return None
    with runner.running():
        x = steer_upward(replay.inputs[layers[0] + 1][:, None], vectors, layers, runner.adapter.num_layers,
                         lambda index, rows: runner.layer(replay, index, rows))
    return runner.logits(x)[:, 0]


def steer_upward(after_first: torch.Tensor, vectors: torch.Tensor, layers: list[int], num_layers: int,
                 layer: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The steered last position: from the state after ``layers[0]`` (``(B, 1, D)``),
    ``vectors[:, i]`` (``(B, len(layers), D)``) is added after ``layers[i]`` (increasing) and
    ``layer(index, x)`` runs each layer above; returns the state after the last layer,
    differentiable in ``vectors``."""
    dtype = after_first.dtype
    x = after_first + vectors[:, 0].to(dtype)[:, None]
    for index in range(layers[0] + 1, num_layers):
        x = layer(index, x)
        if index in layers:
            x = x + vectors[:, layers.index(index)].to(dtype)[:, None]
    return x


def _patched_rows(runner: LayerRunner, replay: Replay, values: torch.Tensor) -> torch.Tensor:
    """Last-position states ``(P, L * (H + 1), D)`` after the last layer: row ``l * (H + 1) + h``
    has head ``h`` of layer ``l`` written with ``values[:, l, h]``, row ``l * (H + 1) + H`` is
    layer ``l``'s baseline (every head its recorded output)."""
    num_prompts, num_layers, heads = values.shape[:3]
    slots = torch.arange(heads, device=values.device)
    rows = None
    with runner.running():
        for index in range(num_layers):
            written = replay.heads[index].reshape(num_prompts, 1, heads, -1).repeat(1, heads + 1, 1, 1)
            written[:, slots, slots] = values[:, index]
            joining = replay.inputs[index][:, None].expand(num_prompts, heads + 1, -1)
            x = joining if rows is None else torch.cat([rows, joining], dim=1)
            # The joining rows' own attention output is replaced by the recorded one (patched).
            with overwrite_input_rows(runner.adapter.head_site(index), x.shape[1] - heads - 1,
                                      written.reshape(num_prompts, heads + 1, -1)):
                rows = runner.layer(replay, index, x, joining=heads + 1)
    return rows


@torch.no_grad()
def single_head_patch_probabilities(runner: LayerRunner, batch: PromptBatch, values: torch.Tensor,
                                    answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Answer probabilities of a per-layer baseline ``(P, L)`` and with each single head patched
    ``(P, L, H)`` (:meth:`~mfv.models.base.BackboneAdapter.single_head_patch_probabilities`);
    ``None`` where the backbone's prefill has no :class:`Replay`. Prompts are replayed in
    groups whose attention scores stay within :data:`SCORE_BUDGET`.

    Args:
        values: ``(P, L, H, head_dim)``: the activation written into head ``(l, h)`` of prompt ``p``.
        answers: ``(P,)`` answer token ids.
    """
    adapter = runner.adapter
    values = values.to(adapter.device, adapter.dtype)
    num_prompts, num_layers, heads = values.shape[:3]
    rows_per_prompt = num_layers * (heads + 1)
    score_bytes = 4 * rows_per_prompt * heads * batch.input_ids.shape[1]
    group = max(1, SCORE_BUDGET // score_bytes)
    base, patched = [], []
    for start in range(0, num_prompts, group):
        index = torch.arange(start, min(num_prompts, start + group))
        rows = batch if len(index) == num_prompts else adapter.select_rows(batch, index)
        replay = runner.prefill(rows.to(adapter.device), record_heads=True).data["minimal"]
        if replay is None:
            return None
        logits = runner.logits(_patched_rows(runner, replay, values[index]))
        chosen = answers[index].to(adapter.device)[:, None, None].expand(-1, rows_per_prompt, 1)
        probabilities = logits.float().softmax(-1).gather(-1, chosen)[..., 0]
        probabilities = probabilities.reshape(len(index), num_layers, heads + 1).cpu()
        base.append(probabilities[..., heads])
        patched.append(probabilities[..., :heads])
    return torch.cat(base), torch.cat(patched)


# ----- one prompt's share and a batch of shares (the prompt store) ---------------------------
def first_attended(masks: Sequence[torch.Tensor]) -> int:
    """The first cached position any of ``masks`` lets the last query attend to: the additive
    masks (``(..., S')``, 0 or very negative) of one prompt's layers. Positions before it carry
    no weight in any layer (left padding), so a share drops them."""
    attended = torch.stack([(m > torch.finfo(m.dtype).min / 2).flatten(0, -2).any(0) for m in masks]).any(0)
    hits = attended.nonzero()
    return int(hits[0]) if len(hits) else attended.shape[0]


def pad_left_cat(parts: Sequence[torch.Tensor], dim: int, value: float) -> torch.Tensor:
    """``parts`` (one prompt each) concatenated on dimension 0, each left-padded with ``value``
    along ``dim`` (a position axis) to the longest."""
    width = max(t.shape[dim] for t in parts)
    dim = dim % parts[0].dim()
    padded = []
    for t in parts:
        missing = width - t.shape[dim]
        if missing:
            # F.pad counts dimensions from the last: (left, right) pairs, last dimension first.
            spec = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
            t = torch.nn.functional.pad(t, spec, value=value)
        padded.append(t)
    return torch.cat(padded)


def share_inputs(inputs: Sequence[torch.Tensor | None], row: int, first_layer: int) -> list[torch.Tensor | None]:
    """A share's per-layer last-position inputs: prompt ``row``'s input of ``first_layer`` only."""
    out: list[torch.Tensor | None] = [None] * len(inputs)
    out[first_layer] = inputs[first_layer][row:row + 1].clone()
    return out


def share_positions(per_layer: Sequence[torch.Tensor | None], row: int, first_layer: int,
                    start: int) -> list[torch.Tensor | None]:
    """A share's keys or values: per layer from ``first_layer`` up, prompt ``row``'s
    ``(1, heads, S' - start, d)`` from cached position ``start`` on; ``None`` below (and
    where a layer has none)."""
    return [None] * first_layer + [None if per_layer[i] is None else per_layer[i][row:row + 1, ..., start:, :].clone()
                                   for i in range(first_layer, len(per_layer))]


def join_inputs(per_share: Sequence[Sequence[torch.Tensor | None]]) -> tuple[int, list[torch.Tensor | None]]:
    """The shares' :func:`share_inputs` as one batch's, and the layer they start at."""
    first = next(i for i, t in enumerate(per_share[0]) if t is not None)
    out: list[torch.Tensor | None] = [None] * len(per_share[0])
    out[first] = torch.cat([inputs[first] for inputs in per_share])
    return first, out


def join_positions(per_share: Sequence[Sequence[torch.Tensor | None]], first: int) -> list[torch.Tensor | None]:
    """Per layer from ``first`` up, the shares' keys or values ``(1, heads, S_i, d)`` as one
    batch's, left-padded with zeros (their mask hides the padding); ``None`` below."""
    return [None] * first + [None if per_share[0][i] is None else pad_left_cat([s[i] for s in per_share], -2, 0.0)
                             for i in range(first, len(per_share[0]))]


# A call's per-prompt tensors and their prompt axis, counted from the end: the mask
# (P, 1, 1, S'), rotary tables (..., P, 1, d), position ids (..., P, 1).
def _prompt_axis(name: str) -> int | None:
    if name.startswith("position_embeddings"):
        return -3
    return -2 if name == "position_ids" else None


def _call_share(call: dict[str, Any], row: int, start: int) -> dict[str, Any]:
    """One prompt's share of a layer's call: its own rows, the mask from ``start`` on."""
    def own(t: torch.Tensor, axis: int) -> torch.Tensor:  # a table shared by every prompt (size 1) stays so
        return t.narrow(axis, row if t.shape[axis] > 1 else 0, 1).clone()

    out = dict(call)
    if "attention_mask" in call:  # a layer attending to no prefix has none
        out["attention_mask"] = call["attention_mask"][row:row + 1, ..., start:].clone()
    for name, value in call.items():
        axis = _prompt_axis(name)
        if axis is not None and value is not None:
            out[name] = tuple(own(t, axis) for t in value) if isinstance(value, tuple) else own(value, axis)
    return out


def _call_join(calls: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shares' calls as one batch's: masks left-padded (padding masked out), the rest stacked."""
    out = dict(calls[0])
    if "attention_mask" in out:
        mask = out["attention_mask"]
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
