"""Drills: what a new user does wrong, or what goes wrong around them, and the exact outcome.

Each drill asserts either a clear error (exit status 2, a message naming the field or file,
no traceback) or equality with the uninterrupted / single-process result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mfv.errors import MissingWeightsError
from mfv.commands.evaluate import main as evaluate_main
from mfv.method.function_vector import FunctionVectorSet
from mfv.models import load_backbone
from mfv.commands.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "intermediate_size": 64}
RELATIONS = ["above", "below", "left", "right"]


def config(root: Path, **data) -> dict:
    """A tiny run with the default data settings (shuffle_train: true)."""
    return {
        "seed_everything": 0,
        "model": {"backbone": "openflamingo-random", "backbone_options": BACKBONE, "layer": 1, "relations": RELATIONS},
        "data": {"class_path": "mfv.data.datamodule.SyntheticRelationDataModule",
                 "init_args": {"data_dir": str(root / "data"), "shots": 2, "image_size": 32, "batch_size": 4,
                               "num_images": {"eval": 16, "train": 40, "test": 12, "novel": 8, "composite": 8},
                               **data}},
        "aie": {"num_mean_prompts": 8, "num_aie_prompts": 4, "k": 3, "batch_size": 4, "aie_filter": "all",
                "cache_dir": str(root / "cache")},
        "trainer": {"accelerator": "cpu", "max_epochs": 3, "default_root_dir": str(root),
                    "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root / "runs"), "name": "drill"}}},
    }


def write_config(root: Path, **data) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "drill.yaml"
    path.write_text(yaml.safe_dump(config(root, **data)))
    return path


def fails_clearly(capsys, run, *needles: str) -> str:
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err[-2000:])
    return err


# ----- bad settings fail before any compute ----------------------------------------------

@pytest.mark.parametrize("override, needle", [
    (["--data.init_args.shots", "0"], "data.init_args.shots = 0"),
    (["--data.init_args.batch_size", "0"], "data.init_args.batch_size = 0"),
    (["--aie.k", "99"], "aie.k = 99"),
    (["--aie.k", "0"], "aie.k = 0"),
    (["--aie.batch_size", "0"], "aie.batch_size = 0"),
    (["--aie.selection", "best"], "aie.selection"),
])
def test_bad_settings_fail_before_any_compute(tmp_path, capsys, override, needle):
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: train_main(["--config", str(path), *override]), needle)
    assert not (tmp_path / "cache").exists()  # no AIE ran


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_evaluate_rejects_a_limit_that_is_not_a_count(tmp_path, capsys, limit):
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(tmp_path / "o"), "--limit", limit]),
                  f"limit = {limit}")
    assert not (tmp_path / "cache").exists()


def test_unwritable_outputs_fail_before_any_compute(tmp_path, capsys):
    path = write_config(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(blocker / "eval")]),
                  "--out", str(blocker))
    fails_clearly(capsys, lambda: train_main(["--config", str(path), "--model.export_dir", str(blocker / "x")]),
                  "model.export_dir")
    assert not (tmp_path / "cache").exists()


# ----- FV files are validated whole on load ------------------------------------------------

@pytest.fixture
def fv_file(tmp_path) -> Path:
    adapter = load_backbone("openflamingo-random", **BACKBONE)
    vectors = {r: torch.randn(adapter.hidden_size) for r in RELATIONS}
    heads = {r: [(0, 1), (2, 3)] for r in RELATIONS}
    return FunctionVectorSet(vectors, 1, heads, adapter.backbone_id, adapter.shape_signature()).save(tmp_path / "fv.safetensors")


def _rewrite(path: Path, tensors=None, **meta) -> Path:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = {**handle.metadata(), **meta}
    save_file(tensors or load_file(str(path)), str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "unreadable function-vector file"),
    ("heads_json", "field 'heads'"),
    ("size", "shape"),
    ("head_out_of_range", "field 'heads'"),
])
def test_damaged_fv_files_are_clear_errors(tmp_path, capsys, fv_file, damage, needle):
    if damage == "truncate":
        fv_file.write_bytes(fv_file.read_bytes()[:60])
    elif damage == "heads_json":
        _rewrite(fv_file, heads="{not json")
    elif damage == "size":
        _rewrite(fv_file, tensors={f"fv.{r}": torch.zeros(7) for r in RELATIONS})
    else:
        _rewrite(fv_file, heads=json.dumps({r: [[9, 0]] for r in RELATIONS}))
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--fv", str(fv_file), "--out",
                                                 str(tmp_path / "o"), "--limit", "2"]), "fv.safetensors", needle)


def test_report_prints_the_layer_actually_injected(tmp_path, fv_file):
    _rewrite(fv_file, layer="2")  # edited metadata: the file now says layer 2
    path = write_config(tmp_path)
    metrics = evaluate_main(["--config", str(path), "--fv", str(fv_file), "--out", str(tmp_path / "o"), "--limit", "2",
                             "--evaluation.analogies", "false", "--evaluation.max_k", "2", "--evaluation.sweep_limit", "2"])
    assert metrics["injected"]["finetuned"]["layer"] == 2
    assert metrics["conditions"]["zero_shot_finetuned_fv"]["layer"] == 2
    assert "Fine-tuned FVs injected after layer 2" in (tmp_path / "o" / "report.md").read_text()


# ----- interruption, resume, DDP -------------------------------------------------------------

def _run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs" / "drill").iterdir() if p.is_dir())


def _final_fvs(root: Path) -> torch.Tensor:
    return torch.load(next(root.rglob("last.ckpt")), weights_only=False)["state_dict"]["function_vectors"]


def test_kill_9_then_readme_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = write_config(tmp_path / "straight")
    assert subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(straight)], cwd=ROOT,
                          capture_output=True).returncode == 0
    interrupted = write_config(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(interrupted)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "killed").rglob("last.ckpt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    last = next((tmp_path / "killed").rglob("last.ckpt"))
    assert torch.load(last, weights_only=False)["epoch"] < 2
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(interrupted),
                              "--ckpt_path", str(last)], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.equal(_final_fvs(tmp_path / "killed"), _final_fvs(tmp_path / "straight"))
    assert len(_run_dirs(tmp_path / "killed")) == 1  # the resumed run continued in its own folder
    metrics = json.loads((_run_dirs(tmp_path / "killed")[0] / "metrics.json").read_text())
    expected = json.loads((_run_dirs(tmp_path / "straight")[0] / "metrics.json").read_text())
    assert metrics["best_val_acc"] == expected["best_val_acc"] and metrics["test"] == expected["test"]
    exported = FunctionVectorSet.load(metrics["exported_fv"])
    assert exported.metadata["epoch"] == torch.load(metrics["best_checkpoint"], weights_only=False)["epoch"]


@pytest.mark.slow
def test_ddp_spawn_metrics_equal_one_process_and_one_complete_run_folder(tmp_path):
    single = write_config(tmp_path / "single")
    one = train_main(["--config", str(single), "--trainer.max_epochs", "1"])
    ddp = write_config(tmp_path / "ddp", batch_size=2)  # same global batch over two ranks
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ddp), "--trainer.max_epochs", "1",
                           "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _run_dirs(tmp_path / "ddp")
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    for relation in RELATIONS:
        assert metrics["test"][f"test/acc_{relation}"] == pytest.approx(one["test"][f"test/acc_{relation}"], abs=1e-6)
    assert metrics["test"]["test/acc"] == pytest.approx(one["test"]["test/acc"], abs=1e-6)
    assert metrics["aie"] is not None and metrics["best_val_acc"] is not None
    exported = FunctionVectorSet.load(metrics["exported_fv"])
    assert all(exported.heads[r] for r in RELATIONS) and exported.metadata["epoch"] is not None


def test_two_processes_share_one_cache_safely(tmp_path):
    """Two extractions into the same cache at once: both finish, with the same result."""
    script = (
        "import sys, torch; from mfv.models import load_backbone; from mfv.data.datamodule import "
        "SyntheticRelationDataModule as D; from mfv.method.extraction import AIESettings as S, "
        "extract_from_datamodule as E\n"
        f"a = load_backbone('openflamingo-random', **{BACKBONE!r}); "
        f"d = D(data_dir={str(tmp_path / 'data')!r}, shots=2, image_size=32, num_images={{'eval': 16, 'train': 4, "
        "'test': 4, 'novel': 4, 'composite': 4}); d.prepare_data()\n"
        f"r = E(a, {RELATIONS!r}, d, S(num_mean_prompts=16, num_aie_prompts=16, k=2, batch_size=2, aie_filter='all', "
        f"cache_dir={str(tmp_path / 'cache')!r}), progress=False)\n"
        "torch.save(r.aie_pooled, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.pt")],
                   cwd=ROOT, check=True, capture_output=True)  # data generated once, before the race
    for trial in range(2):
        for p in (tmp_path / "cache").rglob("*.pt"):
            p.unlink()
        procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"{trial}-{i}.pt")], cwd=ROOT,
                                  stderr=subprocess.PIPE) for i in range(2)]
        errors = [p.communicate()[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors
        results = [torch.load(tmp_path / f"{trial}-{i}.pt") for i in range(2)]
        assert torch.equal(results[0], results[1])
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# ----- loaders never touch the network and name the option to set ----------------------------

def test_missing_4b_weights_name_the_real_option(tmp_path):
    with pytest.raises(MissingWeightsError, match="model.backbone_options.checkpoint_path"):
        load_backbone("openflamingo", release="openflamingo-4b", checkpoint_path=str(tmp_path / "no.pt"))


def test_missing_language_model_folder_is_named(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({}, checkpoint)
    with pytest.raises(MissingWeightsError, match="model.backbone_options.language_model_path"):
        load_backbone("openflamingo", release="openflamingo-4b", checkpoint_path=str(checkpoint),
                      language_model_path=str(tmp_path / "no-such-lm"))


def test_qwen_loader_is_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    seen = {}

    def spy(*args, **kwargs):
        seen["offline"] = constants.HF_HUB_OFFLINE
        raise OSError("not in the cache")

    monkeypatch.setattr("transformers.AutoProcessor.from_pretrained", spy)
    with pytest.raises(MissingWeightsError, match="model.backbone_options.model_path"):
        load_backbone("qwen3vl", model_path="Qwen/Qwen3-VL-4B-Instruct", cache_dir=str(tmp_path))
    assert seen["offline"] is True and constants.HF_HUB_OFFLINE == bool(os.environ.get("HF_HUB_OFFLINE"))


def test_progress_bar_can_be_turned_off(tmp_path):
    path = write_config(tmp_path)
    metrics = train_main(["--config", str(path), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    assert "test/acc" in metrics["test"]


def test_fast_dev_run_writes_nothing(tmp_path, monkeypatch):
    path = write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    train_main(["--config", str(path), "--trainer.fast_dev_run", "true"])
    outputs = {p for p in set(tmp_path.rglob("*")) - before if p.suffix in (".json", ".png", ".safetensors")}
    # The generated data and the AIE cache are inputs, kept in their configured folders.
    written = {p for p in outputs if not p.is_relative_to(tmp_path / "data") and not p.is_relative_to(tmp_path / "cache")}
    assert not written, written


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A full disk mid-write: the .ckpt is absent (or the previous one), never 0 bytes."""
    import errno

    import lightning.fabric.utilities.cloud_io as cloud_io

    from mfv.training.callbacks import AtomicCheckpointIO

    target = tmp_path / "best-epoch=00.ckpt"

    def disk_full(checkpoint, path):
        Path(path).write_bytes(b"")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cloud_io, "_atomic_save", disk_full)
    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", disk_full)
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert not target.exists() and not list(tmp_path.iterdir())
