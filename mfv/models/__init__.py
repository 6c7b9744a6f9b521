"""Backbone registry: a backbone name maps to the function that builds its adapter.

Adding a model family = one adapter module implementing
:class:`mfv.models.base.BackboneAdapter` plus one entry in :data:`BACKBONES`.
Entries are ``"module:function"`` strings so heavy imports happen only when used.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from mfv.errors import ConfigError
from mfv.models.base import BackboneAdapter, Example, PrefixState, Prompt, PromptBatch

BACKBONES: dict[str, str] = {
    # Published releases, from local files / the Hugging Face cache.
    "openflamingo": "mfv.models.openflamingo:load_openflamingo",
    # A small model saved by mfv (the model organism, or any tiny model).
    "openflamingo-tiny": "mfv.models.openflamingo:load_tiny_openflamingo",
    # A small random model built from sizes (tests, benchmarks).
    "openflamingo-random": "mfv.models.registry_helpers:random_openflamingo",
    # Qwen3-VL (paper v2), from a local folder / the Hugging Face cache.
    "qwen3vl": "mfv.models.qwen3vl:load_qwen3vl",
    "qwen3vl-random": "mfv.models.qwen3vl:random_qwen3vl",
}

# A tiny stand-in of each backbone: the contract test runs every registered backbone
# through it, so a new entry without one fails the suite.
TINY_STAND_INS: dict[str, tuple[str, dict]] = {
    "openflamingo": ("openflamingo-random", {}),
    "openflamingo-tiny": ("openflamingo-random", {}),
    "openflamingo-random": ("openflamingo-random", {}),
    "qwen3vl": ("qwen3vl-random", {}),
    "qwen3vl-random": ("qwen3vl-random", {}),
}


def backbone_builder(name: str) -> Callable[..., BackboneAdapter]:
    """Returns the builder registered for ``name``.

    Raises:
        ConfigError: ``name`` is not registered; the message lists the registered names.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid backbones: {sorted(BACKBONES)}")
    module_name, function_name = BACKBONES[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def load_backbone(name: str, **options: Any) -> BackboneAdapter:
    """Builds the adapter of backbone ``name`` with builder keyword ``options``.

    Raises:
        ConfigError: unknown backbone or an option the builder does not take.
    """
    builder = backbone_builder(name)
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        raise ConfigError(
            f"backbone {name!r} does not take option(s) {unknown}; valid options: {sorted(accepted)}"
        )
    return builder(**options)


__all__ = [
    "BACKBONES",
    "TINY_STAND_INS",
    "BackboneAdapter",
    "Example",
    "PrefixState",
    "Prompt",
    "PromptBatch",
    "backbone_builder",
    "load_backbone",
]
