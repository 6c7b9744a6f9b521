"""``make demo``: the main job on the embedded default (configs/toy.yaml).

AIE head selection and FV extraction (train.py's callback), FV fine-tuning, then
evaluate.py with every condition including analogies. Prints the results table and
leaves metrics, report and plots under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mfv.evaluation import cli as eval_cli
from mfv.training import cli as train_cli


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mfv.demo")
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--limit", type=int, default=None, help="prompts per evaluation condition")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    metrics = train_cli.main(
        ["--config", args.config, "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", "train"]
    )
    trained = time.perf_counter() - start
    eval_args = ["--config", args.config, "--fv", metrics["exported_fv"], "--out", str(out / "eval")]
    if args.limit:
        eval_args += ["--limit", str(args.limit)]
    eval_cli.main(eval_args)
    print(f"demo finished in {time.perf_counter() - start:.0f} s (training {trained:.0f} s); "
          f"results in {out / 'eval'} (report.md, metrics.json, *.png), TensorBoard logs in {out}")


if __name__ == "__main__":
    main()
