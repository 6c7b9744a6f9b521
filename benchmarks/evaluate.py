"""Demo-size evaluation with and without reuse (image cache, shared prompt passes), side by side.

    python benchmarks/evaluate.py --json runs/bench/evaluate.json [--fv RUN/function_vectors_finetuned.safetensors]

Runs ``evaluate.py --config configs/toy.yaml`` twice in this process (one thread, CPU time):
``--evaluation.reuse false`` (every condition re-encodes its images and runs its prompts from
scratch, as before) and ``true`` (each distinct image encoded once; text attends to its own
image's latents only, not to every image under a mask; conditions over the same prompts share
one prompt pass and recompute only the last position from their injection layer). Reports both
times, the ratio, and whether every accuracy and sweep point in ``metrics.json`` is identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mfv.commands.evaluate import main as evaluate_main


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", default="runs/bench/evaluate.json")
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--fv", default=None, help="fine-tuned FVs (adds those conditions)")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (False, True):
            argv = ["--config", args.config, "--out", str(Path(tmp) / str(cached)), "--trainer.enable_progress_bar",
                    "false", "--evaluation.reuse", str(cached).lower()]
            argv += ["--fv", args.fv] if args.fv else []
            argv += ["--limit", str(args.limit)] if args.limit else []
            evaluate_main(argv)  # the first call also fills the AIE cache; both then load it
            start, wall = time.process_time(), time.perf_counter()
            metrics = evaluate_main(argv)
            runs[cached] = {"cpu_seconds": time.process_time() - start, "wall_seconds": time.perf_counter() - wall,
                            "summary": metrics["summary"], "sweeps": metrics.get("sweeps")}
    result = {
        "config": args.config, "threads": 1, "clock": "process_time",
        "without_reuse_cpu_seconds": runs[False]["cpu_seconds"], "with_reuse_cpu_seconds": runs[True]["cpu_seconds"],
        "speedup": runs[False]["cpu_seconds"] / runs[True]["cpu_seconds"],
        "identical_accuracies": runs[False]["summary"] == runs[True]["summary"],
        "identical_sweeps": runs[False]["sweeps"] == runs[True]["sweeps"],
        "differing": {k: (v, runs[True]["summary"][k]) for k, v in runs[False]["summary"].items()
                      if runs[True]["summary"].get(k) != v},
        "conditions": len(runs[True]["summary"]),
    }
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
