"""Where researchers work: one CLI convention, the Python API of the README, install logic,
import order, TensorBoard contents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def exit_code(main: Callable[[list[str]], object], argv: list[str]) -> int:
    """The exit status ``main(argv)`` would give a console script (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _readme_api_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_python_api_block_of_the_readme_runs_and_equals_the_cli(tmp_path, monkeypatch, capsys):
    """The README's block as it is; its ``mfv.evaluate`` result equals evaluate.py's metrics.json
    on the same prompts (the 40 test prompts) and the same vectors (same extraction)."""
    from mfv.api import SMALL_SYNTHETIC
    from mfv.commands.evaluate import main as evaluate_main
    block = _readme_api_block()
    assert len(block.strip().splitlines()) <= 8  # the front page's promise
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert "expected" in capsys.readouterr().out
    api = namespace["result"].to_dict()

    prompts = {"num_mean_prompts": 100, "num_aie_prompts": 50}  # what the block passes to mfv.extract
    assert all(f"{k}={v}" in block for k, v in prompts.items())
    cli = evaluate_main([
        "--config", str(ROOT / "configs/toy.yaml"), "--out", str(tmp_path / "eval"), "--limit", "40",
        "--data.init_args.data_dir", "data/api", "--data.init_args.num_images", json.dumps(SMALL_SYNTHETIC),
        "--model.layer", "1", "--aie.k", "6", "--aie.selection", "pooled",
        "--aie.num_mean_prompts", str(prompts["num_mean_prompts"]), "--aie.num_aie_prompts", str(prompts["num_aie_prompts"]),
        "--evaluation.analogies", "false", "--evaluation.max_k", "1", "--evaluation.sweep_limit", "2",
        "--trainer.enable_progress_bar", "false"])
    for name in ("zero_shot", "zero_shot_fv"):
        assert api["conditions"][name]["n"] == cli["conditions"][name]["n"] == 40
        for key in ("accuracy", "ci95", "per_relation", "layer"):
            assert api["conditions"][name].get(key) == cli["conditions"][name].get(key), (name, key)
    assert api["injected"]["extracted"]["heads"] == cli["injected"]["extracted"]["heads"]


def test_lightning_before_mfv_imports_in_the_venv():
    for order in ("import lightning, mfv", "import torchmetrics, open_clip, mfv", "import mfv, lightning"):
        done = subprocess.run([sys.executable, "-c", order], capture_output=True, text=True)
        assert done.returncode == 0, (order, done.stderr[-1500:])


@pytest.mark.parametrize("command", ["train", "evaluate", "prepare-data", "prepare-gqa", "generate-synthetic", "demo",
                                     "train-organism"])
def test_every_command_shows_defaults_in_its_help(command, capsys):
    # In-process (a fresh process through the installed entry point: test_first_hour).
    from mfv import cli

    code = exit_code(cli.main, [command, "--help"])
    out, err = capsys.readouterr()
    assert code == 0, err[-1500:]
    assert "default" in out and "--config" in out


def test_evaluate_accepts_train_overrides_and_prints_its_config(tmp_path, monkeypatch, capsys):
    from mfv.commands.evaluate import main as evaluate_main

    monkeypatch.chdir(ROOT)
    common = ["--config", "configs/toy.yaml", "--data.init_args.data_dir", str(tmp_path / "data"),
              "--aie.cache_dir", str(tmp_path / "cache")]
    code = exit_code(evaluate_main, [*common, "--model.layer", "2", "--print_config"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-1500:]
    config = yaml.safe_load(printed.out)
    assert config["model"]["layer"] == 2 and config["model"]["backbone"] == "openflamingo-tiny"
    assert config["evaluation"]["max_k"] == 20 and config["aie"]["k"] == 18


@pytest.mark.parametrize("gpu, expected, unexpected", [
    (True, "pip install --quiet torch==", "--index-url"),
    (False, "--index-url https://download.pytorch.org/whl/cpu", None),
])
def test_makefile_picks_the_torch_build_from_the_machine(tmp_path, gpu, expected, unexpected):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\n" + ("echo 'GPU 0: NVIDIA H100'\n" if gpu else "exit 9\n"))
    (fake / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv")}
    for inherited in ("TORCH", "MAKEFLAGS", "MAKEOVERRIDES", "MFLAGS", "MAKELEVEL"):
        env.pop(inherited, None)  # `make test TORCH=cpu` (CI) passes its choice down to sub-makes
    done = subprocess.run(["make", "-n", "-B", f"{tmp_path}/venv/.mfv-installed", f"VENV={tmp_path}/venv"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    if unexpected:
        assert unexpected not in done.stdout
    guard = "grep -i '^nvidia-'"
    assert (guard in done.stdout) == (not gpu)  # the no-CUDA-wheel guard only where CPU-only is chosen
    forced = subprocess.run(["make", "-n", "-B", f"{tmp_path}/venv/.mfv-installed", f"VENV={tmp_path}/venv",
                             "TORCH=cpu"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "whl/cpu" in forced.stdout and guard in forced.stdout


def _tags(folder: Path) -> dict[str, set]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    for events in folder.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    return tags


def test_tensorboard_of_training_and_of_evaluation_each_in_its_own_folder(tmp_path):
    """Training logs into its run; evaluation logs under its --out only, never into the
    training run (which may be read-only, or evaluated several times)."""
    from mfv.commands.evaluate import main as evaluate_main
    from mfv.commands.train import main as train_main
    from tests.test_drills import write_config

    path = write_config(tmp_path)
    metrics = train_main(["--config", str(path), "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1"])
    run = Path(metrics["exported_fv"]).parent
    before = sorted(p.name for p in run.iterdir())
    evaluate_main(["--config", str(path), "--fv", metrics["exported_fv"], "--out", str(tmp_path / "eval"), "--limit",
                   "4", "--evaluation.max_k", "2", "--evaluation.sweep_limit", "4"])
    assert sorted(p.name for p in run.iterdir()) == before
    tags = _tags(run)
    assert {"aie/heatmap"} <= tags["images"]
    assert {"train/loss", "val/acc", "val/loss", "test/acc", "hp_metric"} <= tags["scalars"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "val/acc" in accumulator.Tags()["scalars"]:
            steps |= {event.step for event in accumulator.Scalars("val/acc")}
    assert 0 in steps  # the extracted FVs' accuracy, before any fine-tuning step
    evaluation = _tags(tmp_path / "eval" / "tensorboard")
    assert {"eval/conditions", "eval/layer_sweep", "eval/k_sweep", "eval/aie_heatmap"} <= evaluation["images"]
    assert {"eval_test/zero_shot", "eval_test/zero_shot_fv"} <= evaluation["scalars"]
    assert [t for t in tags["scalars"] if "lr" in t.lower().split("/")[-1]] == ["lr-Adam"]  # learning rate once
