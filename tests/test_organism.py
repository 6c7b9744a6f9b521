"""The committed model organism: its weights reproduce the recorded accuracies through the
production prompt path, and the Lightning recipe runs end to end (shortened)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mfv.models.openflamingo import load_tiny_openflamingo
from mfv.organism.reference import REFERENCE_FILE, fixed_episode_accuracies

ORGANISM = Path(__file__).resolve().parents[1] / "checkpoints" / "organism"


def test_committed_organism_reproduces_its_recorded_accuracies(tmp_path):
    record = json.loads((ORGANISM / REFERENCE_FILE).read_text())
    torch.manual_seed(0)
    adapter = load_tiny_openflamingo(ORGANISM)
    measured = fixed_episode_accuracies(adapter, tmp_path)
    assert set(measured) == set(record["accuracy"])
    for name, expected in record["accuracy"].items():
        # Same weights, same episodes: only float summation order may differ across CPUs.
        assert measured[name] == pytest.approx(expected, abs=0.02), name
    # The property the organism exists for: demonstrations, not the query alone, give the relation.
    assert measured["icl_4"] >= 0.8 and measured["icl_0"] <= 0.4
    assert measured["novel_icl_4"] >= 0.6  # it knows the held-out names from its pretraining


def test_committed_organism_is_small_enough_to_commit():
    total = sum(p.stat().st_size for p in ORGANISM.rglob("*") if p.is_file())
    assert total <= 25 * 2**20


def test_recipe_runs_through_lightning_and_resumes(tmp_path, monkeypatch):
    """Two epochs of three steps on a small pool, then a resumed third epoch: the recipe
    trains every weight, validates through the production path and exports a loadable model."""
    from mfv.organism.train import main

    common = ["--data.work_dir", str(tmp_path / "work"), "--data.pool_size", "120", "--data.novel_pool_size", "60",
              "--data.steps_per_epoch", "3", "--data.batch_size", "4", "--data.eval_count", "8", "--data.heldout_size", "40",
              "--model.num_layers", "2", "--model.num_heads", "2", "--model.hidden_size", "32",
              "--model.intermediate_size", "64", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--out", str(tmp_path / "out")]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    main([*common, "--trainer.max_epochs", "2"])
    first = json.loads((tmp_path / "out" / "training.json").read_text())
    assert first["steps_done"] == 6
    main([*common, "--trainer.max_epochs", "3"])
    resumed = json.loads((tmp_path / "out" / "training.json").read_text())
    assert resumed["steps_done"] == 9 and set(resumed["final_validation"]) >= {"val/icl_4", "val/novel_icl_4"}
    curves = [json.loads(line) for line in (tmp_path / "work" / "curves.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curves] == [3, 6, 9]  # one line per validation, kept across the resume
    assert not list((tmp_path / "cwd").iterdir())  # config and checkpoints went to the work folder
    adapter = load_tiny_openflamingo(tmp_path / "out")
    assert adapter.num_layers == 2 and adapter.backbone_id == "openflamingo-organism"
