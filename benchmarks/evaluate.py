"""Demo-size evaluation: with and without reuse, and (``--base``) against an earlier commit, side by side.

    python benchmarks/evaluate.py --json runs/bench/evaluate.json [--fv RUN/function_vectors_finetuned.safetensors]
    git worktree add /tmp/base 1b42fdb   # e.g. the commit before Architecture v3
    python benchmarks/evaluate.py --base /tmp/base --limit 100 --fv RUN/function_vectors_finetuned.safetensors

Runs ``evaluate.py --config configs/toy.yaml`` twice in this process (one thread, CPU time):
``--evaluation.reuse false`` (every condition re-encodes its images and runs its prompts from
scratch, as before) and ``true`` (each distinct image encoded once; text attends to its own
image's latents only, not to every image under a mask; conditions over the same prompts share
one prompt pass and recompute only the last position from their injection layer). Reports both
times, the ratio, and whether every accuracy and sweep point in ``metrics.json`` is identical.

With ``--base DIR`` (a checkout of another commit, with the same data under its
``data_dir``) it also times the whole command, as a user runs it, in that checkout and in this
one: each in its own process with ``OMP_NUM_THREADS=1``, alternating, ``--repeats`` times
(medians reported, and the median of each repeat's new/base ratio). Two clocks per run:
``command`` (CPU seconds of one ``main()`` call after a warm-up call in the same process:
preflight, extraction from the cache, protocol, report) with its ``protocol`` and ``report``
parts, and ``process`` (CPU seconds of a fresh ``python evaluate.py`` process: imports,
preflight and all, AIE cache warm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs in a checkout (cwd and PYTHONPATH): one warm-up call, then one timed call of main(),
# its protocol and report parts timed by wrapping the names the command module calls.
_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
import mfv.commands.evaluate as command
parts = {"protocol": 0.0, "report": 0.0}
def timed(name, function):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            parts[name] += time.process_time() - start
    return wrapper
command.evaluate = timed("protocol", command.evaluate)
command.write_report = timed("report", command.write_report)
argv = json.loads(sys.argv[1])
command.main(argv)
parts = dict.fromkeys(parts, 0.0)
start = time.process_time()
metrics = command.main(argv)
print("MFV-BENCH " + json.dumps({"command": time.process_time() - start, **parts, "summary": metrics["summary"],
                                 "sweeps": {k: {s: v[s]["accuracy"] for s in ("val", "test") if s in v}
                                            for k, v in metrics["sweeps"].items()}}))
"""


def _command_args(config: str, out: Path, fv: str | None, limit: int | None, reuse: bool = True) -> list[str]:
    argv = ["--config", config, "--out", str(out), "--trainer.enable_progress_bar", "false",
            "--evaluation.reuse", str(reuse).lower()]
    argv += ["--fv", str(Path(fv).resolve())] if fv else []
    argv += ["--limit", str(limit)] if limit else []
    return argv


def reuse_comparison(args: argparse.Namespace, tmp: Path) -> dict:
    """Without vs with reuse, in this process (the second call of each is timed)."""
    from mfv.commands.evaluate import main as evaluate_main

    torch.set_num_threads(1)
    runs = {}
    for cached in (False, True):
        argv = _command_args(args.config, tmp / str(cached), args.fv, args.limit, cached)
        evaluate_main(argv)  # the first call also fills the AIE cache; both then load it
        start, wall = time.process_time(), time.perf_counter()
        metrics = evaluate_main(argv)
        runs[cached] = {"cpu_seconds": time.process_time() - start, "wall_seconds": time.perf_counter() - wall,
                        "summary": metrics["summary"], "sweeps": metrics.get("sweeps")}
    return {
        "without_reuse_cpu_seconds": runs[False]["cpu_seconds"], "with_reuse_cpu_seconds": runs[True]["cpu_seconds"],
        "speedup": runs[False]["cpu_seconds"] / runs[True]["cpu_seconds"],
        "identical_accuracies": runs[False]["summary"] == runs[True]["summary"],
        "identical_sweeps": runs[False]["sweeps"] == runs[True]["sweeps"],
        "differing": {k: (v, runs[True]["summary"][k]) for k, v in runs[False]["summary"].items()
                      if runs[True]["summary"].get(k) != v},
        "conditions": len(runs[True]["summary"]),
    }


def _in_checkout(tree: Path, argv: list[str], child: str | None) -> subprocess.CompletedProcess:
    """``evaluate.py argv`` (or the timing ``child``) run in ``tree``, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    command = [sys.executable, "-c", child, json.dumps(argv)] if child else [sys.executable, "evaluate.py", *argv]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: evaluate failed:\n{done.stderr[-3000:]}")
    return done


def _process_cpu(tree: Path, argv: list[str]) -> float:
    """CPU seconds (user + system) of one fresh ``python evaluate.py`` process in ``tree``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    _in_checkout(tree, argv, None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def base_comparison(args: argparse.Namespace, tmp: Path) -> dict:
    """The whole command in ``--base`` and in this checkout, alternating (see module docstring)."""
    trees = {"base": Path(args.base).resolve(), "new": ROOT}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    results: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            argv = _command_args(args.config, tmp / f"{name}-{repeat}", args.fv, args.limit)
            line = next(l for l in _in_checkout(tree, argv, _CHILD).stdout.splitlines() if l.startswith("MFV-BENCH "))
            results[name] = json.loads(line[len("MFV-BENCH "):])
            for part in ("command", "protocol", "report"):
                samples[name].setdefault(part, []).append(results[name][part])
            samples[name].setdefault("process", []).append(_process_cpu(tree, argv))
    medians = {name: {f"{part}_cpu_seconds": statistics.median(values) for part, values in parts.items()}
               for name, parts in samples.items()}
    return {
        "base": str(trees["base"]), "base_commit": _commit(trees["base"]), "new_commit": _commit(ROOT),
        "limit": args.limit, "repeats": args.repeats, "medians": medians, "samples": samples,
        "command_ratio_new_over_base": medians["new"]["command_cpu_seconds"] / medians["base"]["command_cpu_seconds"],
        "process_ratio_new_over_base": medians["new"]["process_cpu_seconds"] / medians["base"]["process_cpu_seconds"],
        # Each repeat runs base then new back to back: the median of their ratios discounts
        # load that other work puts on the machine for minutes at a time.
        "paired_ratio_medians": {
            part: statistics.median(n / b for n, b in zip(samples["new"][part], samples["base"][part]))
            for part in ("command", "process")},
        **_agreement(results["base"], results["new"]),
    }


def _agreement(base: dict, new: dict) -> dict:
    """Whether every accuracy and sweep point both checkouts report is identical."""
    common = sorted(set(base["summary"]) & set(new["summary"]))
    return {
        "identical_accuracies": all(base["summary"][k] == new["summary"][k] for k in common),
        "conditions_compared": len(common),
        "only_in_base": sorted(set(base["summary"]) - set(common)),
        "only_in_new": sorted(set(new["summary"]) - set(common)),
        "identical_sweeps": base["sweeps"] == new["sweeps"],
    }


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + (" + uncommitted changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", default="runs/bench/evaluate.json")
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--fv", default=None, help="fine-tuned FVs (adds those conditions)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--base", default=None, help="a checkout of another commit to time side by side")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per checkout (--base)")
    parser.add_argument("--skip_reuse", action="store_true", help="only the --base comparison")
    args = parser.parse_args()
    result: dict = {"config": args.config, "threads": 1, "clock": "process_time"}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_reuse:
            result.update(reuse_comparison(args, Path(tmp)))
        if args.base:
            result["side_by_side"] = base_comparison(args, Path(tmp))
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
