"""Extraction settings: the ``aie:`` section of a config (:class:`AIESettings`, the paper's
defaults) and what the cached means and AIE depend on (:class:`ExtractionSettings`), each
validated before any compute with errors naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from mfv.errors import ConfigError
from mfv.requirements import SplitUse
from mfv.method.aie import Algorithm
from mfv.models.base import BackboneAdapter

Selection = Literal["per_relation", "pooled"]
AIEFilter = Literal["clean_correct", "all"]
# Head choice (stage 2) defaults: the authors' top-K per relation.
DEFAULT_K = 10
DEFAULT_SELECTION: Selection = "per_relation"
DEFAULT_CACHE_DIR = "runs/aie_cache"


@dataclass
class AIESettings:
    """The ``aie:`` section of a config: how FVs are extracted (the one set of defaults, the paper's).

    Attributes:
        num_mean_prompts: Clean prompts for the mean activations (over all relations).
        num_aie_prompts: Corrupted prompts for the AIE (over all relations).
        k: Heads per FV.
        selection: ``per_relation`` (the authors': top-K of each relation's AIE) or
            ``pooled`` (one head set from the AIE pooled over relations).
        algorithm: ``fast`` or ``reference`` (exact) or ``attribution`` (gradient estimate).
        aie_filter: ``clean_correct`` (the authors') or ``all`` corrupted prompts.
        batch_size: Prompts per chunk (the unit of resumption; does not change results).
        cache_dir: Cache folder of extraction results.
    """

    num_mean_prompts: int = 200
    num_aie_prompts: int = 100
    k: int = DEFAULT_K
    selection: Selection = DEFAULT_SELECTION
    algorithm: Algorithm = "fast"
    aie_filter: AIEFilter = "clean_correct"
    batch_size: int = 8
    cache_dir: str = DEFAULT_CACHE_DIR

    def validate(self, adapter: BackboneAdapter | None = None) -> None:
        """Raises :class:`ConfigError` naming the field (``aie.k`` ...), before any compute;
        with ``adapter``, K is also checked against its number of heads."""
        _validate_prompt_options(self)
        validate_head_choice(self.k, self.selection, adapter)

    def prompt_use(self, shots: int) -> SplitUse:
        """What extraction reads of its split (the ``eval`` split, or your sampler): ``shots``-shot
        prompts, the first ``num_mean_prompts`` (every relation's mean) and, under per-relation
        selection, the first ``num_aie_prompts`` (every relation's heads) covering every relation."""
        prompts = {"aie.num_mean_prompts": self.num_mean_prompts}
        if self.selection == "per_relation":  # each relation's heads come from its own AIE prompts
            prompts["aie.num_aie_prompts"] = self.num_aie_prompts
        return SplitUse("AIE and FV extraction", shots=shots, prompts=prompts)

    def cache_bytes(self, adapter: BackboneAdapter, relations: list[str]) -> int:
        """About what one extraction's cache takes in ``cache_dir`` (chunks and result)."""
        per_head = len(relations) * adapter.num_layers * adapter.num_heads
        means = per_head * adapter.head_dim * 8
        chunks = math.ceil(self.num_mean_prompts / self.batch_size) + math.ceil(self.num_aie_prompts / self.batch_size)
        return (chunks + 2) * (2 * means + 4 * per_head * 8)

    def extraction_settings(self, relations: list[str], shots: int, seed: int) -> ExtractionSettings:
        """The cache-key settings of this section for ``relations``, ``shots`` and ``seed``."""
        return ExtractionSettings(
            relations=list(relations), shots=shots, num_mean_prompts=self.num_mean_prompts,
            num_aie_prompts=self.num_aie_prompts, algorithm=self.algorithm, aie_filter=self.aie_filter,
            batch_size=self.batch_size, seed=seed,
        )


@dataclass
class ExtractionSettings:
    """Everything the cached means and AIE depend on (all but ``batch_size`` are in the key).

    Attributes:
        relations: Relations to extract FVs for.
        shots: Demonstrations in clean and corrupted prompts (>= 1).
        num_mean_prompts: Clean prompts for the mean activations (over all relations).
        num_aie_prompts: Corrupted prompts for the AIE (over all relations).
        algorithm: ``fast`` or ``reference`` (exact, equal to float rounding) or
            ``attribution`` (gradient estimate, see :mod:`mfv.method.aie`).
        aie_filter: ``clean_correct`` (the authors': IE averaged only over prompts whose
            clean N-shot version the model answers correctly; a relation with none falls
            back to all its prompts, recorded in ``aie_fallback``) or ``all``.
        batch_size: Prompts per chunk (the unit of resumption; does not change results).
        seed: Episode seed.
    """

    relations: list[str] = field(default_factory=lambda: ["above", "below", "left", "right"])
    shots: int = 4
    num_mean_prompts: int = AIESettings.num_mean_prompts
    num_aie_prompts: int = AIESettings.num_aie_prompts
    algorithm: Algorithm = AIESettings.algorithm
    aie_filter: AIEFilter = AIESettings.aie_filter
    batch_size: int = AIESettings.batch_size
    seed: int = 0

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the field, before any compute."""
        if self.shots < 1:
            raise ConfigError(f"shots = {self.shots}: extraction needs N-shot prompts, shots must be >= 1 "
                              f"(data.init_args.shots)")
        _validate_prompt_options(self)
        if not self.relations:
            raise ConfigError("model.relations is empty")


def _validate_prompt_options(settings: AIESettings | ExtractionSettings) -> None:
    """The prompt counts, chunk size, algorithm and filter (fields both settings share)."""
    for name in ("num_mean_prompts", "num_aie_prompts", "batch_size"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"aie.{name} = {getattr(settings, name)} must be >= 1")
    if settings.algorithm not in ("fast", "reference", "attribution"):
        raise ConfigError(f"aie.algorithm = {settings.algorithm!r}; valid: ['fast', 'reference', 'attribution']")
    if settings.aie_filter not in ("clean_correct", "all"):
        raise ConfigError(f"aie.aie_filter = {settings.aie_filter!r}; valid: ['clean_correct', 'all']")


def validate_head_choice(k: int, selection: str, adapter: BackboneAdapter | None = None) -> None:
    """Checks K and the selection mode (K against the backbone's heads when given) before any compute."""
    if adapter is None:
        if k < 1:
            raise ConfigError(f"aie.k = {k} is out of range: choose at least 1 head")
    else:
        total = adapter.num_layers * adapter.num_heads
        if not 1 <= k <= total:
            raise ConfigError(f"aie.k = {k} is out of range: the backbone has {total} heads "
                              f"({adapter.num_layers} layers x {adapter.num_heads}); choose 1..{total}")
    if selection not in ("per_relation", "pooled"):
        raise ConfigError(f"aie.selection = {selection!r}; valid: ['per_relation', 'pooled']")
