"""PNG figures for people: conditions with 95% intervals, sweeps, AIE heatmaps (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

GROUP_COLOURS = {"test": "#4c72b0", "novel": "#dd8452", "analogy": "#55a868"}


def aie_heatmap(aie: torch.Tensor, title: str = "Average indirect effect",
                chosen: Sequence[tuple[int, int]] = (), axis=None):
    """A layer x head heatmap; the selected heads are outlined (with a legend entry)."""
    figure = None
    if axis is None:
        figure, axis = plt.subplots(figsize=(max(4, aie.shape[1] * 0.35 + 2), max(3, aie.shape[0] * 0.3 + 1)))
    limit = float(aie.abs().max()) or 1e-9
    image = axis.imshow(aie.numpy(), cmap="RdBu_r", aspect="auto", vmin=-limit, vmax=limit)
    for index, (layer, head) in enumerate(chosen):
        axis.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5,
                                     label="selected head" if index == 0 else None))
    if chosen:
        axis.legend(loc="upper right", fontsize=7, framealpha=0.8)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(title, fontsize=9)
    (figure or axis.figure).colorbar(image, ax=axis, label="AIE")
    if figure is not None:
        figure.tight_layout()
    return figure or axis.figure


def aie_grid(pooled: torch.Tensor, per_relation: dict[str, torch.Tensor],
             heads: dict[str, Sequence[tuple[int, int]]], pooled_heads: Sequence[tuple[int, int]]):
    """Pooled AIE and one panel per relation, each with its selected heads outlined."""
    panels = 1 + len(per_relation)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, max(3, pooled.shape[0] * 0.3 + 1.2)), squeeze=False)
    aie_heatmap(pooled, "pooled over relations", pooled_heads, axes[0][0])
    for axis, (relation, aie) in zip(axes[0][1:], per_relation.items()):
        aie_heatmap(aie, relation, heads.get(relation, ()), axis)
    figure.tight_layout()
    return figure


def conditions_chart(rows: Sequence[dict], title: str = "Accuracy by condition"):
    """Horizontal bars with 95% intervals, one panel per group, zero-shot and 4-shot ICL
    drawn as reference lines in their group.

    Args:
        rows: dicts with ``group``, ``label``, ``accuracy``, ``ci95``, ``name``.
    """
    groups = [g for g in GROUP_COLOURS if any(r["group"] == g for r in rows)]
    heights = [sum(r["group"] == g for r in rows) for g in groups]
    figure, axes = plt.subplots(len(groups), 1, figsize=(7.5, 0.32 * sum(heights) + 1.2 * len(groups)),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, group in zip(axes[:, 0], groups):
        mine = [r for r in rows if r["group"] == group][::-1]
        ys = range(len(mine))
        accuracy = [r["accuracy"] for r in mine]
        errors = [[a - r["ci95"][0] for a, r in zip(accuracy, mine)], [r["ci95"][1] - a for a, r in zip(accuracy, mine)]]
        axis.barh(list(ys), accuracy, xerr=errors, color=GROUP_COLOURS[group], alpha=0.85, capsize=2)
        axis.set_yticks(list(ys), [r["label"] for r in mine], fontsize=8)
        for reference, style in (("zero_shot", ":"), ("icl_4", "--")):
            match = [r for r in mine if r["name"].endswith(reference) and r["name"].split(reference)[0] in ("", "novel_")]
            if match:
                axis.axvline(match[0]["accuracy"], color="black", linestyle=style, linewidth=1,
                             label=match[0]["label"])
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="lower right")
        axis.set_xlim(0, 1)
        axis.set_title(group, fontsize=9, loc="left")
        axis.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("accuracy (mean over relations), 95% interval")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def sweep_plot(xs: Sequence[int], series: dict[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
               xlabel: str, title: str, references: dict[str, float] | None = None, chosen: int | None = None):
    """Accuracy against an integer setting, with 95% bands and horizontal reference lines."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (ys, intervals) in series.items():
        line = axis.plot(xs, ys, marker="o", label=name)[0]
        axis.fill_between(xs, [i[0] for i in intervals], [i[1] for i in intervals], color=line.get_color(), alpha=0.15)
    for index, (name, value) in enumerate((references or {}).items()):
        axis.axhline(value, color="grey", linestyle=(":", "--", "-.")[index % 3], linewidth=1, label=name)
    if chosen is not None:
        axis.axvline(chosen, color="black", linewidth=0.8, alpha=0.5, label=f"chosen on val: {chosen}")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel(xlabel)
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def save_close(figure) -> None:
    """Releases a figure after it was written elsewhere."""
    plt.close(figure)
