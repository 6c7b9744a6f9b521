"""Backbone registry: one :class:`BackboneSpec` per backbone name.

Adding a model family = one adapter module implementing
:class:`mfv.models.base.BackboneAdapter` plus one entry in :data:`BACKBONES`, whose
spec names the builder and a tiny random stand-in with its sizes. The contract test
(``tests/test_backbone_contract.py``) reads this registry, so a new entry is checked
without touching any test. Builders are ``"module:function"`` strings so heavy imports
happen only when used.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from mfv.errors import ConfigError
from mfv.models.base import BackboneAdapter, Example, PrefixState, Prompt, PromptBatch


def _resolve(target: str) -> Callable[..., BackboneAdapter]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone, and a tiny random stand-in of the same family.

    Attributes:
        builder: ``"module:function"`` building the adapter from keyword options.
        stand_in: ``"module:function"`` building a tiny random model of the same family.
        stand_in_options: Keyword options (sizes) of ``stand_in`` for the contract test.
        description: One line for ``--help`` and error messages.
    """

    builder: str
    stand_in: str
    stand_in_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def takes(self, option: str) -> bool:
        """Whether the builder takes keyword ``option``."""
        return option in inspect.signature(_resolve(self.builder)).parameters

    def build(self, **options: Any) -> BackboneAdapter:
        return _call_checked(self.builder, options)

    def build_stand_in(self) -> BackboneAdapter:
        return _call_checked(self.stand_in, dict(self.stand_in_options))


_TINY_OPENFLAMINGO = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                      "intermediate_size": 64}
_TINY_QWEN3VL = {"num_layers": 2}

BACKBONES: dict[str, BackboneSpec] = {
    "openflamingo": BackboneSpec(
        "mfv.models.openflamingo.releases:load_openflamingo", "mfv.models.openflamingo.tiny:random_openflamingo",
        _TINY_OPENFLAMINGO, "published OpenFlamingo releases (3B/4B/9B) from local files"),
    "openflamingo-tiny": BackboneSpec(
        "mfv.models.openflamingo.tiny:load_tiny_openflamingo", "mfv.models.openflamingo.tiny:random_openflamingo",
        _TINY_OPENFLAMINGO, "a small OpenFlamingo saved by mfv (the model organism)"),
    "openflamingo-random": BackboneSpec(
        "mfv.models.openflamingo.tiny:random_openflamingo", "mfv.models.openflamingo.tiny:random_openflamingo",
        _TINY_OPENFLAMINGO, "a random OpenFlamingo built from sizes (tests, benchmarks)"),
    "qwen3vl": BackboneSpec(
        "mfv.models.families.qwen3vl:load", "mfv.models.families.qwen3vl:tiny", _TINY_QWEN3VL,
        "Qwen3-VL (paper v2) from a local folder or the Hugging Face cache"),
    "qwen3vl-random": BackboneSpec(
        "mfv.models.families.qwen3vl:tiny", "mfv.models.families.qwen3vl:tiny", _TINY_QWEN3VL,
        "a random Qwen3-VL built from sizes (tests)"),
    "qwen2.5vl": BackboneSpec(
        "mfv.models.families.qwen25vl:load", "mfv.models.families.qwen25vl:tiny", {"num_layers": 2},
        "Qwen2.5-VL from a local folder or the Hugging Face cache"),
    "qwen2.5vl-random": BackboneSpec(
        "mfv.models.families.qwen25vl:tiny", "mfv.models.families.qwen25vl:tiny", {"num_layers": 2},
        "a random Qwen2.5-VL built from sizes (tests)"),
    "llava": BackboneSpec(
        "mfv.models.families.llava:load", "mfv.models.families.llava:tiny", {"num_layers": 2},
        "LLaVA-1.5 from a local folder or the Hugging Face cache"),
    "llava-random": BackboneSpec(
        "mfv.models.families.llava:tiny", "mfv.models.families.llava:tiny", {"num_layers": 2},
        "a random LLaVA built from sizes (tests)"),
    "idefics3": BackboneSpec(
        "mfv.models.families.idefics3:load", "mfv.models.families.idefics3:tiny", {"num_layers": 2},
        "Idefics3 / SmolVLM from a local folder or the Hugging Face cache"),
    "idefics3-random": BackboneSpec(
        "mfv.models.families.idefics3:tiny", "mfv.models.families.idefics3:tiny", {"num_layers": 2},
        "a random Idefics3 built from sizes (tests)"),
    "gemma3": BackboneSpec(
        "mfv.models.families.gemma3:load", "mfv.models.families.gemma3:tiny", {"num_layers": 2},
        "Gemma 3 from a local folder or the Hugging Face cache"),
    "gemma3-random": BackboneSpec(
        "mfv.models.families.gemma3:tiny", "mfv.models.families.gemma3:tiny", {"num_layers": 2},
        "a random Gemma 3 built from sizes (tests)"),
    "internvl": BackboneSpec(
        "mfv.models.families.internvl:load", "mfv.models.families.internvl:tiny", {"num_layers": 2},
        "InternVL 3 (-hf layout) from a local folder or the Hugging Face cache"),
    "internvl-random": BackboneSpec(
        "mfv.models.families.internvl:tiny", "mfv.models.families.internvl:tiny", {"num_layers": 2},
        "a random InternVL 3 built from sizes (tests)"),
    "llava-onevision": BackboneSpec(
        "mfv.models.families.llava_onevision:load", "mfv.models.families.llava_onevision:tiny", {"num_layers": 2},
        "LLaVA-OneVision from a local folder or the Hugging Face cache"),
    "llava-onevision-random": BackboneSpec(
        "mfv.models.families.llava_onevision:tiny", "mfv.models.families.llava_onevision:tiny", {"num_layers": 2},
        "a random LLaVA-OneVision built from sizes (tests)"),
    # New families: one entry each above this line (and a "-random" one for configs and tests).
}


def _call_checked(target: str, options: dict[str, Any]) -> BackboneAdapter:
    builder = _resolve(target)
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        raise ConfigError(
            f"backbone builder {target} does not take option(s) {unknown} (model.backbone_options); "
            f"valid options: {sorted(accepted)}"
        )
    return builder(**options)


def backbone_spec(name: str) -> BackboneSpec:
    """The spec registered for ``name``.

    Raises:
        ConfigError: ``name`` is not registered; the message lists the registered names.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r} (model.backbone); valid backbones: {sorted(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(name: str, **options: Any) -> BackboneAdapter:
    """Builds the adapter of backbone ``name`` with builder keyword ``options``; a ``dtype``
    of ``auto`` (or bf16 on a CPU that emulates it) goes through :func:`mfv.hardware.resolve_dtype`.

    Raises:
        ConfigError: unknown backbone or an option the builder does not take.
    """
    if "dtype" in options:
        from mfv.hardware import resolve_dtype

        options["dtype"] = resolve_dtype(options["dtype"], options.get("device"), options)
    return backbone_spec(name).build(**options)


__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "BackboneSpec",
    "Example",
    "PrefixState",
    "Prompt",
    "PromptBatch",
    "backbone_spec",
    "load_backbone",
]
