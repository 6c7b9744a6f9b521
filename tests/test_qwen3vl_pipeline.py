"""The whole pipeline on a tiny random Qwen3-VL: train.py (AIE + fine-tuning) and evaluate.py."""

from __future__ import annotations

import json

import pytest
import yaml

from mfv.errors import MissingWeightsError
from mfv.commands.evaluate import main as evaluate_main
from mfv.models.families.qwen3vl import load as load_qwen3vl
from mfv.commands.train import main as train_main


@pytest.mark.slow
def test_train_and_evaluate_on_tiny_qwen3vl(tmp_path):
    config = {
        "seed_everything": 0,
        "model": {"backbone": "qwen3vl-random", "backbone_options": {"num_layers": 2}, "layer": 1,
                  "relations": ["above", "below", "left", "right"]},
        "data": {"class_path": "mfv.data.datamodule.SyntheticRelationDataModule",
                 "init_args": {"data_dir": str(tmp_path / "data"), "shots": 2, "image_size": 64, "batch_size": 4,
                               "num_images": {"eval": 12, "train": 12, "test": 8, "novel": 8, "composite": 8}}},
        "aie": {"num_mean_prompts": 4, "num_aie_prompts": 2, "k": 2, "batch_size": 2, "cache_dir": str(tmp_path / "cache")},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "qwen"}}},
    }
    path = tmp_path / "qwen.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = train_main(["--config", str(path)])
    assert metrics["aie"]["heads"]["above"] and "test/acc" in metrics["test"]
    out = tmp_path / "eval"
    result = evaluate_main(["--config", str(path), "--fv", metrics["exported_fv"], "--out", str(out), "--limit", "4",
                            "--evaluation.shots", "[1]", "--evaluation.max_k", "2", "--evaluation.sweep_limit", "4"])
    assert {"zero_shot", "zero_shot_fv", "zero_shot_finetuned_fv", "icl_1", "novel_zero_shot_fv",
            "analogy_composite_normalized", "analogy_icl_1"} <= set(result["summary"])
    assert json.loads((out / "metrics.json").read_text())["settings"]["backbone"] == "qwen3vl-tiny"


def test_missing_qwen_weights_are_a_clear_error(tmp_path):
    """A hub id not in the cache: the download command; a local folder that is not there:
    what it should hold, never a download of a local path."""
    missing = tmp_path / "no-such-qwen"
    with pytest.raises(MissingWeightsError, match="holds config.json") as local:
        load_qwen3vl(str(missing))
    assert "huggingface-cli" not in str(local.value) and str(missing) in str(local.value)
    with pytest.raises(MissingWeightsError, match="huggingface-cli download Qwen/No-Such-Model"):
        load_qwen3vl("Qwen/No-Such-Model", cache_dir=str(tmp_path / "hub"))
