"""PNG figures for people: AIE heatmap, sweeps, condition bar charts (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def aie_heatmap(aie: torch.Tensor, title: str = "Average indirect effect", chosen: Sequence[tuple[int, int]] = ()):
    """A layer x head heatmap figure; chosen heads are outlined."""
    figure, axis = plt.subplots(figsize=(max(4, aie.shape[1] * 0.35 + 2), max(3, aie.shape[0] * 0.3 + 1)))
    image = axis.imshow(aie.numpy(), cmap="RdBu_r", aspect="auto",
                        vmin=-float(aie.abs().max()), vmax=float(aie.abs().max()) or 1e-9)
    for layer, head in chosen:
        axis.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="AIE")
    figure.tight_layout()
    return figure


def line_plot(xs: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str):
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        axis.plot(xs, ys, marker="o", label=name)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def bar_chart(values: dict[str, float], ylabel: str, title: str):
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(values) + 2), 4))
    axis.bar(list(values), list(values.values()), color="#4c72b0")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.set_ylim(0, 1)
    plt.setp(axis.get_xticklabels(), rotation=40, ha="right")
    figure.tight_layout()
    return figure


def save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
