"""The ``aie:`` section: parsed once into one :class:`AIESettings`, one set of defaults, bad
values one clear error before any compute, and the AIE callback handed the parsed object."""

from __future__ import annotations

import inspect
import pickle
from dataclasses import fields, replace
from pathlib import Path

import pytest
import yaml

from mfv.commands.evaluate import main as evaluate_main
from mfv.commands.train import FunctionVectorCLI, build_cli
from mfv.commands.train import main as train_main
from mfv.errors import ConfigError
from mfv.method.extraction import (
    DEFAULT_K,
    DEFAULT_SELECTION,
    AIESettings,
    ExtractionSettings,
    extract_from_datamodule,
)
from mfv.training.callbacks import AIEHeadSelection

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"
RELATIONS = ["above", "below", "left", "right"]


def _toy_args(tmp_path: Path, *extra: str, config: Path = TOY) -> list[str]:
    """``configs/toy.yaml`` with every folder it writes to under ``tmp_path``."""
    return ["--config", str(config), "--data.init_args.data_dir", str(tmp_path / "data"),
            "--aie.cache_dir", str(tmp_path / "cache"), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            *extra]


def test_the_config_aie_section_parses_into_one_settings_object(tmp_path):
    cli = build_cli(FunctionVectorCLI, _toy_args(tmp_path))
    settings = cli.config_init["aie"]
    assert isinstance(settings, AIESettings) and cli.aie_settings is settings
    section = {**yaml.safe_load(TOY.read_text())["aie"], "cache_dir": str(tmp_path / "cache")}
    assert {name: getattr(settings, name) for name in section} == section
    # The config keys are the settings' fields, nothing more.
    assert set(cli.config["aie"].keys()) == {f.name for f in fields(AIESettings)}


def test_an_override_changes_only_its_field(tmp_path):
    base = build_cli(FunctionVectorCLI, _toy_args(tmp_path)).aie_settings
    assert build_cli(FunctionVectorCLI, _toy_args(tmp_path, "--aie.k", "6")).aie_settings == replace(base, k=6)


def test_print_config_keeps_the_aie_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        build_cli(FunctionVectorCLI, _toy_args(tmp_path, "--aie.k", "6", "--print_config"))
    assert not info.value.code
    printed = yaml.safe_load(capsys.readouterr().out)["aie"]
    assert printed == {**yaml.safe_load(TOY.read_text())["aie"], "k": 6, "cache_dir": str(tmp_path / "cache"),
                       "algorithm": "fast", "aie_filter": "clean_correct"}


def test_one_set_of_defaults():
    settings, key = AIESettings(), ExtractionSettings()
    paper = (200, 100, DEFAULT_K, DEFAULT_SELECTION, "runs/aie_cache")
    assert (settings.num_mean_prompts, settings.num_aie_prompts, settings.k, settings.selection,
            settings.cache_dir) == paper
    shared = {f.name for f in fields(AIESettings)} & {f.name for f in fields(ExtractionSettings)}
    assert shared == {"num_mean_prompts", "num_aie_prompts", "algorithm", "aie_filter", "batch_size"}
    assert {n: getattr(settings, n) for n in shared} == {n: getattr(key, n) for n in shared}
    # The callback owns no option, hence no default of its own.
    assert list(inspect.signature(AIEHeadSelection).parameters) == ["settings"]


def test_the_cli_defaults_are_the_settings_defaults(tmp_path):
    config = yaml.safe_load(TOY.read_text())
    del config["aie"]
    path = tmp_path / "no_aie.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(FunctionVectorCLI, ["--config", str(path), "--data.init_args.data_dir", str(tmp_path / "data"),
                                        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert cli.aie_settings == AIESettings()


def test_the_python_api_defaults_are_the_settings_defaults():
    import mfv.api

    parameters = inspect.signature(mfv.api.extract).parameters
    defaults = AIESettings()
    for name in ("k", "selection", "num_mean_prompts", "num_aie_prompts", "aie_filter", "cache_dir"):
        assert parameters[name].default == getattr(defaults, name), name


def test_extraction_settings_take_the_section_and_the_run(tmp_path):
    settings = AIESettings(num_mean_prompts=8, num_aie_prompts=4, algorithm="reference", aie_filter="all",
                           batch_size=2, cache_dir=str(tmp_path))
    assert settings.extraction_settings(("above", "left"), shots=3, seed=7) == ExtractionSettings(
        relations=["above", "left"], shots=3, num_mean_prompts=8, num_aie_prompts=4, algorithm="reference",
        aie_filter="all", batch_size=2, seed=7)


@pytest.mark.parametrize("change, needle", [
    ({"k": 0}, "aie.k = 0"),
    ({"selection": "best"}, "aie.selection"),
    ({"num_mean_prompts": 0}, "aie.num_mean_prompts = 0"),
    ({"num_aie_prompts": -1}, "aie.num_aie_prompts = -1"),
    ({"batch_size": 0}, "aie.batch_size = 0"),
    ({"algorithm": "exact"}, "aie.algorithm"),
    ({"aie_filter": "some"}, "aie.aie_filter"),
])
def test_validate_names_the_field(change, needle):
    with pytest.raises(ConfigError, match=needle):
        AIESettings(**change).validate()


def test_k_is_checked_against_the_backbone(tiny_adapter):
    heads = tiny_adapter.num_layers * tiny_adapter.num_heads
    AIESettings(k=heads).validate()  # no backbone: any K >= 1
    AIESettings(k=heads).validate(tiny_adapter)
    with pytest.raises(ConfigError, match=f"aie.k = {heads + 1} is out of range"):
        AIESettings(k=heads + 1).validate(tiny_adapter)


class _Untouched:
    """A datamodule that records every call: a bad setting must stop before any of them."""

    shots, seed = 2, 0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append(name)


def test_extract_from_datamodule_checks_before_touching_the_data(tiny_adapter, tmp_path):
    datamodule = _Untouched()
    with pytest.raises(ConfigError, match="aie.k = 99"):
        extract_from_datamodule(tiny_adapter, RELATIONS, datamodule, AIESettings(k=99, cache_dir=str(tmp_path)))
    assert datamodule.calls == [] and not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_k_zero_is_one_clear_error_before_any_compute(tmp_path, capsys, command):
    if command == "train":
        run = lambda: train_main(_toy_args(tmp_path, "--aie.k", "0"))  # noqa: E731
    else:
        run = lambda: evaluate_main(_toy_args(tmp_path, "--aie.k", "0", "--out", str(tmp_path / "eval")))  # noqa: E731
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "aie.k = 0" in err and "Traceback" not in err
    assert err.count("error:") == 1
    assert not any((tmp_path / name).exists() for name in ("cache", "data", "runs", "eval"))


def test_the_callback_receives_the_parsed_settings(tmp_path):
    cli = build_cli(FunctionVectorCLI, _toy_args(tmp_path, "--aie.k", "6"))
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, AIEHeadSelection)]
    assert callbacks == [cli.aie_callback]
    assert cli.aie_callback.settings is cli.config_init["aie"] and cli.aie_callback.settings.k == 6
    # ddp_spawn pickles the trainer's callbacks into each worker.
    assert pickle.loads(pickle.dumps(cli.aie_callback)).settings == cli.aie_settings
