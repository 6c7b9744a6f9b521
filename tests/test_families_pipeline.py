"""The whole pipeline (train.py: AIE + fine-tuning; evaluate.py) from each family's config,
on its tiny random stand-in: the config's protocol, a stand-in backbone and tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mfv.commands.evaluate import main as evaluate_main
from mfv.commands.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("config_file, stand_in", [
    ("qwen3vl_synthetic.yaml", "qwen3vl-random"),
    ("qwen25vl_synthetic.yaml", "qwen2.5vl-random"),
    ("llava_synthetic.yaml", "llava-random"),
])
def test_train_and_evaluate_from_the_family_config_on_its_stand_in(tmp_path, config_file, stand_in):
    config = yaml.safe_load((ROOT / "configs" / config_file).read_text())
    config["model"].update(backbone=stand_in, backbone_options={"num_layers": 2}, layer=1, backbone_dtype="float32")
    config["data"]["init_args"].update(data_dir=str(tmp_path / "data"), shots=2, image_size=64, batch_size=4,
                                       num_workers=0, num_images={"eval": 12, "train": 12, "test": 8, "novel": 8,
                                                                  "composite": 8})
    config["aie"].update(num_mean_prompts=4, num_aie_prompts=4, k=2, batch_size=2, cache_dir=str(tmp_path / "cache"))
    config["trainer"].update(accelerator="cpu", max_epochs=1, default_root_dir=str(tmp_path))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / config_file
    path.write_text(yaml.safe_dump(config))
    metrics = train_main(["--config", str(path)])
    assert metrics["aie"]["heads"]["above"] and "test/acc" in metrics["test"]
    out = tmp_path / "eval"
    result = evaluate_main(["--config", str(path), "--fv", metrics["exported_fv"], "--out", str(out), "--limit", "4",
                            "--evaluation.shots", "[1]", "--evaluation.max_k", "2", "--evaluation.sweep_limit", "4"])
    assert {"zero_shot", "zero_shot_fv", "zero_shot_finetuned_fv", "icl_1", "novel_zero_shot_fv",
            "analogy_composite_normalized"} <= set(result["summary"])
    assert json.loads((out / "metrics.json").read_text())["settings"]["backbone"].endswith("-tiny")
