"""The fine-tuning prompt store: each prompt's pass computed once per fit, not once per step.

The backbone is frozen and an FV changes only the last prompt position from its injection
layer up, so what that position needs from the rest of the prompt (its input at the layer
above the injection, the keys and values it attends to in the layers above, the
cross-attention and rotary state the family uses) is the same at every epoch. The store keeps
it per prompt (a :class:`~mfv.models.base.PromptShare` of the backbone's minimal path, its
left padding cut off), keyed by the split and the prompt's dataset index, and checked against
the prompt's tokens. A batch (shuffled differently every epoch) joins its prompts' shares,
left-padding keys and values with the padding masked out, and runs only the last-position
graph (:meth:`~mfv.models.base.BackboneAdapter.steered_logits`): the logits equal
recomputing to float rounding (``tests/test_prompt_store.py``).

Shares are kept within ``budget_gb`` (``model.prompt_store_gb``), first come first kept;
prompts beyond it are recomputed at every step, and one line says so once. Backbones without
a minimal path recompute every prompt, as before.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Hashable

import torch

from mfv.data.episodes import EncodedBatch
from mfv.errors import ConfigError
from mfv.models.base import BackboneAdapter, PrefixState, PromptShare
from mfv.steering import Injection, minimal_logits, prompt_pass, steered_logits

GB = 1e9
OPTION = "model.prompt_store_gb"


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable from ``obj`` (dataclasses, lists, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(item) for item in obj)
    return 0


def print_note(line: str) -> None:
    """The store's one-line notes, on stderr."""
    print(line, file=sys.stderr)


def check_budget(budget_gb: float) -> None:
    """Raises :class:`ConfigError` for a budget that is not a number >= 0."""
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not budget_gb >= 0:
        raise ConfigError(f"{OPTION} = {budget_gb!r} must be a number of gigabytes >= 0 "
                          f"(0: recompute every prompt at every step)")


class PromptStore:
    """Per-prompt last-position state for a fit's training and validation prompts.

    Args:
        budget_gb: Most gigabytes (10^9 bytes) of shares kept; ``0`` keeps none.
        say: Where the store's one-line notes go (default: stderr; ``None`` for silence,
            e.g. on ranks other than zero).
    """

    def __init__(self, budget_gb: float, say: Callable[[str], None] | None = print_note) -> None:
        self.budget = int(budget_gb * GB)
        self.budget_gb = budget_gb
        self.say = say or (lambda line: None)
        self.shares: dict[Hashable, tuple[torch.Tensor, PromptShare]] = {}
        self.used = 0
        self.first_layer: int | None = None
        self.enabled = True
        self.full = False  # the budget refused a share (said once)
        self.recomputed = 0  # prompt passes run, for tests and benchmarks

    def __len__(self) -> int:
        return len(self.shares)

    def logits(self, adapter: BackboneAdapter, batch: EncodedBatch, injection: Injection, split: str) -> torch.Tensor:
        """Last-position logits of ``batch`` steered by ``injection``
        (:func:`mfv.steering.steered_logits`), prompt passes only for prompts not yet stored.

        Args:
            split: Names the dataset the batch's ``indices`` index (the module: ``train``, ``val``).
        """
        injection.check(adapter)
        if not self.enabled or batch.indices is None:
            return steered_logits(adapter, batch.prompts, injection)
        first = injection.layers[0] + 1
        if first != self.first_layer:  # another injection layer: other shares
            self.shares.clear()
            self.used, self.first_layer = 0, first
        keys = [(split, int(i)) for i in batch.indices.tolist()]
        tokens = [ids[mask.bool()] for ids, mask in zip(batch.prompts.input_ids, batch.prompts.attention_mask)]
        shares: list[PromptShare | None] = [self._stored(k, t) for k, t in zip(keys, tokens)]
        missing = [row for row, share in enumerate(shares) if share is None]
        if missing:
            fresh = self._pass(adapter, batch, missing, first)
            if fresh is None:
                return self._disable(adapter, batch, injection, "its layers have no last-position replay")
            for row, share in zip(missing, fresh):
                shares[row] = share
                self._keep(keys[row], tokens[row], share)
        state = PrefixState({"minimal": type(shares[0]).join(shares)}, len(shares))
        logits = minimal_logits(adapter, state, injection)
        if logits is None:
            return self._disable(adapter, batch, injection, f"an injection after layer {injection.layers[-1]} has no "
                                                            f"last-position replay")
        return logits

    def _stored(self, key: Hashable, tokens: torch.Tensor) -> PromptShare | None:
        entry = self.shares.get(key)
        if entry is None:
            return None
        if not torch.equal(entry[0], tokens.to(entry[0].device)):  # the index now holds another prompt
            self.used -= tensor_bytes(self.shares.pop(key))
            return None
        return entry[1]

    def _pass(self, adapter: BackboneAdapter, batch: EncodedBatch, rows: list[int], first: int
              ) -> list[PromptShare] | None:
        """The prompt pass of ``rows`` of the batch, split into shares; ``None`` without a minimal path."""
        prompts = batch.prompts
        if len(rows) < len(batch):
            prompts = adapter.select_rows(prompts, torch.tensor(rows))
        state = prompt_pass(adapter, prompts)
        self.recomputed += len(rows)
        minimal = state.data.get("minimal")
        if minimal is None or not hasattr(minimal, "share"):
            return None
        return [minimal.share(row, first) for row in range(len(rows))]

    def _keep(self, key: Hashable, tokens: torch.Tensor, share: PromptShare) -> None:
        size = tensor_bytes(share) + tensor_bytes(tokens)
        if self.used + size <= self.budget:
            self.shares[key] = (tokens, share)
            self.used += size
        elif not self.full:
            self.full = True
            self.say(f"note: the prompt store is full: {OPTION} = {self.budget_gb:g} holds {len(self.shares)} "
                     f"prompts ({size / 1e6:.1f} MB each); every further prompt's pass is recomputed at every step: "
                     f"raise {OPTION} (by {size / GB:.3g} per prompt) to keep them")

    def _disable(self, adapter: BackboneAdapter, batch: EncodedBatch, injection: Injection, why: str) -> torch.Tensor:
        self.enabled = False
        self.shares.clear()
        self.used = 0
        self.say(f"note: no prompt store for {adapter.backbone_id}: {why}; every step recomputes its prompts")
        return steered_logits(adapter, batch.prompts, injection)
