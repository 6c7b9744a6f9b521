"""Backbone registry: one :class:`BackboneSpec` per backbone name.

OpenFlamingo's entries are listed here; every Hugging Face family is one file in
:mod:`mfv.models.families` declaring a :class:`mfv.models.hf.Family` (``FAMILY``: its name, its
release's config and stand-in, where things are), from which the registry makes ``<name>``
(:func:`mfv.models.hf.load_family` with the family bound) and ``<name>-random`` (its reduced
stand-in). Architectures mfv refuses (:mod:`mfv.models.families.refused`) are answered with
their reason. The contract test (``tests/test_backbone_contract.py``) reads this registry, so a
new family is checked without touching any test. OpenFlamingo builders are ``"module:function"``
strings so heavy imports happen only when used.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Callable

from mfv.errors import ConfigError
from mfv.models.base import BackboneAdapter, Example, PrefixState, Prompt, PromptBatch

if TYPE_CHECKING:
    from mfv.models.hf import Family

Builder = Callable[..., BackboneAdapter]


def _resolve(target: str | Builder) -> Builder:
    if callable(target):
        return target
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone, and a tiny random stand-in of the same family.

    Attributes:
        builder: The function building the adapter from keyword options (or ``"module:function"``).
        stand_in: The function building a tiny random model of the same family (or ``"module:function"``).
        stand_in_options: Keyword options (sizes) of ``stand_in`` for the contract test.
        description: One line for ``--help`` and error messages.
    """

    builder: str | Builder
    stand_in: str | Builder
    stand_in_options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def takes(self, option: str) -> bool:
        """Whether the builder takes keyword ``option``."""
        return option in inspect.signature(_resolve(self.builder)).parameters

    def stand_in_takes(self, option: str) -> bool:
        """Whether the stand-in builder takes keyword ``option`` (``attn_implementation``)."""
        return option in inspect.signature(_resolve(self.stand_in)).parameters

    def build(self, **options: Any) -> BackboneAdapter:
        return _call_checked(self.builder, options)

    def build_stand_in(self, **options: Any) -> BackboneAdapter:
        """The stand-in with its options, ``options`` over them."""
        return _call_checked(self.stand_in, {**self.stand_in_options, **options})


_TINY_OPENFLAMINGO = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                      "intermediate_size": 64}
_OPENFLAMINGO_TINY = "mfv.models.openflamingo.tiny:random_openflamingo"

BACKBONES: dict[str, BackboneSpec] = {
    "openflamingo": BackboneSpec("mfv.models.openflamingo.releases:load_openflamingo", _OPENFLAMINGO_TINY,
                                 _TINY_OPENFLAMINGO, "published OpenFlamingo releases (3B/4B/9B) from local files"),
    "openflamingo-tiny": BackboneSpec("mfv.models.openflamingo.tiny:load_tiny_openflamingo", _OPENFLAMINGO_TINY,
                                      _TINY_OPENFLAMINGO, "a small OpenFlamingo saved by mfv (the model organism)"),
    "openflamingo-random": BackboneSpec(_OPENFLAMINGO_TINY, _OPENFLAMINGO_TINY, _TINY_OPENFLAMINGO,
                                        "a random OpenFlamingo built from sizes (tests, benchmarks)"),
}


@lru_cache(maxsize=1)
def hf_families() -> dict[str, Family]:
    """Every Hugging Face family, by name: the ``FAMILY`` of each module of :mod:`mfv.models.families`."""
    import mfv.models.families as package

    families = {}
    for module in pkgutil.iter_modules(package.__path__):
        family = getattr(importlib.import_module(f"{package.__name__}.{module.name}"), "FAMILY", None)
        if family is not None:
            families[family.name] = family
    return families


def _register_hf_families() -> None:
    from mfv.models.families.release import build_stand_in
    from mfv.models.hf import load_family

    for name, family in sorted(hf_families().items()):
        stand_in = partial(build_stand_in, family)  # one object: both names share one stand-in
        BACKBONES[name] = BackboneSpec(partial(load_family, family), stand_in, {}, family.description)
        BACKBONES[f"{name}-random"] = BackboneSpec(stand_in, stand_in, {},
                                                   f"a random {name} at its release's structure, reduced (tests)")


_register_hf_families()


def _call_checked(target: str | Builder, options: dict[str, Any]) -> BackboneAdapter:
    builder = _resolve(target)
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        bound = getattr(builder, "args", ())  # a family's loader or stand-in: the family bound
        name = target if isinstance(target, str) else getattr(bound[0], "name", None) if bound else target
        raise ConfigError(
            f"backbone builder {name} does not take option(s) {unknown} (model.backbone_options); "
            f"valid options: {sorted(accepted)}"
        )
    return builder(**options)


def backbone_spec(name: str) -> BackboneSpec:
    """The spec registered for ``name``.

    Raises:
        ConfigError: ``name`` is not registered (the message lists the registered names) or is an
            architecture mfv refuses (the message says why).
    """
    from mfv.models.families.refused import REFUSED_NAMES, refusal

    if name in REFUSED_NAMES:
        raise ConfigError(f"{refusal(REFUSED_NAMES[name], sorted(hf_families()))} (model.backbone)")
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r} (model.backbone); valid backbones: {sorted(BACKBONES)}")
    return BACKBONES[name]


def load_backbone(name: str, **options: Any) -> BackboneAdapter:
    """Builds the adapter of backbone ``name`` with builder keyword ``options``; a ``dtype``
    of ``auto`` (or bf16 on a CPU that emulates it) goes through :func:`mfv.hardware.resolve_dtype`.

    Raises:
        ConfigError: unknown backbone or an option the builder does not take.
    """
    spec = backbone_spec(name)
    if "dtype" in options or spec.takes("dtype"):  # the builder's own default is checked too
        from mfv.hardware import resolve_dtype

        requested = (options["dtype"] if "dtype" in options
                     else inspect.signature(_resolve(spec.builder)).parameters["dtype"].default)
        if isinstance(requested, str):
            options["dtype"] = resolve_dtype(requested, options.get("device"), options)
    return spec.build(**options)


__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "BackboneSpec",
    "Example",
    "PrefixState",
    "Prompt",
    "PromptBatch",
    "backbone_spec",
    "hf_families",
    "load_backbone",
]
