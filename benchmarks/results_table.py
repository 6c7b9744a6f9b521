"""Markdown tables for the README's Results section, from the benchmark and demo JSON files.

    python benchmarks/results_table.py --bench runs/bench --demo runs/demo/eval/metrics.json

Reads ``aie.json``, ``attribution.json`` and ``evaluate.json`` (whichever exist) and a demo's
``metrics.json``; prints the tables (the README pastes them as printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def aie_table(data: dict) -> str:
    lines = ["| shape | layers x heads | speedup (CPU time) | bound | time efficiency | flop efficiency | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for name, s in data["shapes"].items():
        lines.append(f"| {name} | {s['layers']} x {s['heads']} | {s['speedup']:.1f}x | {s['bound']:.1f}x | "
                     f"{s['time_efficiency']:.2f} | {s['flop_efficiency']:.2f} | {s['max_abs_diff']:.1e} |")
    p = data["openflamingo4b_projection_per_prompt"]
    t = p["tflops_per_prompt"]
    lines.append("")
    lines.append(f"OpenFlamingo-4B projection per prompt ({p['sites']} heads, {p['images']} images at {p['image_size']} px): "
                 f"reference {t['reference']:.0f} TFLOP, fast {t['fast_executed']:.2f} TFLOP, minimal {t['minimal']:.2f} "
                 f"TFLOP (bound {p['bound']:.0f}x). Whole benchmark: {data['seconds']:.0f} s.")
    return "\n".join(lines)


def attribution_table(data: dict) -> str:
    lines = ["| shape | Spearman vs exact | top-10 overlap | vs reference | vs fast exact |", "|---|---|---|---|---|"]
    for name, s in data["shapes"].items():
        lines.append(f"| {name} | {s['spearman']:.3f} | {s['top10_overlap']}/10 | {s['speedup_vs_reference']:.1f}x | "
                     f"{s['speedup_vs_fast_exact']:.2f}x |")
    accuracy = data.get("organism_fv_accuracy")
    if accuracy:
        lines.append("")
        for method, a in accuracy.items():
            lines.append(f"- organism, zero-shot + FV from {method} heads: {a['accuracy']:.3f} "
                         f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] (n={a['n']})")
    return "\n".join(lines)


def demo_table(metrics: dict, names: list[str]) -> str:
    lines = ["| condition | accuracy [95% CI] | n |", "|---|---|---|"]
    for name in names:
        c = metrics["conditions"].get(name)
        if c:
            lines.append(f"| {c.get('description') or name} (`{name}`) | {c['accuracy']:.3f} "
                         f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | {c['n']} |")
    return "\n".join(lines)


DEMO_ROWS = ["zero_shot", "zero_shot_fv", "zero_shot_fv_distributed", "zero_shot_finetuned_fv", "icl_1", "icl_4",
             "icl_10", "icl_shuffled_4", "icl_shuffled_4_fv", "novel_zero_shot", "novel_zero_shot_fv", "novel_icl_4",
             "analogy_icl_1", "analogy_icl_4", "analogy_composite_normalized", "analogy_composite_normalized_one_shot",
             "analogy_composite_sum", "analogy_composite_raw_one_shot", "analogy_composite_finetuned_normalized",
             "analogy_composite_finetuned_softmax_affine", "analogy_composite_finetuned_softmax_affine_one_shot"]


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--bench", default="runs/bench")
    parser.add_argument("--demo", default="runs/demo/eval/metrics.json")
    args = parser.parse_args()
    bench = Path(args.bench)
    if (bench / "aie.json").is_file():
        print(aie_table(json.loads((bench / "aie.json").read_text())), "\n")
    if (bench / "attribution.json").is_file():
        print(attribution_table(json.loads((bench / "attribution.json").read_text())), "\n")
    if (bench / "evaluate.json").is_file():
        e = json.loads((bench / "evaluate.json").read_text())
        print(f"Evaluation ({e['conditions']} conditions): {e['without_reuse_cpu_seconds']:.0f} s CPU from scratch, "
              f"{e['with_reuse_cpu_seconds']:.0f} s with reuse ({e['speedup']:.2f}x), identical accuracies: "
              f"{e['identical_accuracies']}, identical sweeps: {e.get('identical_sweeps')}\n")
    if Path(args.demo).is_file():
        metrics = json.loads(Path(args.demo).read_text())
        print(demo_table(metrics, DEMO_ROWS))
        for name, sweep in metrics["sweeps"].items():
            if "chosen" in sweep and "test_at_chosen" in sweep:
                at = sweep["test_at_chosen"]
                print(f"\nbest {name} on validation: {sweep['chosen']}; test there {at['accuracy']:.3f} "
                      f"[{at['ci95'][0]:.3f}, {at['ci95'][1]:.3f}] (n={at['n']})")


if __name__ == "__main__":
    main()
