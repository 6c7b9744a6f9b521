"""Shared fixtures: tiny random OpenFlamingo models and prompts (no network, no weights)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mfv.models.base import Example
from mfv.models.openflamingo import OpenFlamingoAdapter, TinyFlamingoConfig, build_tiny_openflamingo

WORDS = ["apple", "ball", "cat", "dog", "egg", "fish", "hat", "key"]


def tiny_config(**overrides) -> TinyFlamingoConfig:
    fields = dict(words=WORDS, num_layers=3, num_heads=4, hidden_size=32, intermediate_size=64)
    fields.update(overrides)
    return TinyFlamingoConfig(**fields)


@pytest.fixture(scope="session")
def tiny_adapter() -> OpenFlamingoAdapter:
    return build_tiny_openflamingo(tiny_config())


def solid(color: str, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


@pytest.fixture(scope="session")
def prompts(tiny_adapter):
    """Three prompts of different lengths (0, 1 and 2 demonstrations)."""
    a = tiny_adapter
    return [
        a.build_prompt([], Example(solid("green"), "dog")),
        a.build_prompt([Example(solid("red"), "apple", "ball")], Example(solid("blue"), "cat")),
        a.build_prompt(
            [Example(solid("red"), "apple", "ball"), Example(solid("yellow"), "egg", "fish")],
            Example(solid("white"), "hat"),
        ),
    ]


def random_patch_values(adapter, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, adapter.head_dim, generator=generator)
