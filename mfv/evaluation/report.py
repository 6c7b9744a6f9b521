"""Reports written from an :class:`~mfv.evaluation.protocol.EvaluationResult`.

``metrics.json`` (machines), ``report.md`` (people), figures as PNG and PDF (sized and
lettered for a paper, :mod:`mfv.evaluation.plots`) and TensorBoard scalars and figures.
Every accuracy shown carries its 95% interval and n.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from mfv.evaluation import plots
from mfv.evaluation.authors import protocol_markdown
from mfv.evaluation.protocol import EvaluationResult
from mfv.io import atomic_write_text, staged
from mfv.method.extraction import Extraction

GROUP_TITLES = {"test": "Test split (trained objects)", "novel": "Novel objects",
                "analogy": "Analogies (untrained diagonal relations)"}


def _fmt(accuracy: float, ci: Sequence[float]) -> str:
    return f"{accuracy:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _table(rows: list[tuple[str, dict]]) -> str:
    relations: list[str] = []
    for _, c in rows:
        relations += [r for r in c["per_relation"] if r not in relations]
    header = ("| condition | " + " | ".join(relations) + " | mean [95% CI] | n |\n|---|"
              + "---|" * (len(relations) + 2) + "\n")
    lines = []
    for name, c in rows:
        per = c["per_relation"]
        cells = [f"{per[r]['accuracy']:.3f}" if r in per else "–" for r in relations]
        lines.append(f"| {c.get('description') or name} (`{name}`) | " + " | ".join(cells)
                     + f" | **{_fmt(c['accuracy'], c['ci95'])}** | {c['n']} |")
    return header + "\n".join(lines) + "\n"


def report_markdown(metrics: dict, drawn: Sequence[str] | None = None) -> str:
    """The markdown report of a ``metrics.json`` dict, listing the figures ``drawn`` (by stem;
    default: every figure :func:`figures` draws for it)."""
    conditions = metrics["conditions"]
    injected = metrics["injected"]["extracted"]
    extraction = metrics["extraction"]
    parts = [
        f"# mfv evaluation — {metrics['settings']['backbone']}\n\n",
        f"Extracted FVs injected after layer {injected['layer']}, K = {injected['k']} heads, selection "
        f"{injected['selection']}. Heads: {json.dumps(injected['heads'])}. ",
    ]
    finetuned = metrics["injected"].get("finetuned")
    if finetuned:
        parts.append(f"Fine-tuned FVs injected after layer {finetuned['layer']}. ")
    parts.append(provenance(metrics))
    parts += [f"\n\n**Warning:** {warning}\n\n" for warning in metrics.get("warnings", [])]
    parts.append(
        f"{extraction['heads_for_half_positive_aie']} of the LM's {extraction['lm_heads']} heads "
        f"({extraction['heads_for_half_positive_aie_share']:.1%}) carry half of the positive AIE; the top 10 "
        f"carry {extraction['top10_positive_aie_share']:.0%}.\n\nAccuracy is the mean over relations of the "
        f"first answer token's top-1 accuracy; intervals are 95% (per relation: Wilson; mean: stratified "
        f"bootstrap over prompts).\n")
    for group, title in GROUP_TITLES.items():
        rows = [(n, c) for n, c in conditions.items() if c["group"] == group]
        if rows:
            parts += [f"\n## {title}\n\n", _table(rows)]
    if metrics["comparisons"]:
        parts.append("\n## Paired comparisons (same prompts)\n\n| comparison | difference [95% CI] | p | n |\n"
                     "|---|---|---|---|\n")
        for name, c in metrics["comparisons"].items():
            p = f"{c['p_value']:.3g}" if c["p_value"] > 1 / 2000 else "< 0.001"
            parts.append(f"| {name} | {_fmt(c['difference'], c['ci95'])} | {p} | {c['n']} |\n")
    if metrics.get("analogy_weights"):
        trained = list(next(iter(metrics["analogy_weights"].values())))
        parts.append("\nMean composite weights (normalised):\n\n| diagonal | " + " | ".join(trained) + " |\n|---|"
                     + "---|" * len(trained) + "\n")
        for d, w in metrics["analogy_weights"].items():
            parts.append(f"| {d} | " + " | ".join(f"{w[t]:.2f}" for t in trained) + " |\n")
    for name, label in (("layer", "injection layer"), ("k", "K (heads)")):
        sweep = metrics["sweeps"].get(name)
        if sweep and "chosen" in sweep:
            at = sweep.get("test_at_chosen")
            on = {"val": "validation", "test": "test"}.get(sweep.get("chosen_on"), sweep.get("chosen_on"))
            parts.append(f"\nBest {label} on the {on} split: {sweep['chosen']}"
                         + (f"; on test there: {_fmt(at['accuracy'], at['ci95'])} (n={at['n']})" if at else "") + ".")
    for kind, fit in metrics["settings"].get("composite_affine", {}).items():
        parts.append(f"\n\nsoftmax_affine composite ({kind} FVs): scale {fit['scale']:.3g}, offset norm "
                     f"{fit['offset_norm']:.3g}, fitted on {fit['n']} {fit['split']} prompts of the trained relations"
                     + (" (the composites did not vary: scale set to 0)" if fit["degenerate"] else "") + ".")
    parts.append(protocol_markdown(metrics))
    if metrics.get("not_run"):
        parts.append("\n\n## Not run\n\n| condition | reason |\n|---|---|\n")
        parts += [f"| `{name}` | {reason} |\n" for name, reason in metrics["not_run"].items()]
    parts.append("\n\nFigures (PNG and PDF): " + ", ".join(figure_stems(metrics) if drawn is None else drawn) + ".\n")
    return "".join(parts)


# The setting each sweep varies: (config option, what the report calls it).
SWEPT = {"layer": ("model.layer", "layer"), "k": ("aie.k", "K")}


def provenance(metrics: dict) -> str:
    """Whether the injected layer and K were chosen on validation or fixed by the config."""
    fixed, chosen_here = [], []
    # The authors' protocol chooses on test (settings.protocol), mfv's on validation.
    on = "test" if any(s.get("chosen_on") == "test" for s in metrics["sweeps"].values()) else "validation"
    for name, (option, label) in SWEPT.items():
        used, sweep = metrics["settings"].get(name), metrics["sweeps"].get(name) or {}
        if used is None or "chosen" not in sweep:
            continue
        if used == sweep["chosen"]:
            chosen_here.append(f"{label} {used}")
        else:
            outside = "" if min(sweep["x"]) <= used <= max(sweep["x"]) else \
                f", outside the swept {min(sweep['x'])}..{max(sweep['x'])}"
            fixed.append(f"{label} {used} (`{option}`; {on} chose {sweep['chosen']}{outside})")
    text = ""
    if fixed:
        text += ("The injected " + " and ".join(fixed) + f" were fixed by the config, not chosen on the {on} "
                 "split of this evaluation. ")
    if chosen_here:
        text += "The injected " + " and ".join(chosen_here) + f" are the {on} sweeps' choices. "
    return text


def figure_stems(metrics: dict) -> list[str]:
    """The figures :func:`figures` draws for ``metrics``, by file stem."""
    return ["conditions", *(f"{name}_sweep" for name in ("layer", "k") if metrics["sweeps"].get(name)), "aie_heatmap"]


def _reference_lines(metrics: dict) -> dict[str, float]:
    """Zero-shot and ICL accuracy on test (4-shot ICL, else the most shots evaluated)."""
    summary = metrics["summary"]
    lines = {"zero-shot (test)": summary["zero_shot"]} if "zero_shot" in summary else {}
    shots = sorted(int(n[4:]) for n in summary if n.startswith("icl_") and n[4:].isdigit() and int(n[4:]) > 0)
    if shots:
        n = 4 if 4 in shots else shots[-1]
        lines[f"{n}-shot ICL (test)"] = summary[f"icl_{n}"]
    return lines


def _sweep_note(metrics: dict, name: str, sweep: dict) -> str:
    """What the sweep held fixed and its n per point."""
    settings = metrics["settings"]
    if name == "layer":
        held = f"K = {settings.get('k')} heads ({settings.get('selection')}) held fixed"
    else:
        held = f"injected after layer {settings.get('layer')}"
    ns = ", ".join(f"{sweep[split]['n']} ({split})" for split in ("val", "test") if split in sweep)
    return f"{held}\nn = {ns} prompts per point" if ns else held


def figures(metrics: dict, extraction: Extraction) -> dict[str, object]:
    """Every figure of the report, by file stem."""
    rows = [{"name": n, "group": c["group"], "label": c.get("description") or n, "accuracy": c["accuracy"],
             "ci95": c["ci95"], "n": c.get("n")} for n, c in metrics["conditions"].items()]
    out = {"conditions": plots.conditions_chart(rows, f"Accuracy by condition — {metrics['settings']['backbone']}",
                                                GROUP_TITLES)}
    for name, label in (("layer", "injection layer"), ("k", "heads K")):
        sweep = metrics["sweeps"].get(name)
        if sweep:
            series = {f"zero-shot + FV ({split})": (sweep[split]["accuracy"], sweep[split]["ci95"])
                      for split in ("val", "test") if split in sweep}
            out[f"{name}_sweep"] = plots.sweep_plot(sweep["x"], series, label, f"Accuracy vs {label}",
                                                    _reference_lines(metrics), sweep.get("chosen"),
                                                    note=_sweep_note(metrics, name, sweep),
                                                    used=metrics["settings"].get(name))
    injected = metrics["injected"]["extracted"]
    heads = {r: [tuple(h) for h in hs] for r, hs in injected["heads"].items()}
    pooled_heads = extraction.heads(injected["k"], "pooled")[extraction.relations[0]]
    out["aie_heatmap"] = plots.aie_grid(extraction.aie_pooled, {r: extraction.aie(r) for r in extraction.relations},
                                        heads, pooled_heads)
    return out


def write_report(result: EvaluationResult, out: str | Path, extraction: Extraction, tensorboard=None) -> dict:
    """Writes metrics.json, report.md and the figures (``<stem>.png`` and ``<stem>.pdf``) into
    ``out``; logs to ``tensorboard``.

    Args:
        tensorboard: A ``SummaryWriter`` (figures, accuracies, sweeps and report.md as text) or None.

    Returns:
        The metrics dict.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = result.to_dict()
    with staged():  # all of it lands or none: a full disk partway leaves the previous report whole
        drawn = []
        for stem, figure in figures(metrics, extraction).items():
            try:
                pixels = plots.render(figure)  # one raster draw for the PNG and TensorBoard (the PDF reuses its layout)
                if tensorboard is not None:
                    tensorboard.add_image(f"eval/{stem}", plots.screen_pixels(pixels), global_step=0, dataformats="HWC")
                plots.write(figure, out / stem, pixels=pixels)
            finally:
                plots.save_close(figure)
            drawn.append(stem)
        markdown = report_markdown(metrics, drawn)
        atomic_write_text(out / "report.md", markdown)
        if tensorboard is not None:
            for group in GROUP_TITLES:
                for n, c in metrics["conditions"].items():
                    if c["group"] == group:
                        tensorboard.add_scalar(f"eval_{group}/{n}", c["accuracy"], 0)
            for name, sweep in metrics["sweeps"].items():
                for split in ("val", "test"):
                    if split in sweep:
                        for x, y in zip(sweep["x"], sweep[split]["accuracy"]):
                            tensorboard.add_scalar(f"sweep_{name}/{split}_accuracy_by_{name}", y, x)
            tensorboard.add_text("eval/report", markdown, 0)
            tensorboard.flush()
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))  # last: the report is complete
    return metrics
