"""What an evaluation is asked for: :class:`EvaluationSettings` (the ``evaluation:`` section)
and :class:`Vectors` (the FVs it injects), each checked before any compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from mfv.errors import ConfigError
from mfv.evaluation.authors import PROTOCOLS, authors_aie_settings
from mfv.evaluation.conditions import COMPOSITE_MODES
from mfv.method.extraction import Extraction, Selection
from mfv.method.settings import AIESettings
from mfv.method.function_vector import FunctionVectorSet
from mfv.models.base import BackboneAdapter


@dataclass
class EvaluationSettings:
    """What to evaluate (the model, data and AIE sections of the config say on what).

    Attributes:
        limit: Prompts per condition (``None``: every prompt of the split).
        shots: ICL shot counts.
        max_k: The K sweep goes 1..max_k (capped at the number of heads).
        sweep_limit: Prompts per sweep point.
        analogies: Evaluate the analogy conditions (needs a ``composite`` split).
        composite_modes: Composite FV variants.
        batch_size: Prompts per batch (default: the datamodule's).
        reuse: Compute nothing twice and nothing that is thrown away: each distinct image
            encoded once across conditions, text attending only to the image it follows
            (no masked products, :meth:`BackboneAdapter.reuse_context`), and conditions over
            the same prompts sharing one prompt pass (each recomputes only the last position
            from its injection layer). ``false``: every condition from scratch.
        protocol: ``mfv`` (every test prompt scored, the configured prompt counts, layer and K
            chosen on validation) or ``authors`` (their released scripts: a test prompt scored
            only if its eval prompt of the same relation and image file was answered with
            4-shot ICL, means and AIE over every eval prompt, layer and K chosen on test;
            :mod:`mfv.evaluation.authors`).
    """

    limit: int | None = None
    shots: list[int] = field(default_factory=lambda: [1, 4, 8, 10])
    max_k: int = 50
    sweep_limit: int = 200
    analogies: bool = True
    composite_modes: list[str] = field(default_factory=lambda: list(COMPOSITE_MODES))
    batch_size: int | None = None
    reuse: bool = True
    protocol: Literal["mfv", "authors"] = "mfv"

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the field and the allowed range."""
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit = {self.limit}: give a positive number of prompts per condition, "
                              f"or leave it unset for every prompt")
        if any(s < 0 for s in self.shots):
            raise ConfigError(f"evaluation.shots = {self.shots}: shot counts must be >= 0")
        for name in ("max_k", "sweep_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name} = {getattr(self, name)} must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"evaluation.batch_size = {self.batch_size} must be >= 1")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"evaluation.protocol = {self.protocol!r}; valid: {list(PROTOCOLS)}")
        unknown = sorted(set(self.composite_modes) - set(COMPOSITE_MODES))
        if unknown:
            raise ConfigError(f"evaluation.composite_modes: unknown {unknown}; valid: {sorted(COMPOSITE_MODES)}")

    def aie_settings(self, aie: AIESettings, datamodule) -> AIESettings:
        """The ``aie:`` section this protocol extracts with: as configured under ``mfv``; under
        ``authors`` means and AIE over every prompt of the datamodule's eval split."""
        if self.protocol != "authors":
            return aie
        return authors_aie_settings(aie, len(datamodule.sampler("eval")))


@dataclass
class Vectors:
    """What the protocol injects.

    Attributes:
        extracted: The extracted FVs (at their layer).
        finetuned: Fine-tuned FVs, if any.
        spread: ``(relations, num_layers, hidden)``: each selected head's projected mean at its
            own layer (``zero_shot_fv_distributed``), if given.
        extraction: The cached means and AIE the FVs came from (K sweep, AIE summary), if given.
        k: Heads per extracted FV (with ``extraction``).
        selection: Head choice of the extracted FVs (with ``extraction``).
    """

    extracted: FunctionVectorSet
    finetuned: FunctionVectorSet | None = None
    spread: torch.Tensor | None = None
    extraction: Extraction | None = None
    k: int | None = None
    selection: Selection = "per_relation"

    @classmethod
    def from_extraction(cls, adapter: BackboneAdapter, extraction: Extraction, k: int, layer: int,
                        selection: Selection = "per_relation", finetuned: FunctionVectorSet | None = None
                        ) -> "Vectors":
        """Extracted FVs at ``layer`` from ``extraction``'s top-``k`` heads, their per-layer
        spread, and ``finetuned``."""
        spread = extraction.distributed_vectors(adapter, k, selection).permute(1, 0, 2)
        return cls(extraction.function_vectors(adapter, k, layer, selection), finetuned, spread, extraction, k,
                   selection)

    def check(self, adapter: BackboneAdapter, relations: Sequence[str]) -> None:
        """Raises :class:`ConfigError` for vectors of another backbone or missing relations."""
        for name, fvs in (("extracted", self.extracted), ("fine-tuned", self.finetuned)):
            if fvs is None:
                continue
            fvs.check_compatible(adapter)
            missing = [r for r in relations if r not in fvs.vectors]
            if missing:
                raise ConfigError(f"the {name} FV file has no vector for {missing}; it has {fvs.relations}")
