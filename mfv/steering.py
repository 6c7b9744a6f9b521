"""The one steering path: which vectors are added where, and the steered last-position logits.

An :class:`Injection` is a batch's steering, in one tensor layout: per row, one vector after
each of one or more decoder layers (a single-layer FV is one layer; an FV spread over the
layers of its heads is several, nothing more). A :class:`Steer` is the same before the batch
is known: a table of vectors and which entry each prompt takes (every prompt the same entry,
its relation's, or its own row's: composites).

:func:`steered_logits` is the one function that turns an injection into logits. Training,
every evaluation condition and the API call it; it picks the backbone's cached last-position
path where one exists (a graph over the last position from the injection layer up, a shared
prompt pass for many conditions) and otherwise runs the forward under
:func:`steering` (the residual-stream hooks of :mod:`mfv.hooks`), which is also what
generation uses.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from mfv.hooks import add_to_residual
from mfv.models.base import BackboneAdapter, PrefixState, PromptBatch

EntryIndex = Literal["all", "relation", "row"]


def _as_layers(layers: int | Sequence[int]) -> tuple[int, ...]:
    return (int(layers),) if isinstance(layers, int) else tuple(int(layer) for layer in layers)


@dataclass(frozen=True)
class Injection:
    """Vectors added to the residual stream at each row's last prompt position.

    Attributes:
        layers: Strictly increasing decoder layers; a vector is added after each.
        vectors: ``(B, len(layers), hidden)``, one set per row, or ``(len(layers), hidden)``
            for every row. Gradients flow into it (fine-tuning).
    """

    layers: tuple[int, ...]
    vectors: torch.Tensor

    @classmethod
    def at(cls, layers: int | Sequence[int], vectors: torch.Tensor) -> "Injection":
        """An injection after ``layers`` (an int or a list), from vectors shaped ``(hidden,)``
        or ``(B, hidden)`` for one layer, ``(len(layers), hidden)`` or ``(B, len(layers),
        hidden)`` for a list. Layers are sorted, with their vectors."""
        single = isinstance(layers, int)
        layers = _as_layers(layers)
        if single:
            vectors = vectors.unsqueeze(-2)
        if vectors.dim() not in (2, 3) or vectors.shape[-2] != len(layers):
            raise ValueError(f"vectors of shape {tuple(vectors.shape)} do not match layers {list(layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers {list(layers)} repeat a layer")
        order = sorted(range(len(layers)), key=layers.__getitem__)
        if order != list(range(len(layers))):
            vectors = vectors[..., order, :]
        return cls(tuple(layers[i] for i in order), vectors)

    def per_row(self, batch_size: int) -> torch.Tensor:
        """``(batch_size, len(layers), hidden)``."""
        if self.vectors.dim() == 2:
            return self.vectors.expand(batch_size, -1, -1)
        if self.vectors.shape[0] != batch_size:
            raise ValueError(f"the injection holds {self.vectors.shape[0]} rows of vectors for a batch of {batch_size}")
        return self.vectors

    def check(self, adapter: BackboneAdapter) -> None:
        """Raises ``ValueError`` for a layer outside the backbone or a vector of another width."""
        bad = [layer for layer in self.layers if not 0 <= layer < adapter.num_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} out of range: the backbone has layers 0..{adapter.num_layers - 1}")
        if self.vectors.shape[-1] != adapter.hidden_size:
            raise ValueError(f"vectors of width {self.vectors.shape[-1]} for a backbone of hidden size "
                             f"{adapter.hidden_size}")


@dataclass(frozen=True)
class Steer:
    """An injection before the batch is known: a table of vectors and which entry a prompt takes.

    Attributes:
        table: ``(entries, len(layers), hidden)``.
        layers: Strictly increasing injection layers.
        by: ``all`` (entry 0 for every prompt), ``relation`` (the prompt's relation id) or
            ``row`` (the prompt's dataset index: one vector per prompt, e.g. composites).
    """

    table: torch.Tensor
    layers: tuple[int, ...]
    by: EntryIndex = "relation"

    @classmethod
    def at(cls, layers: int | Sequence[int], table: torch.Tensor, by: EntryIndex = "relation") -> "Steer":
        """From ``(entries, hidden)`` (one layer), ``(hidden,)`` (one layer, ``by="all"``) or
        ``(entries, len(layers), hidden)``."""
        if table.dim() == 1:
            table = table[None]
        if isinstance(layers, int) and table.dim() == 2:
            table = table.unsqueeze(-2)
        injection = Injection.at(_as_layers(layers), table)
        return cls(injection.vectors, injection.layers, by)

    @classmethod
    def per_layer(cls, vectors: torch.Tensor, layers: Sequence[int] | None = None,
                  by: EntryIndex = "relation") -> "Steer":
        """From ``(entries, num_layers, hidden)``: every layer's vector (an FV spread over the
        layers of its heads), injected after ``layers`` (default: those where some entry is
        non-zero)."""
        if layers is None:
            layers = [layer for layer in range(vectors.shape[1]) if vectors[:, layer].any()]
        return cls(vectors[:, list(layers)], _as_layers(layers), by)

    def injection(self, relation_ids: torch.Tensor, indices: torch.Tensor) -> Injection:
        """The batch's injection, given each row's relation id and dataset index."""
        entries = {"all": lambda: torch.zeros_like(relation_ids), "relation": lambda: relation_ids,
                   "row": lambda: indices}[self.by]()
        return Injection(self.layers, self.table[entries.to(self.table.device)])

    def to(self, device: torch.device | str) -> "Steer":
        return Steer(self.table.to(device), self.layers, self.by)


@contextmanager
def steering(adapter: BackboneAdapter, injection: Injection, every_generated_position: bool = False
             ) -> Iterator[None]:
    """Inside the block every forward (and :meth:`BackboneAdapter.generate`) is steered by
    ``injection``; with ``every_generated_position`` generated tokens are too."""
    injection.check(adapter)
    with ExitStack() as stack:
        for position, layer in enumerate(injection.layers):
            stack.enter_context(add_to_residual(adapter, layer, injection.vectors[..., position, :],
                                                every_generated_position))
        yield


def prompt_pass(adapter: BackboneAdapter, batch: PromptBatch) -> PrefixState:
    """The prompt run once (no graph) for :func:`steered_logits` calls to continue from
    (:meth:`BackboneAdapter.prefill`)."""
    with torch.no_grad():
        return adapter.prefill(batch)


def minimal_logits(adapter: BackboneAdapter, state: PrefixState, injection: Injection) -> torch.Tensor | None:
    """The backbone's minimal path (:meth:`BackboneAdapter.steered_logits`) on a prefilled
    ``state``: only the last position from the first injection layer up; ``None`` where it has
    none. :func:`steered_logits` and the fine-tuning prompt store
    (:mod:`mfv.training.prompt_store`, whose states join stored per-prompt shares) call it."""
    vectors = injection.per_row(state.batch_size).to(adapter.device)
    return adapter.steered_logits(state, vectors, list(injection.layers))


def _all_rows(adapter: BackboneAdapter, state: PrefixState) -> torch.Tensor:
    return torch.arange(state.batch_size, device=adapter.device)


def steered_logits(adapter: BackboneAdapter, batch: PromptBatch, injection: Injection | None,
                   prefix: PrefixState | None = None) -> torch.Tensor:
    """Last-position logits ``(B, vocab)`` of ``batch`` steered by ``injection`` (``None``: unsteered).

    With a ``prefix`` (:func:`prompt_pass`), or when gradients are on (fine-tuning), only the
    last position is recomputed, from the first injection layer up where the backbone has a
    minimal path (:meth:`BackboneAdapter.steered_logits`), else through
    :meth:`BackboneAdapter.forward_last` under :func:`steering`: the graph then covers the last
    position only, whatever the prompt length. Otherwise the full forward runs under
    :func:`steering`. All give the same logits to float rounding (contract test).
    """
    if injection is None:
        if prefix is None:
            return adapter.forward(batch)
        if prefix.base_logits is not None:
            return prefix.base_logits
        with torch.no_grad():
            return adapter.forward_last(prefix, _all_rows(adapter, prefix))
    injection.check(adapter)
    if prefix is None and not torch.is_grad_enabled():
        with steering(adapter, injection):
            return adapter.forward(batch)
    state = prefix if prefix is not None else prompt_pass(adapter, batch)
    logits = minimal_logits(adapter, state, injection)
    if logits is not None:
        return logits
    vectors = injection.per_row(state.batch_size).to(adapter.device)
    # forward_last continues a cached prompt, which the residual hook takes for generation:
    # every_generated_position makes it add at that (last prompt) position.
    with steering(adapter, Injection(injection.layers, vectors), every_generated_position=True):
        return adapter.forward_last(state, _all_rows(adapter, state))
