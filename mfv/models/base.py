"""The backbone adapter contract: everything the method needs from a multimodal LM.

The method (AIE, function vectors, fine-tuning) is written once against
:class:`BackboneAdapter`. Each model family implements it in one file and registers
itself in :mod:`mfv.models` (see README, "Adding a backbone").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import torch
from PIL import Image
from torch import nn


LayerKind = Literal["self", "cross", "cross_self"]
"""What a decoder layer's last position attends to: ``self`` the prompt's earlier positions
(causal self-attention over their cached keys and values), ``cross`` an image's keys and
values only (a cross-attention layer, as Llama-3.2-Vision's), ``cross_self`` both in turn
(OpenFlamingo: a gated cross-attention block before a self-attention layer)."""

MaskKind = Literal["causal", "prefix_lm"]
"""The language model's attention mask: ``causal`` (no position sees a later one) or
``prefix_lm`` (the prompt's positions see each other both ways, as PaliGemma's)."""


@dataclass(frozen=True)
class Example:
    """One (image, question, answer) item: a demonstration or, without answer, a query.

    Attributes:
        image: The scene image.
        question: The text after ``Q:`` (the anchor object's name).
        answer: The text after ``A:``; ``None`` for the query.
    """

    image: Image.Image | torch.Tensor
    question: str
    answer: str | None = None


@dataclass
class Prompt:
    """A prompt in the backbone's own format: text plus the images it references, in order."""

    text: str
    images: list[Any]


@dataclass
class PromptBatch:
    """Tokenised, left-padded prompts with their preprocessed images.

    Left padding puts every prompt's last token at position ``-1``, which is where
    interventions and scoring happen.

    Attributes:
        input_ids: ``(B, S)`` token ids.
        attention_mask: ``(B, S)``, 1 for real tokens.
        pixel_values: backbone-specific image tensor.
        extra: other backbone-specific tensors (e.g. image grids).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "PromptBatch":
        """Moves every tensor to ``device`` (images keep their dtype until the forward)."""
        return PromptBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=self.pixel_values.to(device),
            extra={k: v.to(device) for k, v in self.extra.items()},
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class PrefixState:
    """What a prompt batch leaves behind for cheap re-runs of its last position: the one
    last-position mechanism of the contract.

    Produced by :meth:`BackboneAdapter.prefill`; consumed by
    :meth:`BackboneAdapter.forward_last` (any backbone) and by a backbone's own minimal path
    (:meth:`BackboneAdapter.steered_logits`). Keys and values of every earlier position do
    not depend on the last token (causal attention), so the last position can be
    recomputed under interventions without touching the rest of the prompt.

    Attributes:
        data: Backbone-specific tensors.
        batch_size: Prompts in the batch.
        base_logits: The unsteered last-position logits ``(B, vocab)`` when the prefill
            computed them on the way (``None``: :meth:`BackboneAdapter.forward_last` gives them).
    """

    data: dict[str, Any]
    batch_size: int
    base_logits: torch.Tensor | None = None

    def row_bytes(self) -> int:
        """Bytes of the per-row tensors of one prompt (its cached keys and values above all):
        what :meth:`BackboneAdapter.forward_last` may copy for each row it recomputes."""
        tensors = [t for value in self.data.values() for t in (value if isinstance(value, (list, tuple)) else [value])
                   if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.batch_size]
        return sum(t.numel() * t.element_size() for t in tensors) // max(1, self.batch_size)


class PromptShare(Protocol):
    """A minimal path's state (``PrefixState.data["minimal"]``) that splits into one share per
    prompt and joins shares of any prompts back into a batch (the fine-tuning prompt store,
    :mod:`mfv.training.prompt_store`). A share keeps only what the last position needs from
    ``first_layer`` up (its input there, the keys/values and call state of the layers above),
    with the prompt's left padding cut off; lists indexed by layer keep their length (``None``
    below ``first_layer``) so the steered path indexes them as before."""

    def share(self, row: int, first_layer: int) -> "PromptShare":
        """Prompt ``row``'s share from ``first_layer`` up (compact copies, no padding)."""

    @classmethod
    def join(cls, shares: Sequence["PromptShare"]) -> "PromptShare":
        """A batch of shares (same ``first_layer``): keys and values left-padded to the longest
        prompt, the padding masked out, so the steered path gives what it gives on one batch."""


class BackboneAdapter(ABC):
    """Uniform view of one multimodal language model for the function-vector method.

    Preconditions the method relies on (checked by :meth:`check_fast_path_preconditions`
    and by the contract test for every registered backbone):

    * **Output projection layout.** ``head_site(l)`` is a linear layer whose input is the
      concatenation of the ``num_heads`` head outputs, head ``h`` at columns
      ``h*head_dim:(h+1)*head_dim`` of ``output_projection(l)`` (``hidden x heads*head_dim``).
      Head patches and FVs (``W_O[:, slice(h)] @ mean``) slice it this way.
    * **Last position.** ``collate`` pads on the left, so every prompt's last token is
      position ``-1``; interventions and scoring happen there.
    * **Cache position.** ``prefill`` runs positions ``0..S-2`` once and ``forward_last``
      recomputes position ``S-1`` with the same rotary/absolute position the full forward
      gives it, attending to the cached keys/values; so ``forward_last`` equals
      ``forward`` on the same rows (fast AIE's exactness rests on this).

    Attributes:
        model: The wrapped ``nn.Module`` (frozen by the method).
        backbone_id: A stable name of the architecture/weights (stored with FVs).
    """

    model: nn.Module
    backbone_id: str
    tokenizer: Any

    # ----- shape -------------------------------------------------------------------
    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Number of language-model decoder layers."""

    @property
    @abstractmethod
    def num_heads(self) -> int:
        """Attention (query) heads per layer."""

    @property
    @abstractmethod
    def head_dim(self) -> int:
        """Dimension of one head's output."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Residual-stream width."""

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """What each decoder layer attends to (:data:`LayerKind`); default: self-attention only.
        The last-position replay (:mod:`mfv.models.replay`) runs each layer by its kind."""
        return ("self",) * self.num_layers

    @property
    def attention_mask_kind(self) -> MaskKind:
        """The language model's mask (:data:`MaskKind`); default ``causal``. Under ``prefix_lm``
        the last-position replay does not apply (:func:`mfv.models.replay.replayable`)."""
        return "causal"

    def shape_signature(self) -> dict[str, int]:
        """The shape facts an FV must match to be injected into this backbone."""
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }

    # ----- sites -------------------------------------------------------------------
    @abstractmethod
    def head_site(self, layer: int) -> nn.Module:
        """The attention output projection of ``layer``; its input is the heads' concatenation."""

    @abstractmethod
    def residual_site(self, layer: int) -> nn.Module:
        """The module whose output is the residual stream after ``layer``."""

    def output_projection(self, layer: int) -> torch.Tensor:
        """``W_O`` of ``layer`` with shape ``(hidden_size, num_heads * head_dim)``."""
        return self.head_site(layer).weight

    def check_fast_path_preconditions(self) -> None:
        """Asserts the layout facts the method relies on (see the class docstring).

        Raises:
            AssertionError: naming the violated precondition.
        """
        expected = (self.hidden_size, self.num_heads * self.head_dim)
        for layer in range(self.num_layers):
            site = self.head_site(layer)
            assert isinstance(site, nn.Linear), (
                f"{self.backbone_id}: head_site({layer}) must be the attention output projection (nn.Linear), "
                f"got {type(site).__name__}")
            shape = tuple(self.output_projection(layer).shape)
            assert shape == expected, (
                f"{self.backbone_id}: output projection of layer {layer} is {shape}, expected {expected} "
                f"(hidden x heads*head_dim): per-head slices would be wrong")
        assert getattr(self.tokenizer, "padding_side", "left") == "left", (
            f"{self.backbone_id}: the tokenizer must pad on the left so the last token is position -1")

    # ----- prompts -----------------------------------------------------------------
    @abstractmethod
    def build_prompt(self, demonstrations: Sequence[Example], query: Example) -> Prompt:
        """Renders demonstrations and a query in the model's own prompt format."""

    @abstractmethod
    def collate(self, prompts: Sequence[Prompt]) -> PromptBatch:
        """Tokenises (left padding) and preprocesses the images of ``prompts``."""

    def select_rows(self, batch: PromptBatch, rows: torch.Tensor) -> PromptBatch:
        """The sub-batch of ``rows`` (left padding stays valid). Backbones whose image
        tensors are not per row (e.g. flattened patches) override this."""
        return PromptBatch(
            batch.input_ids[rows], batch.attention_mask[rows], batch.pixel_values[rows],
            {k: v[rows] for k, v in batch.extra.items()},
        )

    def answer_token_id(self, prompt_text: str, answer: str) -> int:
        """The first token of ``answer`` as the model would produce it after ``prompt_text``.

        Tokenises the prompt with and without the answer so that BPE merges across the
        boundary are respected; falls back to the answer alone if they disagree.
        """
        tokenizer = self.tokenizer
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt_text + answer, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return int(full_ids[len(prompt_ids)])
        return int(tokenizer(answer, add_special_tokens=False)["input_ids"][0])

    # ----- forward -----------------------------------------------------------------
    @abstractmethod
    def forward(self, batch: PromptBatch) -> torch.Tensor:
        """Last-position logits ``(B, vocab)`` of a batch (images encoded once)."""

    @abstractmethod
    def prefill(self, batch: PromptBatch) -> PrefixState:
        """Runs every position but the last once and keeps what the last one needs."""

    @abstractmethod
    def forward_last(self, state: PrefixState, rows: torch.Tensor) -> torch.Tensor:
        """Recomputes the last position for prompt rows ``rows`` (repeats allowed).

        Interventions active around this call (head patches) apply to the recomputed
        position. Returns last-position logits ``(len(rows), vocab)`` equal to
        :meth:`forward` on the same rows.
        """

    def single_head_patch_probabilities(
        self, batch: PromptBatch, values: torch.Tensor, answers: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional minimal exact path for fast AIE: answer probabilities of a per-layer
        baseline ``(P, L)`` and with each single head ``(l, h)`` patched to ``values[p, l, h]``
        at the last position ``(P, L, H)``. The baseline of layer ``l`` must go through the
        same computation as that layer's patched rows, so that writing a head's own activation
        gives exactly zero effect in any dtype. ``None`` (the default) means "use the generic cached path"
        (:meth:`prefill` + :meth:`forward_last`)."""
        return None

    def generate(self, batch: PromptBatch, max_new_tokens: int = 5, min_new_tokens: int = 0) -> torch.Tensor:
        """Greedy generation; returns the new tokens ``(B, min_new_tokens..max_new_tokens)``.

        Interventions active around the call apply as they are written
        (:func:`mfv.steering.steering` adds at the prompt's last position, and
        optionally at every generated position).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement generate")

    def steered_logits(self, state: PrefixState, vectors: torch.Tensor, layers: list[int]) -> torch.Tensor | None:
        """Optional minimal path: last-position logits of the prefilled prompts with
        ``vectors[:, i]`` (``(B, len(layers), hidden)``) added after ``layers[i]`` (increasing),
        recomputing only the last position from the first of them up, differentiable in
        ``vectors``. ``None`` (the default): :func:`mfv.steering.steered_logits` runs
        :meth:`forward_last` under the residual hooks instead, which is also exact."""
        return None

    def reuse_context(self, store: dict | None = None):
        """A context for many passes over the same images (evaluation with ``reuse``, FV
        fine-tuning): the backbone may keep per-image work of its frozen vision tower in
        ``store`` (a dict the caller owns, to pass again to later blocks) and skip products
        whose results it would discard, every output staying equal to float rounding.
        Default: a no-op. OpenFlamingo keeps resampler latents by image content and lets text
        attend to its own image's latents only (no masked products over the other images)."""
        return nullcontext()

    # ----- conveniences ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def freeze(self) -> None:
        """Turns off gradients and dropout for every backbone weight."""
        self.model.requires_grad_(False)
        self.model.eval()
