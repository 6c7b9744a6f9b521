"""evaluate.py on a tiny random model: conditions, schema, composite weights, errors, --limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mfv.evaluation import composite_vectors
from mfv.evaluation.conditions import AffineFit
from mfv.commands.evaluate import main
from mfv.method.function_vector import FunctionVectorSet
from mfv.models import load_backbone

BACKBONE = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "intermediate_size": 64}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    config = {
        "model": {"backbone": "openflamingo-random", "backbone_options": BACKBONE, "layer": 1,
                  "relations": ["above", "below", "left", "right"]},
        "data": {"class_path": "mfv.data.datamodule.SyntheticRelationDataModule",
                 "init_args": {"data_dir": str(root / "data"), "shots": 2, "image_size": 32, "batch_size": 8,
                               "num_images": {"eval": 16, "train": 12, "test": 16, "novel": 12, "composite": 12}}},
        "aie": {"num_mean_prompts": 8, "num_aie_prompts": 4, "k": 3, "batch_size": 4, "cache_dir": str(root / "cache")},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finetuned_fv(config_path, tmp_path_factory) -> Path:
    adapter = load_backbone("openflamingo-random", **BACKBONE)
    vectors = {r: torch.randn(adapter.hidden_size) for r in ["above", "below", "left", "right"]}
    fvs = FunctionVectorSet(vectors, 1, {}, adapter.backbone_id, adapter.shape_signature())
    return fvs.save(tmp_path_factory.mktemp("fv") / "finetuned.safetensors")


@pytest.fixture(scope="module")
def metrics(config_path, finetuned_fv, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("out")
    result = main(["--config", str(config_path), "--fv", str(finetuned_fv), "--out", str(out), "--limit", "6",
                   "--evaluation.shots", "[1, 4]", "--evaluation.max_k", "5", "--evaluation.sweep_limit", "8",
                   "--trainer.enable_progress_bar", "false"])
    return result, out


def test_every_condition_runs_and_metrics_match_the_schema(metrics):
    result, out = metrics
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["schema_version"] == 2
    required = {"zero_shot", "zero_shot_fv", "zero_shot_finetuned_fv", "icl_1", "icl_4", "novel_zero_shot_fv",
                "analogy_icl_1", "icl_shuffled_2", "icl_shuffled_2_fv", "novel_zero_shot",
                "analogy_icl_0", "analogy_icl_4", "analogy_fv_above"}
    required |= {f"analogy_composite_{kind}{mode}{where}" for kind in ("", "finetuned_")
                 for mode in ("normalized", "raw", "sum", "uniform", "softmax_affine") for where in ("", "_one_shot")}
    assert required <= set(on_disk["summary"])
    # The softmax_affine maps are fitted on validation prompts only (never test), and reported.
    for kind in ("extracted", "finetuned"):
        assert on_disk["settings"]["composite_affine"][kind]["split"] == "val"
        assert on_disk["settings"]["composite_affine"][kind]["n"] == on_disk["sweeps"]["layer"]["val"]["n"] >= 2
    for name, condition in on_disk["conditions"].items():
        assert {"split", "group", "accuracy", "ci95", "n", "per_relation"} <= set(condition)
        low, high = condition["ci95"]
        assert 0.0 <= low <= condition["accuracy"] <= high <= 1.0, name
        assert on_disk["summary"][name] == condition["accuracy"]
        for counts in condition["per_relation"].values():
            assert counts["correct"] <= counts["total"]
            assert counts["ci95"][0] <= counts["accuracy"] <= counts["ci95"][1]
    assert set(on_disk["conditions"]["analogy_icl_1"]["per_relation"]) <= {"above-left", "above-right", "below-left", "below-right"}
    layer = on_disk["sweeps"]["layer"]
    assert layer["x"] == [0, 1, 2] and layer["chosen_on"] == "val" and layer["chosen"] in layer["x"]
    assert len(on_disk["sweeps"]["k"]["test"]["accuracy"]) == 5
    assert "zero_shot_fv - zero_shot" in on_disk["comparisons"]
    for name in ("report.md", "layer_sweep.png", "k_sweep.png", "aie_heatmap.png", "conditions.png"):
        assert (out / name).stat().st_size > 0
    assert any((out / "tensorboard").iterdir())
    report = (out / "report.md").read_text()
    assert "(`zero_shot`)" in report and "95% CI" in report
    assert f"after layer {on_disk['injected']['extracted']['layer']}" in report


def test_limit_is_honoured(metrics):
    result, _ = metrics
    for name, condition in result["conditions"].items():
        assert condition["n"] == 6, name


def test_composite_modes():
    probabilities = torch.tensor([[0.2, 0.6, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5]])
    trained = torch.eye(4)
    torch.testing.assert_close(composite_vectors(probabilities, trained, "normalized").sum(-1), torch.ones(2))
    torch.testing.assert_close(composite_vectors(probabilities, trained, "raw"), probabilities)
    torch.testing.assert_close(composite_vectors(probabilities, trained, "sum"), torch.ones(2, 4))
    torch.testing.assert_close(composite_vectors(probabilities, trained, "uniform"), torch.full((2, 4), 0.25))
    torch.testing.assert_close(composite_vectors(probabilities, trained, "softmax"), torch.softmax(probabilities, -1))
    with pytest.raises(ValueError, match="affine"):
        composite_vectors(probabilities, trained, "softmax_affine")


def test_softmax_affine_fit_recovers_a_known_map():
    generator = torch.Generator().manual_seed(0)
    composites = torch.randn(40, 6, generator=generator)
    offset = torch.randn(6, generator=generator)
    fit = AffineFit.least_squares(composites, 2.5 * composites + offset, "val")
    assert not fit.degenerate and fit.n == 40 and fit.scale == pytest.approx(2.5)
    torch.testing.assert_close(fit.offset, offset)
    # Source answers likelier under their own relation's FV: a positive scale stretches the
    # near-uniform softmax composite towards that FV.
    trained = torch.eye(4)
    ids = torch.arange(40) % 4
    probabilities = 0.1 + 0.8 * torch.nn.functional.one_hot(ids, 4).float()
    fit = AffineFit.fit(probabilities, ids, trained, "val")
    mapped = composite_vectors(probabilities, trained, "softmax_affine", fit)
    assert fit.scale > 1 and (mapped.argmax(-1) == ids).all()
    torch.testing.assert_close(mapped, trained[ids])
    # Composites that do not vary: the scale is undetermined, set to 0 and reported.
    flat = AffineFit.fit(torch.full((3, 4), 0.5), torch.tensor([0, 1, 2]), trained, "val")
    assert flat.degenerate and flat.scale == 0.0
    torch.testing.assert_close(flat.offset, trained[:3].mean(0))


def test_fv_for_a_layer_beyond_the_model_is_a_clear_error(config_path, tmp_path, capsys):
    adapter = load_backbone("openflamingo-random", **BACKBONE)
    vectors = {r: torch.zeros(adapter.hidden_size) for r in ["above", "below", "left", "right"]}
    path = FunctionVectorSet(vectors, 7, {}, adapter.backbone_id, adapter.shape_signature()).save(tmp_path / "bad.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(config_path), "--fv", str(path), "--out", str(tmp_path / "o"), "--limit", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "'layer' = 7" in err and "0..2" in err


def test_seeds_report_mean_and_spread_over_runs(config_path, tmp_path):
    from mfv.seeds import main as seeds_main

    summary = seeds_main(["--config", str(config_path), "--seeds", "2", "--out", str(tmp_path), "--limit", "4", "--",
                          "--trainer.max_epochs", "1", "--model.init", "random", "--evaluation.analogies", "false",
                          "--evaluation.max_k", "2", "--evaluation.sweep_limit", "4", "--evaluation.shots", "[1]",
                          "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])
    zero = summary["conditions"]["zero_shot_fv"]
    assert len(zero["values"]) == 2 and zero["min"] <= zero["mean"] <= zero["max"]
    assert (tmp_path / "seeds.md").read_text().count("|") > 10
    first = json.loads((tmp_path / "seed0" / "eval" / "metrics.json").read_text())
    assert first["summary"]["zero_shot_fv"] == zero["values"][0]


def test_reuse_changes_no_accuracy(config_path, finetuned_fv, tmp_path):
    """Shared prompt passes, the image cache and per-image cross-attention give the same
    metrics as computing every condition from scratch (benchmarks/evaluate.py times both)."""
    common = ["--config", str(config_path), "--fv", str(finetuned_fv), "--limit", "6", "--evaluation.max_k", "3",
              "--evaluation.sweep_limit", "6", "--evaluation.shots", "[1]", "--trainer.enable_progress_bar", "false"]
    scratch = main([*common, "--out", str(tmp_path / "scratch"), "--evaluation.reuse", "false"])
    reused = main([*common, "--out", str(tmp_path / "reused")])
    assert scratch["summary"] == reused["summary"]
    assert scratch["sweeps"] == reused["sweeps"]
