"""Builders used by registry entries that take plain keyword options (YAML-friendly)."""

from __future__ import annotations

from typing import Any

from mfv.errors import ConfigError
from mfv.models.openflamingo import OpenFlamingoAdapter, TinyFlamingoConfig, build_tiny_openflamingo


def random_openflamingo(words: list[str] | None = None, **sizes: Any) -> OpenFlamingoAdapter:
    """A random tiny OpenFlamingo; ``sizes`` are :class:`TinyFlamingoConfig` fields.

    When ``words`` is omitted the tokenizer knows every built-in object name.
    """
    if words is None:
        from mfv.data.objects import all_object_names

        words = all_object_names()
    try:
        config = TinyFlamingoConfig(words=list(words), **sizes)
    except TypeError as exc:
        valid = sorted(TinyFlamingoConfig.__dataclass_fields__)
        raise ConfigError(f"openflamingo-random: {exc}; valid options: {valid}") from exc
    return build_tiny_openflamingo(config)
