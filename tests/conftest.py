"""Shared fixtures: tiny random OpenFlamingo models and prompts (no network, no weights)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from PIL import Image

from mfv.models.base import Example
from mfv.models.openflamingo import OpenFlamingoAdapter, TinyFlamingoConfig, build_tiny_openflamingo

WORDS = ["apple", "ball", "cat", "dog", "egg", "fish", "hat", "key"]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``), one torch thread per worker: the
    workers already share the cores, and on tiny models extra threads only wait on each other
    (issue #34). ``MFV_THREADS`` carries the same choice into the commands' ``set_threads`` and
    into the processes the tests start."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("MFV_THREADS", "1")
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with more ``slow`` tests first, each file's own order kept: ``make test`` hands
    whole files to its two workers in this order (``--dist loadfile --no-loadscope-reorder``),
    so the long files start at once instead of leaving one worker alone at the end."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: ties keep their order


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
