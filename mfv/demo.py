"""``make demo`` / ``mfv demo``: the main job on the embedded default (configs/toy.yaml).

AIE head selection and FV extraction (train.py's callback), FV fine-tuning, then
evaluate.py with every condition including analogies, logged into the training run's
TensorBoard. Prints the results table and leaves metrics, report and figures under ``out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from mfv.commands import evaluate as eval_cli
from mfv.commands import train as train_cli


def run_demo(configs: Sequence[str] = ("configs/toy.yaml",), out: str = "runs/demo", limit: int | None = None) -> dict:
    """Trains and evaluates function vectors on the model organism.

    Args:
        configs: train/evaluate configs (later ones override earlier ones).
        out: Output folder (TensorBoard run under ``train/``, evaluation under ``eval/``).
        limit: Prompts per evaluation condition (default: every prompt).
    """
    start = time.perf_counter()
    config_args = [a for c in configs for a in ("--config", c)]
    metrics = train_cli.main([*config_args, "--trainer.logger.init_args.save_dir", out,
                              "--trainer.logger.init_args.name", "train"])
    trained = time.perf_counter() - start
    eval_args = [*config_args, "--fv", metrics["exported_fv"], "--out", str(Path(out) / "eval")]
    if limit:
        eval_args += ["--limit", str(limit)]
    result = eval_cli.main(eval_args)
    print(f"demo finished in {time.perf_counter() - start:.0f} s (training {trained:.0f} s); "
          f"results in {Path(out) / 'eval'} (report.md, metrics.json, *.png); TensorBoard: tensorboard --logdir {out}")
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """``mfv demo`` / ``python -m mfv.demo``; several configs as ``--configs A B`` or ``--configs [A,B]``."""
    import sys

    from jsonargparse import CLI

    from mfv.arguments import bracket_lists
    from mfv.console import quiet

    quiet()
    argv = bracket_lists(sys.argv[1:] if argv is None else argv, run_demo)
    return CLI(run_demo, args=argv, as_positional=False, prog="mfv demo")


if __name__ == "__main__":
    main()
