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


# ----- a GPU config on a machine without a GPU -----------------------------------------------

@pytest.fixture
def no_gpu(monkeypatch):
    """This machine, as the preflight sees it, has no GPU (also where the tests run on one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _no_model_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the accelerator was checked")

    monkeypatch.setattr("mfv.training.module.load_backbone", refuse)


def test_a_gpu_config_without_a_gpu_is_one_line_saying_how_to_run_on_cpu(tmp_path, capsys, monkeypatch, no_gpu):
    path = write_config(tmp_path)
    _no_model_built(monkeypatch)
    gpu_config = str(ROOT / "configs" / "ddp_4gpu.yaml")
    expected = (f"error: {gpu_config} asks for trainer.accelerator=gpu but this machine has no GPU: run with "
                f"--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto")
    for run in (lambda: train_main(["--config", str(path), "--config", gpu_config]),
                lambda: evaluate_main(["--config", str(path), "--config", gpu_config, "--out", str(tmp_path / "o")])):
        err = fails_clearly(capsys, run)
        assert err.strip().splitlines()[-1] == expected
        assert "No supported gpu backend" not in err and err.count("error:") == 1
    err = fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--trainer.accelerator", "cuda",
                                                       "--out", str(tmp_path / "o")]))
    assert err.strip().splitlines()[-1] == ("error: the command line asks for trainer.accelerator=cuda but this "
                                            "machine has no GPU: run with --trainer.accelerator cpu --trainer.devices 1")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "data").exists() and not (tmp_path / "o").exists()


def test_more_gpus_than_the_machine_has_names_the_count(monkeypatch):
    from mfv.errors import ConfigError
    from mfv.accelerator import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^the command line asks for trainer.devices=4 but this machine has 1 GPU: "
                                          r"run with --trainer.devices 1$"):
        check_accelerator({"accelerator": "gpu", "devices": 4}, [], ["--trainer.devices", "4"])
    check_accelerator({"accelerator": "cuda", "devices": 1})  # fits: nothing to say
    check_accelerator({"accelerator": "cpu", "devices": 4})


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
    metrics = evaluate_main(["--config", str(path), "--fv", str(fv_file), "--out", str(tmp_path / "o"), "--limit", "4",
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


# ----- issue 25: one preflight before any compute ---------------------------------------------

def _no_compute(root: Path) -> None:
    """No AIE ran (its cache folder was never made) and no run folder was written."""
    assert not (root / "cache").exists()
    assert not (root / "runs").exists()


def _prepared(root: Path, **data) -> tuple[Path, "SyntheticRelationDataModule"]:
    """A drill config and its generated synthetic data."""
    from mfv.data.datamodule import SyntheticRelationDataModule

    path = write_config(root, **data)
    init = yaml.safe_load(path.read_text())["data"]["init_args"]
    datamodule = SyntheticRelationDataModule(**init)
    datamodule.prepare_data()
    return path, datamodule


@pytest.mark.parametrize("override, needle", [
    (["--data.init_args.image_size", "-64"], "data.init_args.image_size = -64"),
    (["--data.init_args.val_fraction", "0"], "data.init_args.val_fraction = 0"),
    (["--aie.num_aie_prompts", "3"], "aie.num_aie_prompts = 3"),  # per-relation selection: one relation gets none
    (["--aie.num_mean_prompts", "2"], "aie.num_mean_prompts = 2"),
    (["--data.init_args.shots", "16"], "data.init_args.shots = 16"),  # 16 eval scenes: at most 15 demonstrations
])
def test_bad_data_settings_fail_before_any_compute(tmp_path, capsys, override, needle):
    path = write_config(tmp_path)
    err = fails_clearly(capsys, lambda: train_main(["--config", str(path), *override]), needle)
    assert len(err.strip().splitlines()[-1]) > 20 and err.strip().splitlines()[-1].startswith("error: ")
    _no_compute(tmp_path)


def test_relation_without_aie_prompts_names_the_relation(tmp_path, capsys):
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: train_main(["--config", str(path), "--aie.num_aie_prompts", "3"]),
                  "leave out relation(s) ['right']", "aie.num_aie_prompts >= 4")
    # pooled heads need no AIE prompt of each relation: the same counts pass the preflight
    from mfv.commands.train import FunctionVectorCLI, build_cli
    from mfv.preflight import plan_training

    cli = build_cli(FunctionVectorCLI, ["--config", str(path), "--aie.num_aie_prompts", "3", "--aie.selection", "pooled"])
    assert set(plan_training(cli).fingerprints) == {"eval", "train", "val", "test"}


@pytest.mark.parametrize("damage", ["deleted", "garbage", "truncated", "empty"])
@pytest.mark.parametrize("split", ["eval", "test"])
def test_a_broken_image_fails_before_any_compute(tmp_path, capsys, damage, split):
    path, datamodule = _prepared(tmp_path)
    image = Path(datamodule.sampler(split).image_paths()[3])
    if damage == "deleted":
        image.unlink()
    elif damage == "garbage":
        image.write_bytes(os.urandom(3000))
    elif damage == "truncated":
        image.write_bytes(image.read_bytes()[:100])
    else:
        image.write_bytes(b"")
    fails_clearly(capsys, lambda: train_main(["--config", str(path)]), str(image), "remove")
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(tmp_path / "o")]), str(image))
    _no_compute(tmp_path)


def _checkpoint(path: Path, relations=RELATIONS, layer: int = 1, injection: str = "single") -> Path:
    """What train.py writes, built by the module's own hook (no fit)."""
    from mfv.training.module import FunctionVectorModule

    module = FunctionVectorModule("openflamingo-random", BACKBONE, relations, layer, init="random", injection=injection)
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 10}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"),
    ("empty", "the file is empty"),
    ("truncated", "unreadable checkpoint"),
    ("random", "unreadable checkpoint"),
    ("not_mfv", "not a train.py checkpoint"),
    ("other_relations", "other relations"),
    ("reordered", "the same relations in another order"),
    ("other_layer", "model.layer = 2"),
    ("other_injection", "model.injection = 'distributed'"),
    ("nan", "NaN"),
])
def test_a_checkpoint_that_does_not_match_the_run_fails_before_any_compute(tmp_path, capsys, case, needle):
    path = write_config(tmp_path)
    ckpt = tmp_path / "last.ckpt"
    if case == "empty":
        ckpt.write_bytes(b"")
    elif case in ("truncated", "random"):
        valid = _checkpoint(tmp_path / "valid.ckpt").read_bytes()
        ckpt.write_bytes(valid[: len(valid) // 2] if case == "truncated" else os.urandom(len(valid)))
    elif case == "not_mfv":
        torch.save({"state_dict": {}}, ckpt)
    elif case == "other_relations":
        _checkpoint(ckpt, relations=["above", "below"])
    elif case == "reordered":
        _checkpoint(ckpt, relations=["below", "above", "left", "right"])
    elif case == "other_layer":
        _checkpoint(ckpt, layer=2)
    elif case == "other_injection":
        _checkpoint(ckpt, injection="distributed")
    elif case == "nan":
        _checkpoint(ckpt)
        saved = torch.load(ckpt, weights_only=False)
        saved["state_dict"]["function_vectors"][0, 0] = float("nan")
        torch.save(saved, ckpt)
    fails_clearly(capsys, lambda: train_main(["--config", str(path), "--ckpt_path", str(ckpt)]), "--ckpt_path",
                  str(ckpt), needle)
    _no_compute(tmp_path)


def test_a_matching_checkpoint_passes_and_on_load_refuses_reordered_relations(tmp_path):
    from mfv.errors import ConfigError
    from mfv.training.module import FunctionVectorModule

    saved = torch.load(_checkpoint(tmp_path / "ok.ckpt"), weights_only=False)
    module = FunctionVectorModule("openflamingo-random", BACKBONE, RELATIONS, 1, init="random")
    module.on_load_checkpoint(saved)  # the same run: accepted
    reordered = FunctionVectorModule("openflamingo-random", BACKBONE, ["right", "left", "below", "above"], 1, init="random")
    with pytest.raises(ConfigError, match="another order"):
        reordered.on_load_checkpoint(saved)


@pytest.mark.parametrize("blocked, needle", [("--aie.cache_dir", "aie.cache_dir"),
                                             ("--trainer.logger.init_args.save_dir", "run folder")])
def test_unwritable_run_folder_or_cache_fails_before_any_compute(tmp_path, capsys, blocked, needle):
    path = write_config(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fails_clearly(capsys, lambda: train_main(["--config", str(path), blocked, str(blocker / "x")]), needle,
                  str(blocker))
    _no_compute(tmp_path)


def test_a_full_disk_fails_before_any_compute(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    path = write_config(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(tmp_path / "o")]),
                  "--out", "1.0 MiB free")
    fails_clearly(capsys, lambda: train_main(["--config", str(path)]), "MiB free")
    _no_compute(tmp_path)
    assert not (tmp_path / "o").exists()


def test_fv_file_holding_nan_is_refused(tmp_path, capsys, fv_file):
    tensors = load_file(str(fv_file))
    tensors["fv.left"][3] = float("nan")
    _rewrite(fv_file, tensors=tensors)
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--fv", str(fv_file), "--out",
                                                 str(tmp_path / "o")]), str(fv_file), "['left']", "NaN")
    _no_compute(tmp_path)
    from mfv.errors import IncompatibleVectorError

    fvs = FunctionVectorSet.load  # and FunctionVectorSet.save never writes one
    with pytest.raises(IncompatibleVectorError, match="NaN"):
        fvs(fv_file)
    broken = FunctionVectorSet({"left": torch.full((32,), float("inf"))}, 1, {}, "x", {})
    with pytest.raises(IncompatibleVectorError, match="not written"):
        broken.save(tmp_path / "inf.safetensors")
    assert not (tmp_path / "inf.safetensors").exists()


@pytest.mark.parametrize("limit", ["1", "3"])
def test_limit_below_the_number_of_relations_is_an_error(tmp_path, capsys, limit):
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(tmp_path / "o"), "--limit",
                                                 limit]), f"--limit {limit}", "--limit >= 4")
    _no_compute(tmp_path)


# ----- GQA data through the same preflight ------------------------------------------------------

def _gqa_image(i: int, names: tuple[str, str, str], relation: str) -> dict:
    def obj(name, x, y, w, h, relations=()):
        return {"name": name, "x": x, "y": y, "w": w, "h": h, "attributes": [],
                "relations": [{"name": n, "object": o} for n, o in relations]}

    return {"width": 100, "height": 100, "objects": {
        f"{i}a": obj(names[0], 0, 0, 40, 40, [(relation, f"{i}b")]),
        f"{i}b": obj(names[1], 50, 0, 40, 40),
        f"{i}c": obj(names[2], 0, 50, 30, 40)}}


def _gqa_config(root: Path, names=("apple", "ball", "lamp"), left: int = 40, above: int = 40,
                relations=("left of", "above"), shots: int = 2) -> Path:
    """A prepared GQA set (half of each relation's images for training, half of those held
    out for validation) and a drill config reading it."""
    from PIL import Image

    from mfv.data.gqa import prepare

    graphs = {f"l{i}": _gqa_image(i, names, "to the left of") for i in range(left)}
    graphs.update({f"a{i}": _gqa_image(100 + i, names, "above") for i in range(above)})
    (root / "images").mkdir(parents=True)
    for number, image_id in enumerate(graphs):
        Image.new("RGB", (64, 64), (number, 0, 0)).save(root / "images" / f"{image_id}.jpg")
    (root / "sg.json").write_text(json.dumps(graphs))
    prepare([root / "sg.json"], root / "images", ["left of", "above"], root / "gqa", progress=False,
            split="per_relation")
    settings = config(root)
    settings["model"]["relations"] = list(relations)
    settings["data"] = {"class_path": "mfv.data.gqa.GQARelationDataModule",
                        "init_args": {"dataset_dir": str(root / "gqa"), "shots": shots, "batch_size": 4,
                                      "val_fraction": 0.5}}
    path = root / "gqa.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_gqa_answers_unknown_to_the_tokenizer_are_refused(tmp_path, capsys):
    path = _gqa_config(tmp_path, names=("apple", "zebra", "lamp"))  # the answer 'zebra' is not in the tiny vocabulary
    fails_clearly(capsys, lambda: train_main(["--config", str(path)]), "answers ('zebra')", "unknown", "<unk>")
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(tmp_path / "o")]), "'zebra'")
    _no_compute(tmp_path)
    asking = _gqa_config(tmp_path / "anchor", names=("yak", "ball", "lamp"))  # a question about an unknown 'yak'
    fails_clearly(capsys, lambda: train_main(["--config", str(asking)]), "objects the questions name ('yak')")


def test_gqa_relation_with_too_few_images_is_named_with_its_counts(tmp_path, capsys):
    path = _gqa_config(tmp_path, above=4)  # per_relation split: 2 train images of 'above', a 2-shot task needs 3
    fails_clearly(capsys, lambda: train_main(["--config", str(path)]), "['above']", "{'above': 2}",
                  "needs 3", "data.init_args.shots")
    _no_compute(tmp_path)


def test_model_relations_must_be_among_the_datas(tmp_path, capsys):
    path = _gqa_config(tmp_path, relations=("left of", "behind"))
    fails_clearly(capsys, lambda: train_main(["--config", str(path)]), "['behind']", "['above', 'left of']")
    _no_compute(tmp_path)


def test_gqa_prompts_alternate_relations_and_icl_beyond_the_images_is_not_run(tmp_path):
    from mfv.data.gqa import GQARelationDataModule

    _gqa_config(tmp_path, left=10, above=8)
    datamodule = GQARelationDataModule(str(tmp_path / "gqa"), ["left of", "above"], shots=2, tasks_per_relation=4)
    sampler = datamodule.sampler("eval")
    assert sampler.relations_of_prompts(4) == ["left of", "above", "left of", "above"]  # a --limit 2 covers both
    assert sampler.max_shots() == 3  # 4 train images of 'above' (per_relation split): the query's and 3 others
    sampler.episode(1, "clean", 3)
    with pytest.raises(Exception, match="needs 4 distinct images of relation 'above'"):
        sampler.episode(1, "clean", 4)


# ----- content-addressed inputs --------------------------------------------------------------

def _repaint(paths) -> None:
    """Replaces every image at its path with other pixels, keeping its size and times."""
    from PIL import Image

    for path in paths:
        stat = os.stat(path)
        with Image.open(path) as image:
            Image.new(image.mode, image.size, "black" if image.mode != "P" else 0).save(path, format=image.format)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_replacing_every_image_changes_the_cache_key(tmp_path):
    from mfv.api import _sampler_fingerprint
    from mfv.method.extraction import ExtractionSettings, cache_key

    adapter = load_backbone("openflamingo-random", **BACKBONE)
    settings = ExtractionSettings(relations=RELATIONS, shots=2)
    _, synthetic = _prepared(tmp_path / "synthetic")
    gqa_path = _gqa_config(tmp_path / "gqa")
    from mfv.data.gqa import GQARelationDataModule

    gqa = GQARelationDataModule(str(tmp_path / "gqa" / "gqa"), ["left of", "above"], shots=2)
    for data in (synthetic, gqa):
        before = data.fingerprint("eval")
        key = cache_key(adapter, settings, before)
        _repaint(data.sampler("eval").image_paths())
        data._samplers.clear()
        assert data.fingerprint("eval") != before
        assert cache_key(adapter, settings, data.fingerprint("eval")) != key
    episodes = synthetic.sampler("test")
    before = _sampler_fingerprint(episodes)
    _repaint(episodes.image_paths()[:1])
    assert _sampler_fingerprint(episodes) != before
    assert gqa_path.is_file()


# ----- nothing written where nobody asked ------------------------------------------------------

def test_train_organism_refuses_an_existing_out_above_all_the_bundled_one(tmp_path, capsys, monkeypatch):
    import shutil

    from mfv.organism.train import main as organism_main

    bundled = tmp_path / "checkpoints" / "organism"
    shutil.copytree(ROOT / "checkpoints" / "organism", bundled)
    before = {p: p.stat().st_mtime_ns for p in bundled.rglob("*")}
    monkeypatch.chdir(tmp_path)
    fails_clearly(capsys, lambda: organism_main(["--trainer.logger", "false"]),  # the README's command: default --out
                  "--out checkpoints/organism", "bundled model organism")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    fails_clearly(capsys, lambda: organism_main(["--trainer.logger", "false", "--out", str(other)]), str(other))
    assert {p: p.stat().st_mtime_ns for p in bundled.rglob("*")} == before
    assert (other / "notes.txt").read_text() == "keep" and not (tmp_path / "data").exists()


def test_mfv_save_refuses_to_overwrite_unless_told(tmp_path, fv_file):
    import mfv

    fvs = FunctionVectorSet.load(fv_file)
    original = fv_file.read_bytes()
    fvs.vectors["left"] = torch.zeros_like(fvs.vectors["left"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mfv.save(fvs, fv_file)
    assert fv_file.read_bytes() == original
    mfv.save(fvs, fv_file, overwrite=True)
    assert torch.equal(FunctionVectorSet.load(fv_file).vectors["left"], torch.zeros(32))


def test_training_without_a_logger_writes_only_under_a_run_folder(tmp_path, monkeypatch):
    settings = config(tmp_path)
    del settings["trainer"]["default_root_dir"]
    settings["trainer"]["logger"] = False
    path = tmp_path / "nolog.yaml"
    path.write_text(yaml.safe_dump(settings))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    metrics = train_main(["--config", str(path), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]
    run = cwd / "runs" / "train" / "version_0"
    assert {"metrics.json", "function_vectors_finetuned.safetensors", "config.yaml", "aie_heatmap.png",
            "checkpoints"} <= {p.name for p in run.iterdir()}
    assert Path(metrics["best_checkpoint"]).resolve().parent == run / "checkpoints"
    # provenance: the run's data fingerprints, in metrics.json and in the exported FV file
    assert set(metrics["data_fingerprints"]) == {"eval", "train", "val", "test"}
    exported = FunctionVectorSet.load(metrics["exported_fv"])
    assert exported.metadata["data_fingerprints"] == metrics["data_fingerprints"]
    assert exported.metadata["data_fingerprint"] == metrics["data_fingerprints"]["eval"]


# ----- no silent numbers --------------------------------------------------------------------------

def test_a_diverged_fit_exports_no_nan(tmp_path, capsys):
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: train_main(["--config", str(path), "--model.lr", "1e30", "--model.init", "random",
                                              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                                              "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]),
                  "NaN or inf", "model.lr (now 1e+30)")
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("metrics.json"))


def test_one_prompt_per_relation_gives_an_honest_interval():
    import numpy as np

    from mfv.evaluation.scoring import Score, paired_comparison, wilson_interval

    one_each = Score(RELATIONS, np.ones(4), np.arange(4), np.ones(4))
    low, high = one_each.ci95()
    assert one_each.accuracy == 1.0 and high == 1.0
    assert low == pytest.approx(wilson_interval(1, 1)[0]) and low < 0.25  # not [1.000, 1.000]
    assert "Wilson" in one_each.as_dict()["ci_method"]
    wrong = Score(RELATIONS, np.zeros(4), np.arange(4), np.zeros(4))
    difference = paired_comparison(one_each, wrong)
    assert difference["ci95"][0] < 0.25 and "Wilson" in difference["method"]
    many = Score(RELATIONS, np.ones(80), np.arange(80) % 4, np.ones(80))  # 20 per relation: the bootstrap
    assert many.ci95() == (1.0, 1.0) and many.as_dict()["ci_method"] == "stratified bootstrap"


def test_evaluation_records_data_fingerprints_lists_what_did_not_run_and_flags_other_data(tmp_path, capsys, fv_file):
    _rewrite(fv_file, metadata=json.dumps({"data_fingerprints": {"eval": "0123456789abcdef"}}))
    path = write_config(tmp_path)
    metrics = evaluate_main(["--config", str(path), "--fv", str(fv_file), "--out", str(tmp_path / "o"), "--limit", "4",
                             "--evaluation.shots", "[1, 500]", "--evaluation.analogies", "false",
                             "--evaluation.max_k", "2", "--evaluation.sweep_limit", "4"])
    err = capsys.readouterr().err
    assert "not run: icl_500" in err and "icl_500" in metrics["not_run"] and "icl_1" in metrics["conditions"]
    assert "0123456789abcdef" in err and metrics["settings"]["fv_data_mismatch"]["eval"][0] == "0123456789abcdef"
    fingerprints = metrics["settings"]["data_fingerprints"]
    assert {"eval", "test", "val"} <= set(fingerprints)
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["settings"]["data_fingerprints"] == fingerprints


def test_your_own_episodes_are_checked_before_extraction(tmp_path):
    """The API's extraction over your own scenes gets the same checks (mfv.preflight.check_extraction)."""
    from mfv.data.episodes import EpisodeSampler, read_scenes
    from mfv.errors import ConfigError, DataError
    from mfv.method.extraction import AIESettings
    from mfv.preflight import check_extraction

    _, datamodule = _prepared(tmp_path)
    scenes = read_scenes(datamodule.split_dir("eval"))
    sampler = EpisodeSampler(scenes, RELATIONS, shots=2)
    adapter = load_backbone("openflamingo-random", **BACKBONE)
    aie = dict(num_mean_prompts=8, k=3, cache_dir=str(tmp_path / "cache"))
    assert check_extraction(adapter, sampler, AIESettings(num_aie_prompts=4, **aie)) == {}
    with pytest.raises(ConfigError, match=r"aie.num_aie_prompts = 3: .* \['right'\]"):
        check_extraction(adapter, sampler, AIESettings(num_aie_prompts=3, **aie))
    Path(scenes[5].image_path).write_bytes(b"junk")
    with pytest.raises(DataError, match=f"{scenes[5].image_path}: does not decode"):
        check_extraction(adapter, sampler, AIESettings(num_aie_prompts=4, **aie))
    assert not (tmp_path / "cache").exists()


# ----- issue 33: nothing from a file runs code --------------------------------------------------

def _one_error_line(err: str) -> None:
    """stderr holds exactly one ``error: ...`` line (progress bars of data preparation aside)."""
    lines = err.replace("\r", "\n").splitlines()
    assert len([line for line in lines if line.startswith("error: ")]) == 1, err[-2000:]
    assert not [line for line in lines if line.startswith(("Traceback", "  File "))]


PACKAGE_SOURCES = [ROOT / "mfv", ROOT / "train.py", ROOT / "evaluate.py", ROOT / "benchmarks"]


def _unsafe_loads(path: Path) -> list[str]:
    """Calls in ``path`` that could unpickle arbitrary objects: ``torch.load`` without
    ``weights_only=True``, ``pickle.load(s)``, ``numpy.load(allow_pickle=True)``, and
    ``pickle.Unpickler`` subclasses without their own ``find_class``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            if owner == "torch" and node.func.attr == "load" and not safe:
                found.append(f"{where} torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
                found.append(f"{where} {owner}.{node.func.attr}")
            pickled = keywords.get("allow_pickle")
            if owner in ("np", "numpy") and isinstance(pickled, ast.Constant) and pickled.value:
                found.append(f"{where} numpy.load(allow_pickle=True)")
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Unpickler") for b in node.bases):
            if not any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body):
                found.append(f"{where} an Unpickler that allows every class")
    return found


def test_the_package_never_unpickles_arbitrary_objects():
    files = [p for root in PACKAGE_SOURCES for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]
    assert len(files) > 50
    text = "\n".join(p.read_text() for p in files)
    assert "weights_only=False" not in text
    assert [hit for path in files for hit in _unsafe_loads(path)] == []


class _Hostile:
    """Unpickled, it would create the marker file (stands in for any shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-shaped pickle whose loading would run a command, and the command's marker."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "hyper_parameters": _Hostile(marker)}, path)
    return path, marker


def test_a_hostile_ckpt_path_is_refused_in_one_line_and_never_runs(tmp_path, capsys, hostile):
    ckpt, marker = hostile
    path = write_config(tmp_path / "run")
    err = fails_clearly(capsys, lambda: train_main(["--config", str(path), "--ckpt_path", str(ckpt)]),
                        f"--ckpt_path {ckpt}", "posix.system", "refused, not loaded")
    _one_error_line(err)
    assert not marker.exists()
    _no_compute(tmp_path / "run")


def test_every_other_checkpoint_reader_refuses_a_hostile_pickle(tmp_path, capsys, hostile, fv_file):
    from mfv.io import UnsafeFileError, load_checkpoint
    from mfv.training.callbacks import AtomicCheckpointIO

    ckpt, marker = hostile
    with pytest.raises(UnsafeFileError, match="posix.system"):
        load_checkpoint(ckpt)
    # Lightning's own restore path (trainer.fit(ckpt_path=...)) reads through this plugin
    with pytest.raises(UnsafeFileError, match=str(ckpt)):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=False)
    path = write_config(tmp_path / "run")  # an FV file is safetensors: a pickle is unreadable, not run
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--fv", str(ckpt), "--out",
                                                 str(tmp_path / "o")]), str(ckpt))
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_a_hostile_checkpoint_in_the_organism_work_folder_is_refused(tmp_path, capsys, hostile, monkeypatch):
    import shutil

    from mfv.organism.train import main as organism_main

    ckpt, marker = hostile
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, work / "checkpoints" / "last.ckpt")  # what the next run resumes from
    monkeypatch.chdir(tmp_path)
    err = fails_clearly(capsys, lambda: organism_main([
        "--data.work_dir", str(work), "--data.pool_size", "40", "--data.novel_pool_size", "20",
        "--data.steps_per_epoch", "1", "--data.batch_size", "4", "--data.eval_count", "4",
        "--data.heldout_size", "20", "--model.num_layers", "1", "--model.num_heads", "2", "--model.hidden_size", "16",
        "--model.intermediate_size", "32", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--out", str(tmp_path / "out")]), str(work / "checkpoints" / "last.ckpt"), "posix.system", "refused")
    _one_error_line(err)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ----- issue 33: run folders are owned ------------------------------------------------------------

EVAL_QUICK = ["--evaluation.analogies", "false", "--evaluation.max_k", "2", "--evaluation.sweep_limit", "2",
              "--evaluation.shots", "[1]"]


def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A second process holding ``folder``'s run lock (as a running train.py or evaluate.py does)."""
    code = ("import sys, time; from mfv.runs import hold; lock = hold(sys.argv[1], '--out', 'evaluate.py'); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_holder_frees_it(tmp_path, capsys):
    from mfv.runs import hold

    path = write_config(tmp_path / "run")
    out = tmp_path / "eval"
    holder = _hold_in_another_process(out)
    try:
        err = fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(out)]),
                            f"--out {out} is in use by another run", "evaluate.py, pid", "wait until it ends")
        _one_error_line(err)
        assert not (tmp_path / "run" / "cache").exists()  # refused before the AIE
        fails_clearly(capsys, lambda: train_main(["--config", str(path), "--trainer.logger.init_args.save_dir",
                                                  str(tmp_path), "--trainer.logger.init_args.name", "",
                                                  "--trainer.logger.init_args.version", "eval"]),
                      f"run folder {out} is in use by another run")
    finally:
        holder.kill()  # SIGKILL: no clean-up ran, the OS released the lock
        holder.wait()
    with hold(out, "--out", "evaluate.py"):  # stale-proof: the dead holder's lock is gone
        assert (out / ".mfv.lock").read_text().startswith("evaluate.py, pid")
    assert not (out / ".mfv.lock").exists()


def _claim(parent: str, results) -> None:
    from mfv.runs import claim_version

    results.put(claim_version(parent))


def test_version_folders_are_claimed_atomically(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path / "same"), results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(results.get(timeout=5) for _ in workers) == list(range(6))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """One finished tiny training run: (config, run folder)."""
    root = tmp_path_factory.mktemp("trained")
    path = write_config(root)
    metrics = train_main(["--config", str(path), "--trainer.max_epochs", "1"])
    return path, Path(metrics["exported_fv"]).parent


def test_two_trains_with_one_logger_name_get_two_versions(trained, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    path, first = trained
    # Both runs started together: each saw version_0 free (Lightning's own listing), the claim decides.
    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", lambda self: 0)
    metrics = train_main(["--config", str(path), "--trainer.max_epochs", "1", "--model.lr", "0.03"])
    second = Path(metrics["exported_fv"]).parent
    assert first.name == "version_0" and second.name == "version_1"
    for folder, lr in ((first, 0.01), (second, 0.03)):
        assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["lr"] == lr
        assert yaml.safe_load((folder / "hparams.yaml").read_text())["lr"] == lr
        assert len(list((folder / "checkpoints").glob("best-*.ckpt"))) == 1


def test_evaluate_never_writes_into_a_training_run_folder(trained, capsys):
    path, run = trained
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    err = fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(run)]),
                        f"--out {run} is a train.py run folder", f"{run}-evaluate")
    _one_error_line(err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ----- issue 33: resume checks what it resumes ------------------------------------------------------

def test_resume_with_other_settings_or_data_is_refused_in_one_line(trained, tmp_path, capsys):
    import shutil

    path, run = trained
    last = run / "checkpoints" / "last.ckpt"
    err = fails_clearly(capsys, lambda: train_main(["--config", str(path), "--ckpt_path", str(last),
                                                    "--model.lr", "0.02"]),
                        f"--ckpt_path {last}", "model.lr: 0.01 -> 0.02", "--allow_changed_data true")
    _one_error_line(err)
    data = yaml.safe_load(path.read_text())["data"]["init_args"]["data_dir"]
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    _repaint(sorted(next(changed.glob("train-*")).rglob("*.png"))[:1])
    fails_clearly(capsys, lambda: train_main(["--config", str(path), "--ckpt_path", str(last),
                                              "--data.init_args.data_dir", str(changed)]),
                  "the data differ", "train: ")
    from mfv.commands.train import FunctionVectorCLI, build_cli
    from mfv.preflight import plan_training

    same = build_cli(FunctionVectorCLI, ["--config", str(path), "--ckpt_path", str(last)])
    assert plan_training(same).resume_changes == {}  # the same run resumes without a word


def test_resume_on_changed_data_when_allowed_is_recorded(trained, tmp_path):
    import shutil

    path, run = trained
    data = yaml.safe_load(path.read_text())["data"]["init_args"]["data_dir"]
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    _repaint(sorted(next(changed.glob("train-*")).rglob("*.png"))[:1])
    metrics = train_main(["--config", str(path), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                          "--data.init_args.data_dir", str(changed), "--allow_changed_data", "true",
                          "--trainer.max_epochs", "2"])
    assert list(metrics["resumed_with_changes"]) == ["data_fingerprints"]
    assert any(line.startswith("train: ") for line in metrics["resumed_with_changes"]["data_fingerprints"])
    assert json.loads((run / "metrics.json").read_text())["resumed_with_changes"] == metrics["resumed_with_changes"]
    assert Path(metrics["exported_fv"]).parent == run  # continued in its own folder


# ----- issue 33: one --out, one evaluation; a full disk loses nothing ----------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, Path, set[str]]:
    """A finished quick evaluation: (config, --out, the splits the protocol read while it ran)."""
    from mfv.data.datamodule import SyntheticRelationDataModule

    root = tmp_path_factory.mktemp("evaluated")
    path = write_config(root)
    read: set[str] = set()
    sampler = SyntheticRelationDataModule.sampler

    def spy(self, split):
        read.add(split)
        return sampler(self, split)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SyntheticRelationDataModule, "sampler", spy)
        evaluate_main(["--config", str(path), "--out", str(root / "out"), "--limit", "4", *EVAL_QUICK])
    return path, root / "out", read


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_protocol_states_every_split_it_reads(evaluated):
    from mfv.commands.evaluate import EvaluateCLI
    from mfv.commands.train import build_cli
    from mfv.evaluation.requirements import requirements
    from mfv.evaluation.settings import EvaluationSettings

    path, _, read = evaluated
    cli = build_cli(EvaluateCLI, ["--config", str(path), "--limit", "4", *EVAL_QUICK])
    settings = EvaluationSettings(limit=4, **cli.config.evaluation)
    assert read and read <= set(requirements(settings, cli.datamodule, cli.aie_settings))


def test_the_preflight_asks_the_protocol_what_it_reads(tmp_path, capsys, monkeypatch):
    import mfv.evaluation.requirements as room
    from mfv.requirements import SplitUse

    stated = room.requirements

    def more_shots(settings, datamodule, aie):  # a new condition that needs 11-shot prompts of the novel split
        return {**stated(settings, datamodule, aie), "novel": SplitUse("a new condition", shots=11,
                                                                       shots_field="evaluation.new")}

    monkeypatch.setattr(room, "requirements", more_shots)
    path = write_config(tmp_path)
    fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(tmp_path / "o")]),
                  "evaluation.new = 11", "novel split (a new condition)")
    _no_compute(tmp_path)


def test_an_evaluation_with_other_settings_never_mixes_into_an_out(evaluated, capsys):
    path, out, _ = evaluated
    before = _files(out)
    err = fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(out), "--limit", "8",
                                                       *EVAL_QUICK]),
                        f"--out {out} holds the results of an mfv evaluate with other settings", "limit: 4 -> 8",
                        "--overwrite true")
    _one_error_line(err)
    assert _files(out) == before


def test_a_full_disk_while_writing_the_report_is_one_line_and_loses_nothing(evaluated, capsys, monkeypatch):
    import errno

    from mfv.evaluation import plots

    path, out, _ = evaluated
    before = _files(out)
    real, calls = plots.write, []

    def fills_up(figure, stem, *args, **kwargs):  # the third figure's files meet a full disk
        calls.append(stem)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(stem).with_suffix(".png")))
        return real(figure, stem, *args, **kwargs)

    monkeypatch.setattr(plots, "write", fills_up)
    err = fails_clearly(capsys, lambda: evaluate_main(["--config", str(path), "--out", str(out), "--limit", "4",
                                                       *EVAL_QUICK]),
                        f"the disk holding {out} is full", "choose another --out", "nothing partial")
    _one_error_line(err)
    assert len(calls) == 3
    assert _files(out) == before  # the previous report whole: no new figure, no temporary file, same TensorBoard
    report = (out / "report.md").read_text()
    listed = report.rsplit("Figures (PNG and PDF): ", 1)[1].strip(" .\n").split(", ")
    assert all((out / f"{stem}.png").is_file() and (out / f"{stem}.pdf").is_file() for stem in listed)


def test_an_overwrite_replaces_the_whole_evaluation(evaluated):
    path, out, _ = evaluated
    (out / "layer_sweep.png").rename(out / "stale_sweep.png")  # as if an earlier evaluation had drawn it
    record = json.loads((out / ".mfv-run.json").read_text())
    record["files"].append("stale_sweep.png")
    (out / ".mfv-run.json").write_text(json.dumps(record))
    metrics = evaluate_main(["--config", str(path), "--out", str(out), "--limit", "8", "--overwrite", "true",
                             *EVAL_QUICK])
    assert json.loads((out / "metrics.json").read_text())["settings"]["limit"] == metrics["settings"]["limit"] == 8
    assert not (out / "stale_sweep.png").exists() and (out / "layer_sweep.png").is_file()
    assert len(list((out / "tensorboard").iterdir())) == 1  # one run's events, not two mixed
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from mfv.training.callbacks import AtomicCheckpointIO

    def disk_full(self, checkpoint, path, storage_options=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", disk_full)
    path = write_config(tmp_path)
    err = fails_clearly(capsys, lambda: train_main(["--config", str(path), "--trainer.max_epochs", "1"]),
                        "the disk holding", "is full", "free")
    _one_error_line(err)
    run = tmp_path / "runs" / "drill" / "version_0"
    assert not (run / "metrics.json").exists() and not list(run.rglob("*.ckpt"))
    assert not (run / ".mfv.lock").exists()  # released on the way out


def test_a_full_disk_in_any_mfv_command_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from mfv import cli

    def fills_up(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "gqa" / "scenes.json"))

    monkeypatch.setattr(cli, "_commands", lambda: {"prepare-gqa": fills_up})
    monkeypatch.chdir(tmp_path)
    err = fails_clearly(capsys, lambda: cli.main(["prepare-gqa", "--out", "gqa"]), f"the disk holding {tmp_path}",
                        "is full", "free")
    _one_error_line(err)
