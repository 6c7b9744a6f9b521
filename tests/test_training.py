"""FV fine-tuning through train.py: only FVs train, tiny checkpoints, resume, DDP, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch

from mfv.commands.train import main
from mfv.training.module import FunctionVectorModule

BACKBONE = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "intermediate_size": 64}


def _args(tmp_path: Path, *extra: str, epochs: int = 1, devices: int = 1, strategy: str = "auto", init: str = "random",
          batch_size: int = 4) -> list[str]:
    return [
        "--model.backbone", "openflamingo-random",
        "--model.backbone_options", json.dumps(BACKBONE),
        "--model.layer", "1",
        "--model.init", init,
        "--data", "mfv.data.datamodule.SyntheticRelationDataModule",
        "--data.data_dir", str(tmp_path / "data"),
        "--data.image_size", "32",
        "--data.shots", "2",
        "--data.num_images", json.dumps({"eval": 16, "train": 20, "test": 8, "novel": 8, "composite": 8}),
        "--data.batch_size", str(batch_size),
        "--data.shuffle_train", "false",
        "--aie.num_mean_prompts", "8",
        "--aie.num_aie_prompts", "4",
        "--aie.k", "3",
        "--aie.batch_size", "4",
        "--aie.cache_dir", str(tmp_path / "cache"),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices),
        "--trainer.strategy", strategy,
        "--trainer.max_epochs", str(epochs),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        *extra,
    ]


def _backbone_state(adapter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


@dataclass
class Run:
    """A finished ``train.py`` run that several tests read (each run is paid once per module).

    Attributes:
        root: The run's ``default_root_dir`` (its data, cache and checkpoints are under it).
        metrics: What ``main`` returned.
        seen: What the run's instrumentation recorded (neutral: it only reads).
    """

    root: Path
    metrics: dict
    seen: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def extracted_run(tmp_path_factory) -> Run:
    """One epoch from extracted FVs, with the model's trainable parameters, backbone and FVs
    recorded as fit starts."""
    root, seen = tmp_path_factory.mktemp("extracted"), {}
    real_fit = L.Trainer.fit

    def fit(trainer, model, *args, **kwargs):
        seen["before"] = _backbone_state(model.adapter)
        seen["fv_before"] = model.function_vectors.detach().clone()
        seen["model"] = model
        seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        return real_fit(trainer, model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lightning.Trainer.fit", fit)
        metrics = main(_args(root, init="extracted"))
    return Run(root, metrics, seen)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Run:
    """One epoch from random FVs with every default of ``_args``."""
    root = tmp_path_factory.mktemp("default")
    return Run(root, main(_args(root)))


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Run:
    """Two epochs from random FVs, with a digest of every image the vision encoder meets from
    the module's ``on_fit_start`` on (where the run's image store is filled)."""
    import hashlib

    root, encoded = tmp_path_factory.mktemp("two_epochs"), []
    real_start = FunctionVectorModule.on_fit_start

    def counting_start(module):
        real_start(module)
        module.adapter.model.vision_encoder.register_forward_hook(lambda m, args, out: encoded.extend(
            hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in args[0]))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FunctionVectorModule, "on_fit_start", counting_start)
        metrics = main(_args(root, epochs=2))
    return Run(root, metrics, {"encoded": encoded})


def test_only_function_vectors_train(extracted_run):
    captured, metrics = extracted_run.seen, extracted_run.metrics
    model = captured["model"]
    assert captured["trainable"] == ["function_vectors"]
    after = _backbone_state(model.adapter)
    assert all(torch.equal(captured["before"][k], after[k]) for k in after)
    assert not torch.equal(captured["fv_before"], model.function_vectors.detach())
    # The AIE callback ran and the run wrote its metrics.
    assert metrics["aie"]["heads"]["above"] and "test/acc" in metrics["test"]
    run_dir = Path(metrics["best_checkpoint"]).parents[1]
    assert (run_dir / "metrics.json").is_file() and (run_dir / "aie_heatmap.png").is_file()
    assert Path(metrics["exported_fv"]).is_file()


def test_checkpoint_holds_only_the_fvs(default_run):
    checkpoint_path = Path(default_run.metrics["best_checkpoint"])
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert list(checkpoint["state_dict"]) == ["function_vectors"]
    assert checkpoint["mfv"]["relations"] == ["above", "below", "left", "right"]
    assert checkpoint_path.stat().st_size < 64 * 1024


def _last_fvs(tmp_path: Path) -> torch.Tensor:
    last = sorted(tmp_path.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    return torch.load(last, weights_only=False)["state_dict"]["function_vectors"]


class _StopAfterFirstEpoch(L.Callback):
    """Stands for an interruption: the run ends after epoch 0 with its checkpoints saved."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resume_continues_the_same_run(tmp_path, monkeypatch, two_epoch_run):
    straight = _last_fvs(two_epoch_run.root)
    real_fit = L.Trainer.fit

    def interrupted_fit(trainer, *args, **kwargs):
        trainer.callbacks.append(_StopAfterFirstEpoch())
        return real_fit(trainer, *args, **kwargs)

    monkeypatch.setattr("lightning.Trainer.fit", interrupted_fit)
    main(_args(tmp_path / "resumed", epochs=2))
    monkeypatch.setattr("lightning.Trainer.fit", real_fit)
    last = next((tmp_path / "resumed").rglob("last.ckpt"))
    assert torch.load(last, weights_only=False)["epoch"] == 0
    main(_args(tmp_path / "resumed", "--ckpt_path", str(last), epochs=2))
    torch.testing.assert_close(_last_fvs(tmp_path / "resumed"), straight, atol=1e-7, rtol=0)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, extracted_run):
    # init=extracted: the AIE callback also runs sharded over the two ranks. The one-process
    # side (one epoch, batch 4, extracted) is extracted_run.
    # Launched as users do (`python train.py`): spawned workers re-import train.py first.
    root = Path(__file__).resolve().parents[1]
    args = _args(tmp_path / "ddp", epochs=1, devices=2, strategy="ddp_spawn", batch_size=2, init="extracted")
    done = subprocess.run([sys.executable, str(root / "train.py"), *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = _last_fvs(extracted_run.root), _last_fvs(tmp_path / "ddp")
    assert single.abs().sum() > 0
    torch.testing.assert_close(ddp, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.backbone", "gpt-5"], "valid backbones"),
        (["--model.relations", "[above, behind]"], "unknown relation"),
        (["--model.layer", "9"], "valid layers: 0..2"),
        (["--model.backbone", "openflamingo-tiny", "--model.backbone_options", '{"directory": "/no/such/model"}'],
         "/no/such/model"),
    ],
)
def test_config_errors_are_clear(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as info:
        main(_args(tmp_path) + override)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_exports_go_to_the_run_and_never_silently_replace_a_file(tmp_path, capsys, default_run):
    first = main(_args(tmp_path / "a", "--model.export_dir", str(tmp_path / "export")))
    second = default_run.metrics
    assert Path(first["exported_fv"]).parent != Path(second["exported_fv"]).parent
    exported = tmp_path / "export" / "openflamingo-tiny-finetuned.safetensors"
    assert exported.is_file() and oct(exported.stat().st_mode & 0o077) != "0o0"  # readable by the group as umask allows
    with pytest.raises(SystemExit) as info:
        main(_args(tmp_path / "c", "--model.export_dir", str(tmp_path / "export")))
    assert info.value.code == 2 and "exists" in capsys.readouterr().err


def test_bf16_backbone_keeps_fp32_fvs():
    module = FunctionVectorModule("openflamingo-random", BACKBONE, layer=1, init="zeros", backbone_dtype="bfloat16")
    assert module.function_vectors.dtype == torch.float32
    assert next(module.backbone.parameters()).dtype == torch.bfloat16


def test_bf16_backbone_trains_end_to_end(tmp_path):
    """AIE, fitting through the image store, test and export on a bf16 backbone (GPU users' default)."""
    from mfv.method.function_vector import FunctionVectorSet

    metrics = main(_args(tmp_path, "--model.backbone_dtype", "bfloat16", init="extracted"))
    assert "test/acc" in metrics["test"]
    exported = FunctionVectorSet.load(metrics["exported_fv"])
    assert next(iter(exported.vectors.values())).dtype == torch.float32


def test_train_test_accuracy_equals_evaluate_on_the_same_prompts_and_fvs(tmp_path):
    """One accuracy definition (mean over relations) and one scoring path for both commands."""
    from mfv.commands.evaluate import main as evaluate_main
    from tests.test_drills import write_config

    path = write_config(tmp_path)
    trained = main(["--config", str(path), "--trainer.max_epochs", "1"])
    evaluated = evaluate_main(["--config", str(path), "--fv", trained["exported_fv"], "--out", str(tmp_path / "eval"),
                               "--evaluation.analogies", "false", "--evaluation.max_k", "1",
                               "--evaluation.sweep_limit", "2"])
    condition = evaluated["conditions"]["zero_shot_finetuned_fv"]
    assert condition["n"] == 12  # every test prompt
    assert condition["accuracy"] == pytest.approx(trained["test"]["test/acc"], abs=1e-7)
    for relation, entry in condition["per_relation"].items():
        assert entry["accuracy"] == pytest.approx(trained["test"][f"test/acc_{relation}"], abs=1e-7)


def _saved_graph_bytes(module, batch) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward, excluding tensors that need no gradient path of their
    own (the frozen weights and the prompt's cached keys/values, which exist anyway)."""
    seen, total = set(), [0]

    def pack(tensor):
        if tensor.requires_grad or tensor.grad_fn is not None:
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total[0] += key[1]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = module(batch)
    return total[0], logits


def test_fine_tuning_graph_scales_with_layers_after_injection_not_prompt_length():
    from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
    from mfv.data.synthetic import generate_split
    from mfv.hooks import add_to_residual
    import tempfile

    module = FunctionVectorModule("openflamingo-random", {**BACKBONE, "num_layers": 4}, layer=1, init="random")
    with tempfile.TemporaryDirectory() as tmp:
        sampler = EpisodeSampler(read_scenes(generate_split(tmp, "eval", 12, image_size=32, workers=1,
                                                            progress=False)), ["above", "below", "left", "right"])
        short = encode_episodes(module.adapter, [sampler.episode(i, "zero_shot", 0) for i in range(4)], module.relations)
        long = encode_episodes(module.adapter, [sampler.episode(i, "clean", 4) for i in range(4)], module.relations)
    class FullGraph(torch.nn.Module):  # the hook path: every position after the injection layer in the graph
        def forward(self, batch):
            with add_to_residual(module.adapter, module.layer, module.function_vectors[batch.relation_ids]):
                return module.adapter.forward(batch.prompts)

    sizes, full = {}, {}
    for name, batch in (("short", short), ("long", long)):
        sizes[name], logits = _saved_graph_bytes(module, batch)
        full[name], reference = _saved_graph_bytes(FullGraph(), batch)
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)  # same logits as the hook path
    extra_token_rows = (long.prompts.input_ids.shape[1] - short.prompts.input_ids.shape[1]) * len(short)
    layers_after = module.adapter.num_layers - module.layer - 1
    # Per extra prompt token: only the last position's attention weights over it (a few
    # scalars per head per layer), never a hidden-size activation.
    assert (sizes["long"] - sizes["short"]) / extra_token_rows <= 2 * 4 * module.adapter.num_heads * layers_after
    assert (full["long"] - full["short"]) / extra_token_rows >= 4 * module.adapter.hidden_size * layers_after
    module.layer = 2  # fewer layers after injection: a smaller graph
    assert _saved_graph_bytes(module, short)[0] < sizes["short"]


def test_fitting_encodes_each_image_once_and_changes_no_fv(tmp_path, monkeypatch, two_epoch_run):
    """Every epoch meets the same images: with the run's image store each is encoded once
    (and attended without masked products), and the trained FVs equal those of a fit that
    recomputes everything."""
    encoded = two_epoch_run.seen["encoded"]
    stored = _last_fvs(two_epoch_run.root)
    assert encoded and len(encoded) == len(set(encoded))  # no image encoded twice in two epochs

    monkeypatch.setattr(FunctionVectorModule, "on_fit_start", lambda module: None)  # no store: as before
    main(_args(tmp_path / "recomputed", epochs=2))
    torch.testing.assert_close(_last_fvs(tmp_path / "recomputed"), stored, atol=1e-6, rtol=0)


def test_training_without_a_logger_runs_and_writes_its_metrics(tmp_path):
    metrics = main(_args(tmp_path, "--trainer.logger", "false"))
    assert "test/acc" in metrics["test"] and Path(metrics["exported_fv"]).is_file()
    assert list(tmp_path.rglob("metrics.json")) and not (tmp_path / "runs").exists()
