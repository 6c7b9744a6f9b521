"""Repeat extraction, fine-tuning and evaluation over seeds; report mean and spread.

    python -m mfv.seeds --config configs/toy.yaml --seeds 3 --out runs/seeds [--limit N] [-- overrides]

Seed ``s`` sets ``seed_everything`` and the data seed (a new synthetic set and new episodes),
so the spread covers data, AIE prompts and fine-tuning order. Writes ``seeds.json`` (every
condition: mean, sample standard deviation, min, max, per-seed values) and ``seeds.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Sequence

from mfv.commands.evaluate import main as evaluate_main
from mfv.commands.train import main as train_main
from mfv.io import atomic_write_text, ensure_writable_dir


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Overrides for both commands, and ``--evaluation.*`` ones (with their values) for evaluate only."""
    shared, evaluation_only, index = [], [], 0
    while index < len(overrides):
        token = overrides[index]
        takes_value = index + 1 < len(overrides) and not overrides[index + 1].startswith("--") and "=" not in token
        group = overrides[index:index + 1 + takes_value]
        (evaluation_only if token.startswith("--evaluation.") else shared).extend(group)
        index += len(group)
    return shared, evaluation_only


def aggregate(per_seed: list[dict]) -> dict[str, dict]:
    """Mean, spread and values of every condition present in all seeds' ``summary``."""
    names = [n for n in per_seed[0]["summary"] if all(n in m["summary"] for m in per_seed)]
    out = {}
    for name in names:
        values = [m["summary"][name] for m in per_seed]
        out[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "min": min(values), "max": max(values), "values": values}
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mfv.seeds", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="train.py / evaluate.py config")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--out", default="runs/seeds", help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="prompts per evaluation condition")
    parser.add_argument("overrides", nargs="*", help="more train/evaluate overrides, after --")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.exit(2, f"error: --seeds = {args.seeds} must be >= 1\n")
    out = ensure_writable_dir(args.out, "--out")
    shared, evaluation_only = split_overrides(args.overrides)
    per_seed = []
    for seed in range(args.seeds):
        folder = out / f"seed{seed}"
        common = ["--config", args.config, "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
                  *shared]
        trained = train_main([*common, "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.name",
                              "train"])
        evaluation = [*common, *evaluation_only, "--fv", trained["exported_fv"], "--out", str(folder / "eval")]
        per_seed.append(evaluate_main(evaluation + (["--limit", str(args.limit)] if args.limit else [])))
    summary = {"config": args.config, "seeds": args.seeds, "conditions": aggregate(per_seed)}
    atomic_write_text(out / "seeds.json", json.dumps(summary, indent=2))
    lines = [f"# {args.seeds} seeds of {args.config}\n", "| condition | mean | sd | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {c['mean']:.3f} | {c['std']:.3f} | {c['min']:.3f} | {c['max']:.3f} |"
              for n, c in summary["conditions"].items()]
    atomic_write_text(out / "seeds.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
