"""evaluate.py on several devices: one process per device (Lightning Fabric, ``ddp``), each
scoring its share of every condition; the gathered scores equal one process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mfv.commands.evaluate import main as evaluate_main
from tests.test_drills import write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one(tmp_path):
    path = write_config(tmp_path)
    common = ["--config", str(path), "--limit", "6", "--evaluation.max_k", "2", "--evaluation.sweep_limit", "4",
              "--evaluation.analogies", "false"]
    one = evaluate_main([*common, "--out", str(tmp_path / "one")])
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *common, "--out", str(tmp_path / "two"),
                           "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["summary"] == one["summary"]
    assert two["conditions"]["zero_shot_fv"]["n"] == one["conditions"]["zero_shot_fv"]["n"] == 6
    assert two["sweeps"] == one["sweeps"]
