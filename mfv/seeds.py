"""Repeat extraction, fine-tuning and evaluation over seeds; report mean and spread.

    mfv seeds --config configs/toy.yaml --seeds 3 --out runs/seeds [--limit N] [overrides]

Every option that is not one of this command's own (``--config``, ``--seeds``, ``--out``,
``--limit``) is a train.py / evaluate.py override, written as for those commands (``mfv
train --help`` lists them); train.py's parser checks each before any compute. Seed ``s``
sets ``seed_everything`` and the data seed (a new synthetic set and new episodes), so the
spread covers data, AIE prompts and fine-tuning order. Writes ``seeds.json`` (every
condition: mean, sample standard deviation, min, max, per-seed values) and ``seeds.md``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

from mfv.io import atomic_write_text, exit_on_full_disk
from mfv.preflight import exit_on_bad_input
from mfv.runs import own_results_folder, record_results

OVERRIDES_HELP = ("Every other option is a train.py / evaluate.py override, e.g. --trainer.max_epochs 5 or "
                  "--evaluation.max_k 10 (mfv train --help and mfv evaluate --help list them); no -- is needed "
                  "before them.")


def aggregate(per_seed: list[dict]) -> dict[str, dict]:
    """Mean, spread and values of every condition present in all seeds' ``summary``."""
    names = [n for n in per_seed[0]["summary"] if all(n in m["summary"] for m in per_seed)]
    out = {}
    for name in names:
        values = [m["summary"][name] for m in per_seed]
        out[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "min": min(values), "max": max(values), "values": values}
    return out


def run_seeds(config: str, seeds: int = 3, out: str = "runs/seeds", limit: int | None = None,
              overrides: Sequence[str] = (), overwrite: bool = False) -> dict:
    """Trains and evaluates once per seed 0..seeds-1, then writes the mean and spread.

    Args:
        config: The train.py / evaluate.py config file.
        seeds: Number of seeds (0..N-1), at least 1.
        out: Output folder (one sub-folder per seed, seeds.json and seeds.md).
        limit: Prompts per evaluation condition (default: every prompt of each split).
        overrides: train.py / evaluate.py overrides, given to both (train.py parses and
            ignores the evaluation section).
        overwrite: Replace an ``out`` holding seeds of other settings (refused otherwise).

    Returns:
        The summary written to ``seeds.json``.
    """
    settings = {"config": config, "seeds": seeds, "limit": limit, "overrides": list(overrides)}
    with exit_on_bad_input():  # one seeds run at a time in a folder
        folder, lock = own_results_folder(out, "--out", "seeds", settings, overwrite, holder="mfv seeds")
    with lock, exit_on_full_disk(folder):
        return _run_seeds(config, seeds, folder, limit, overrides, settings)


def _run_seeds(config: str, seeds: int, folder: Path, limit: int | None, overrides: Sequence[str],
               settings: dict) -> dict:
    """:func:`run_seeds` in its checked and locked ``folder``."""
    from mfv.commands.evaluate import main as evaluate_main
    from mfv.commands.train import main as train_main

    per_seed = []
    for seed in range(seeds):
        common = ["--config", config, "--seed_everything", str(seed), "--data.init_args.seed", str(seed), *overrides]
        trained = train_main([*common, "--trainer.logger.init_args.save_dir", str(folder / f"seed{seed}"),
                              "--trainer.logger.init_args.name", "train"])
        # This folder is this run's (checked above): a rerun's evaluation replaces the last one's.
        evaluation = [*common, "--fv", trained["exported_fv"], "--out", str(folder / f"seed{seed}" / "eval"),
                      "--overwrite", "true"]
        per_seed.append(evaluate_main(evaluation + (["--limit", str(limit)] if limit else [])))
    summary = {"config": config, "seeds": seeds, "conditions": aggregate(per_seed)}
    atomic_write_text(folder / "seeds.json", json.dumps(summary, indent=2))
    lines = [f"# {seeds} seeds of {config}\n", "| condition | mean | sd | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {c['mean']:.3f} | {c['std']:.3f} | {c['min']:.3f} | {c['max']:.3f} |"
              for n, c in summary["conditions"].items()]
    atomic_write_text(folder / "seeds.md", "\n".join(lines) + "\n")
    record_results(folder, "seeds", settings)
    print("\n".join(lines))
    return summary


def build_parser():
    """``mfv seeds``'s own options (jsonargparse, help text from :func:`run_seeds`)."""
    from jsonargparse import ArgumentParser
    from jsonargparse.typing import PositiveInt

    parser = ArgumentParser(prog="mfv seeds", description=__doc__.split("\n")[0], epilog=OVERRIDES_HELP)
    parser.add_argument("--config", type=str, required=True, help="The train.py / evaluate.py config file.")
    parser.add_argument("--seeds", type=PositiveInt, default=3, help="Number of seeds (0..N-1), at least 1.")
    parser.add_argument("--out", type=str, default="runs/seeds",
                        help="Output folder (one sub-folder per seed, seeds.json and seeds.md).")
    parser.add_argument("--limit", type=PositiveInt | None, default=None,
                        help="Prompts per evaluation condition (default: every prompt of each split).")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="Replace an --out holding seeds of other settings (refused otherwise).")
    return parser


OWN_OPTIONS = ("--config", "--seeds", "--out", "--limit", "--overwrite", "-h", "--help")


def split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """This command's own options (with their values) and the train/evaluate overrides.

    An override is an option and the values after it up to the next option; a ``--``
    separator (the old convention) is accepted and dropped.
    """
    own, overrides, index, argv = [], [], 0, list(argv)
    while index < len(argv):
        token = argv[index]
        if token == "--":
            index += 1
            continue
        end = index + 1
        if token.startswith("-") and "=" not in token:
            while end < len(argv) and not argv[end].startswith("--") and argv[end] not in ("-h",):
                end += 1
        name = token.partition("=")[0]
        (own if name in OWN_OPTIONS or not token.startswith("-") else overrides).extend(argv[index:end])
        index = end
    return own, overrides


def main(argv: Sequence[str] | None = None) -> dict:
    """``mfv seeds`` / ``python -m mfv.seeds``."""
    import sys

    from mfv.console import quiet

    quiet()
    own, overrides = split_arguments(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    return run_seeds(args.config, args.seeds, args.out, args.limit, overrides,
                     **({"overwrite": True} if args.overwrite else {}))


if __name__ == "__main__":
    main()
