"""Figures for people and papers: conditions with 95% intervals, sweeps, AIE heatmaps
(matplotlib, no display).

Every figure is drawn at the size it is printed at, with fonts of at least 7 pt there:
sweeps at one column of a two-column paper (:data:`COLUMN_WIDTH`), the conditions chart and
the AIE grid at the text width (:data:`TEXT_WIDTH`). Legends sit outside the axes, so they
never cover data; :func:`write` saves a PNG and a PDF (TrueType fonts, editable text) of each.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

GROUP_COLOURS = {"test": "#4c72b0", "novel": "#dd8452", "analogy": "#55a868"}
COLUMN_WIDTH = 3.35  # inches: one column of a two-column paper
TEXT_WIDTH = 7.0  # inches: the full text width
FORMATS = ("png", "pdf")
PNG_DPI = 200
SCREEN_DPI = 100  # TensorBoard's copy (matplotlib's default figure dpi)
# Sizes in points at the printed size above.
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "figure.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
}
REFERENCE_STYLES = {"zero": ":", "icl": "--"}


# OpenType layout tables (ligatures, kerning, glyph classes, math layout): text in a PDF is already shaped
# and placed glyph by glyph, so an embedded font subset never uses them; fontTools parses them
# for every subset all the same, about half of each PDF's font time.
PDF_SUBSET_DROP = ("GSUB", "GPOS", "GDEF", "MATH")


@contextmanager
def lean_pdf_fonts() -> Iterator[None]:
    """While writing a PDF, embedded TrueType subsets leave out :data:`PDF_SUBSET_DROP` (the
    same glyphs, still real, editable text). matplotlib builds its fontTools options inside
    its PDF backend, so the default list those options start from is extended for the
    duration and restored after; a fontTools without that list is left as it is."""
    try:
        from fontTools import subset
    except ImportError:  # matplotlib's PDF backend needs it; nothing to change without it
        yield
        return
    default = getattr(subset.Options, "_drop_tables_default", None)
    if not isinstance(default, list):
        yield
        return
    subset.Options._drop_tables_default = default + [t for t in PDF_SUBSET_DROP if t not in default]
    try:
        yield
    finally:
        subset.Options._drop_tables_default = default


@contextmanager
def paper_style() -> Iterator[None]:
    """The fonts and sizes above, for drawing and saving (not changed globally)."""
    with plt.rc_context(STYLE):
        yield


def _heatmap(axis, aie: torch.Tensor, title: str, chosen: Sequence[tuple[int, int]]):
    limit = float(aie.abs().max()) or 1e-9
    image = axis.imshow(aie.float().numpy(), cmap="RdBu_r", aspect="auto", vmin=-limit, vmax=limit,
                        interpolation="nearest")
    for layer, head in chosen:
        axis.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.0))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(title)
    colorbar = axis.figure.colorbar(image, ax=axis, fraction=0.08, pad=0.03)
    colorbar.ax.tick_params(labelsize=7)
    colorbar.set_label("AIE", fontsize=7)
    return image


def _selected_handle(count: int) -> Patch:
    return Patch(fill=False, edgecolor="black", linewidth=1.0, label=f"selected head{'s' if count != 1 else ''}"
                 + (f" (K = {count})" if count else ""))


def aie_heatmap(aie: torch.Tensor, title: str = "Average indirect effect",
                chosen: Sequence[tuple[int, int]] = (), axis=None):
    """A layer x head heatmap; the selected heads are outlined. On its own figure (one column
    wide) the legend sits below the axes; drawn into ``axis``, the caller places the legend."""
    with paper_style():
        if axis is not None:
            _heatmap(axis, aie, title, chosen)
            return axis.figure
        figure, axis = plt.subplots(figsize=(COLUMN_WIDTH, _panel_height(aie, COLUMN_WIDTH)), layout="constrained")
        _heatmap(axis, aie, title, chosen)
        if chosen:
            figure.legend(handles=[_selected_handle(len(chosen))], loc="outside lower center", frameon=False)
    return figure


def _panel_height(aie: torch.Tensor, panel_width: float) -> float:
    """Roughly square cells, within readable bounds."""
    layers, heads = aie.shape
    return min(3.2, max(1.7, 0.35 + (panel_width - 0.6) * layers / max(heads, 1)))


def aie_grid(pooled: torch.Tensor, per_relation: dict[str, torch.Tensor],
             heads: dict[str, Sequence[tuple[int, int]]], pooled_heads: Sequence[tuple[int, int]]):
    """Pooled AIE and one panel per relation, each with its selected heads outlined; at most
    three panels a row (text width), one legend for all of them above the panels."""
    panels = [("pooled over relations", pooled, pooled_heads)]
    panels += [(relation, aie, heads.get(relation, ())) for relation, aie in per_relation.items()]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    width = TEXT_WIDTH if columns > 1 else COLUMN_WIDTH
    height = rows * _panel_height(pooled, width / columns) + 0.45
    with paper_style():
        figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False, layout="constrained")
        for axis, (title, aie, chosen) in zip(axes.flat, panels):
            _heatmap(axis, aie, title, chosen)
        for axis in list(axes.flat)[len(panels):]:
            axis.set_visible(False)
        figure.suptitle("Average indirect effect of each attention head")
        if any(chosen for _, _, chosen in panels):
            figure.legend(handles=[_selected_handle(len(pooled_heads))], loc="outside upper right", frameon=False)
    return figure


def _references(rows: Sequence[dict]) -> dict[str, dict]:
    """The zero-shot and ICL reference conditions of one group's rows (by name: ``zero_shot``
    or ``icl_0``, with the group's prefix; 4-shot ICL, else the most shots there are)."""
    found: dict[str, dict] = {}
    shots: dict[int, dict] = {}
    for row in rows:
        name = re.sub(r"^(novel|analogy)_", "", row["name"])
        if name in ("zero_shot", "icl_0"):
            found.setdefault("zero", row)
        elif re.fullmatch(r"icl_\d+", name) and int(name[4:]) > 0:
            shots[int(name[4:])] = row
    if shots:
        found["icl"] = shots[4] if 4 in shots else shots[max(shots)]
    return found


def _n_text(rows: Sequence[dict]) -> str:
    ns = sorted({int(r["n"]) for r in rows if r.get("n") is not None})
    if not ns:
        return ""
    return f"n = {ns[0]} prompts each" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]} prompts"


def conditions_chart(rows: Sequence[dict], title: str = "Accuracy by condition",
                     group_titles: dict[str, str] | None = None):
    """Horizontal bars with 95% intervals, one panel per group, each with its zero-shot
    (dotted) and ICL (dashed) reference lines; the accuracies are printed right of the axes
    and the legend sits below the last panel.

    Args:
        rows: dicts with ``group``, ``label``, ``accuracy``, ``ci95``, ``name`` and
            optionally ``n`` (prompts; shown in the panel titles).
        group_titles: Panel titles by group (default: the group names).
    """
    groups = [g for g in GROUP_COLOURS if any(r["group"] == g for r in rows)]
    heights = [sum(r["group"] == g for r in rows) for g in groups]
    icl_labels: list[str] = []
    with paper_style():
        height = 0.19 * sum(heights) + 0.62 * len(groups) + 0.7
        figure, axes = plt.subplots(len(groups), 1, figsize=(TEXT_WIDTH, height), squeeze=False,
                                    gridspec_kw={"height_ratios": heights}, layout="constrained")
        for axis, group in zip(axes[:, 0], groups):
            mine = [r for r in rows if r["group"] == group][::-1]
            ys = list(range(len(mine)))
            accuracy = [r["accuracy"] for r in mine]
            errors = [[max(0.0, a - r["ci95"][0]) for a, r in zip(accuracy, mine)],
                      [max(0.0, r["ci95"][1] - a) for a, r in zip(accuracy, mine)]]
            axis.barh(ys, accuracy, xerr=errors, color=GROUP_COLOURS[group], alpha=0.85, height=0.7,
                      error_kw={"capsize": 2, "elinewidth": 0.8, "capthick": 0.8})
            axis.set_yticks(ys, [r["label"] for r in mine])
            for y, a in zip(ys, accuracy):
                axis.text(1.01, y, f"{a:.2f}", transform=axis.get_yaxis_transform(), va="center", fontsize=7)
            for kind, row in _references(mine).items():
                axis.axvline(row["accuracy"], color="black", linestyle=REFERENCE_STYLES[kind], linewidth=0.9)
                if kind == "icl" and row["label"] not in icl_labels:
                    icl_labels.append(row["label"])
            axis.set_xlim(0, 1.02)  # a reference line at 1.0 stays visible inside the frame
            axis.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
            axis.set_ylim(-0.6, len(mine) - 0.4)
            n = _n_text(mine)
            axis.set_title(((group_titles or {}).get(group, group)) + (f" ({n})" if n else ""), loc="left")
            axis.grid(axis="x", alpha=0.3)
        axes[-1, 0].set_xlabel("accuracy (mean over relations); bars: 95% interval")
        handles = [Line2D([], [], color="black", linestyle=REFERENCE_STYLES["zero"], linewidth=0.9,
                          label="zero-shot (each panel's own)")]
        if icl_labels:
            handles.append(Line2D([], [], color="black", linestyle=REFERENCE_STYLES["icl"], linewidth=0.9,
                                  label=" / ".join(dict.fromkeys(icl_labels)) + " (each panel's own)"))
        figure.suptitle(title)
        figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    return figure


def sweep_plot(xs: Sequence[int], series: dict[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
               xlabel: str, title: str, references: dict[str, float] | None = None, chosen: int | None = None,
               note: str | None = None, used: int | None = None):
    """Accuracy against an integer setting, with 95% bands and horizontal reference lines;
    one column wide, the legend below the axes.

    Args:
        note: A line under the title: what was held fixed and the n per point.
        chosen: The value chosen on the validation split (a solid vertical line).
        used: The value the rest of the report injected, marked when it differs from ``chosen``.
    """
    with paper_style():
        figure, axis = plt.subplots(figsize=(COLUMN_WIDTH, 2.9), layout="constrained")
        for name, (ys, intervals) in series.items():
            line = axis.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name)[0]
            axis.fill_between(xs, [i[0] for i in intervals], [i[1] for i in intervals], color=line.get_color(),
                              alpha=0.15, linewidth=0)
        for index, (name, value) in enumerate((references or {}).items()):
            axis.axhline(value, color="grey", linestyle=(":", "--", "-.")[index % 3], linewidth=0.9, label=name)
        if chosen is not None:
            axis.axvline(chosen, color="black", linewidth=0.8, alpha=0.6, label=f"chosen on val: {chosen}")
        if used is not None and used != chosen and min(xs) <= used <= max(xs):
            axis.axvline(used, color="black", linewidth=0.8, linestyle="-.", alpha=0.6,
                         label=f"injected (config): {used}")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel(xlabel)
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        figure.suptitle(title)
        if note:
            axis.set_title(note, fontsize=7, loc="left")
        figure.legend(loc="outside lower center", ncol=2, frameon=False)
    return figure


def render(figure) -> np.ndarray:
    """Rasterises ``figure`` once, at :data:`PNG_DPI` (Agg): the pixels the PNG and
    TensorBoard both take, so each figure is drawn twice (pixels, and the PDF's vectors)
    rather than once per output. The PDF keeps its own layout, solved with its own text
    metrics (the Agg layout would leave its widest labels a little short of room).

    Returns:
        ``(height, width, 4)`` RGBA ``uint8`` pixels (a copy: the canvas buffer is reused).
    """
    with paper_style():
        figure.set_dpi(PNG_DPI)
        canvas = FigureCanvasAgg(figure) if not isinstance(figure.canvas, FigureCanvasAgg) else figure.canvas
        canvas.draw()
        return np.array(canvas.buffer_rgba())


def screen_pixels(pixels: np.ndarray, dpi: int = SCREEN_DPI) -> np.ndarray:
    """``(height, width, 3)`` RGB of :func:`render`'s pixels at ``dpi`` (box-filtered down
    from :data:`PNG_DPI`): the size TensorBoard showed figures at before, and a quarter of
    the pixels to encode."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
    factor = max(1, PNG_DPI // dpi)
    return np.asarray(image.reduce(factor) if factor > 1 else image)


def write(figure, stem: str | Path, formats: Sequence[str] = FORMATS, pixels: np.ndarray | None = None
          ) -> list[Path]:
    """Writes ``<stem>.png`` and ``<stem>.pdf`` (atomically; the figure stays open).

    Args:
        pixels: What :func:`render` returned for ``figure``, if the caller already has it
            (e.g. for TensorBoard); rendered here otherwise.
    """
    from mfv.io import atomic_write

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None and "png" in formats:
        pixels = render(figure)
    written = []
    with paper_style():
        for fmt in formats:
            path = stem.parent / f"{stem.name}.{fmt}"
            if fmt == "png":  # what savefig(format="png") writes, without drawing again
                written.append(atomic_write(path, lambda tmp: matplotlib.image.imsave(
                    tmp, pixels, format="png", origin="upper", dpi=PNG_DPI)))
            else:
                with lean_pdf_fonts() if fmt == "pdf" else nullcontext():
                    written.append(atomic_write(path, lambda tmp, f=fmt: figure.savefig(tmp, format=f, dpi=PNG_DPI)))
    return written


def save(figure, path: str | Path) -> Path:
    """Writes ``path`` (e.g. ``x.png``) and a PDF beside it, then closes the figure."""
    path = Path(path)
    formats = dict.fromkeys([path.suffix.lstrip(".") or "png", *FORMATS])
    write(figure, path.with_suffix(""), tuple(formats))
    plt.close(figure)
    return path


def save_close(figure) -> None:
    """Releases a figure after it was written elsewhere."""
    plt.close(figure)
