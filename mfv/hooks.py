"""Every intervention mfv makes, as context managers that always remove their hooks.

Two named sites per layer come from the backbone adapter:

* the *per-head site*: the input of the attention output projection, the
  concatenation of the heads' outputs, shaped ``(B, S, num_heads * head_dim)``;
* the *residual site*: the output of the decoder layer (the residual stream).

Interventions act only at the last prompt position (index ``-1``; prompts are left
padded). Last-position replays (:mod:`mfv.models.hf_last_position`) also record each
decoder layer's call (:func:`record_layer_calls`) and let rows join a layer with given head
outputs (:func:`overwrite_input_rows`). Plain torch hooks are used because OpenFlamingo mixes classes at run time,
which the usual interpretability libraries do not handle. The residual-stream injection
(:func:`add_to_residual`) is applied only through :mod:`mfv.steering`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

if TYPE_CHECKING:  # hooks sit below the backbones: they only read an adapter's sites
    from mfv.models.base import BackboneAdapter


@contextmanager
def _removed_after(handles: Sequence[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Removes ``handles`` when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class HeadRecording:
    """Last-token per-head activations captured by :func:`record_heads`.

    Attributes:
        by_layer: layer -> ``(B, num_heads, head_dim)`` tensor (detached).
    """

    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked(self) -> torch.Tensor:
        """All recorded layers as ``(B, layers, num_heads, head_dim)``, in layer order."""
        return torch.stack([self.by_layer[layer] for layer in sorted(self.by_layer)], dim=1)


@contextmanager
def record_heads(adapter: BackboneAdapter, layers: Sequence[int] | None = None) -> Iterator[HeadRecording]:
    """Records the last-token output of every head of ``layers`` (default: all).

    Each forward inside the context overwrites the previous recording.
    """
    layers = range(adapter.num_layers) if layers is None else layers
    recording = HeadRecording()

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            last = args[0][:, -1]
            recording.by_layer[layer] = last.detach().reshape(last.shape[0], adapter.num_heads, -1)

        return hook

    handles = [adapter.head_site(layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    with _removed_after(handles):
        yield recording


@contextmanager
def record_last_inputs(modules: Sequence[torch.nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """The last-position input ``(B, width)`` of each module, from the latest forward inside the context."""
    recorded: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            recorded[index] = args[0][:, -1].detach()

        return hook

    handles = [module.register_forward_pre_hook(make_hook(index)) for index, module in enumerate(modules)]
    with _removed_after(handles):
        yield recorded


@contextmanager
def record_layer_calls(layers: Sequence[torch.nn.Module]) -> Iterator[list[tuple[torch.Tensor, dict[str, Any]]]]:
    """Each layer's last-position input ``(B, width)`` and the keyword arguments it was called
    with, from the latest forward inside the context (what a last-position replay re-uses)."""
    recorded: list[tuple[torch.Tensor, dict[str, Any]]] = [None] * len(layers)  # type: ignore[list-item]

    def make_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            recorded[index] = (hidden[:, -1].detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with _removed_after(handles):
        yield recorded


@contextmanager
def overwrite_input_rows(module: torch.nn.Module, start: int, values: torch.Tensor) -> Iterator[None]:
    """Replaces rows ``start:`` (dimension 1) of ``module``'s input by ``values``: rows of a
    last-position replay that join at this layer with recorded (or patched) head outputs."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (torch.cat([x[:, :start], values.to(x.dtype)], dim=1), *args[1:])

    with _removed_after([module.register_forward_pre_hook(hook)]):
        yield


@dataclass(frozen=True)
class HeadPatch:
    """Replacements of last-token head outputs, one per entry, possibly many per row.

    Attributes:
        rows: ``(N,)`` batch row of each replacement.
        layers: ``(N,)`` layer of each replacement.
        heads: ``(N,)`` head of each replacement.
        values: ``(N, head_dim)`` the activation written in place of the head's output.
    """

    rows: torch.Tensor
    layers: torch.Tensor
    heads: torch.Tensor
    values: torch.Tensor


@contextmanager
def patch_heads(adapter: BackboneAdapter, patch: HeadPatch) -> Iterator[None]:
    """Replaces given heads' last-token outputs, with a different head set per batch row."""
    handles = []

    def make_hook(rows: torch.Tensor, heads: torch.Tensor, values: torch.Tensor):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            batch, _, width = x.shape
            last = x[:, -1].reshape(batch, adapter.num_heads, -1).clone()
            last[rows.to(x.device), heads.to(x.device)] = values.to(x.device, x.dtype)
            x = torch.cat([x[:, :-1], last.reshape(batch, 1, width)], dim=1)
            return (x, *args[1:])

        return hook

    try:
        for layer in torch.unique(patch.layers).tolist():
            selected = patch.layers == layer
            hook = make_hook(patch.rows[selected], patch.heads[selected], patch.values[selected])
            handles.append(adapter.head_site(layer).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _is_prompt_pass(kwargs: dict[str, Any]) -> bool:
    """True unless the layer is processing tokens after a cached prefix (generation)."""
    cache_position = kwargs.get("cache_position")
    return cache_position is None or int(cache_position.reshape(-1)[0]) == 0


@contextmanager
def add_to_residual(
    adapter: BackboneAdapter, layer: int, vector: torch.Tensor, every_generated_position: bool = False
) -> Iterator[None]:
    """Adds ``vector`` to the residual stream after ``layer`` at the last prompt position.

    Use :func:`mfv.steering.steering` (several layers, checked shapes) rather than this.

    Args:
        adapter: The backbone.
        layer: Decoder layer after which the vector is added.
        vector: ``(hidden,)`` for every row, or ``(B, hidden)`` one per row. Gradients
            flow into it (fine-tuning).
        every_generated_position: Also add it at each token generated after the prompt
            (calls that continue a cached prefix); by default they are left alone.
    """
    if not 0 <= layer < adapter.num_layers:
        raise ValueError(f"layer {layer} out of range: the backbone has layers 0..{adapter.num_layers - 1}")

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not (every_generated_position or _is_prompt_pass(kwargs)):
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        last = hidden[:, -1] + vector.to(hidden.device, hidden.dtype)
        hidden = torch.cat([hidden[:, :-1], last.unsqueeze(1)], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = adapter.residual_site(layer).register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def head_output_contributions(adapter: BackboneAdapter, layer: int, activations: torch.Tensor) -> torch.Tensor:
    """Per-head contributions ``W_O[:, slice(h)] @ a_h`` to the residual stream (no bias).

    Args:
        activations: ``(..., num_heads, head_dim)`` per-head outputs of ``layer``.

    Returns:
        ``(..., num_heads, hidden)``; their sum plus the projection bias equals the
        projection's output.
    """
    weight = adapter.output_projection(layer)  # (hidden, heads*head_dim)
    per_head = weight.reshape(weight.shape[0], adapter.num_heads, adapter.head_dim)
    return torch.einsum("...hd,ohd->...ho", activations.to(per_head.dtype), per_head)


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # view: ``hidden[:, -1:]`` of one row is "contiguous" (size-1 dims are ignored) but keeps the
    # sequence's stride, which matmul will not fold either (10.7 s vs 0.09 s at OpenFlamingo-4B's head).
    inputs = args[0].contiguous()
    return (inputs.view(inputs.shape), *args[1:])


def keep_input_contiguous(module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Makes ``module``'s input contiguous before it runs: the one hook that stays installed.

    Why: transformers computes last-position logits on ``hidden[:, -1:]``, a non-contiguous
    ``(B, 1, D)`` view when ``B > 1``, and on such an input ``F.linear`` expands the weight to
    ``(B, D, vocab)`` and copies it (``matmul`` -> ``bmm``): at OpenFlamingo-4B's 50280 x 2560
    head that is B copies of 257 MB and 10 s per batch of 16 on a CPU, against 25 ms for the
    same product on a contiguous input. The adapter installs it on the output embeddings when
    it is built and it never changes a value.
    """
    return module.register_forward_pre_hook(_contiguous_input)

