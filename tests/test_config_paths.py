"""Paths written in a config file: inputs resolve against the file's folder, outputs stay where the command runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mfv.resources import config_inputs, resolve_configs
from tests.test_own_data import make_folder


def _write(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_configs_input_paths_resolve_against_its_folder_and_outputs_do_not(tmp_path):
    configs = tmp_path / "project" / "configs"
    (configs / "weights").mkdir(parents=True)
    config = _write(configs / "run.yaml", {
        "model": {"fv_path": "../vectors.safetensors", "export_dir": "exports",
                  "backbone_options": {"directory": "weights", "model_path": "Qwen/Qwen3-VL-4B-Instruct",
                                       "cache_dir": "/abs/cache"}},
        "data": {"class_path": "mfv.data.own.OwnRelationDataModule",
                 "init_args": {"data_dir": "../my_data", "annotations": "examples.jsonl"}},
        "aie": {"cache_dir": "runs/aie_cache"},
    })
    overrides = config_inputs(config)
    assert overrides[0] == f"--model.fv_path={configs / '../vectors.safetensors'}"
    # A folder beside the config is resolved; a hub id (no such folder) and an absolute path are kept.
    assert json.loads(overrides[1].partition("=")[2]) == {
        "directory": str(configs / "weights"), "model_path": "Qwen/Qwen3-VL-4B-Instruct", "cache_dir": "/abs/cache"}
    assert overrides[2] == f"--data.init_args.data_dir={configs / '../my_data'}"
    assert len(overrides) == 3  # annotations is relative to data_dir; export_dir and aie.cache_dir are outputs


def test_synthetic_data_is_generated_where_the_command_runs_but_its_objects_are_read_beside_the_config(tmp_path):
    config = _write(tmp_path / "c" / "synthetic.yaml", {"data": {
        "class_path": "mfv.data.datamodule.SyntheticRelationDataModule",
        "init_args": {"data_dir": "data/synthetic", "objects": "pngs"}}})
    assert config_inputs(config) == [f"--data.init_args.objects={tmp_path / 'c' / 'pngs'}"]


@pytest.mark.parametrize("text", ["", "- a list\n", "model: [unclosed\n"])
def test_a_config_that_is_not_a_mapping_adds_nothing_for_its_parser_to_report(tmp_path, text):
    (tmp_path / "bad.yaml").write_text(text)
    assert config_inputs(tmp_path / "bad.yaml") == []


def test_overrides_follow_their_config_so_later_options_win_and_resolving_twice_changes_nothing(tmp_path):
    config = _write(tmp_path / "c" / "own.yaml", {"data": {"class_path": "mfv.data.own.OwnRelationDataModule",
                                                           "init_args": {"data_dir": "my_data"}}})
    argv = ["--config", str(config), "--data.init_args.data_dir", "elsewhere"]
    once = resolve_configs(argv)
    assert once == ["--config", str(config), f"--data.init_args.data_dir={tmp_path / 'c' / 'my_data'}",
                    "--data.init_args.data_dir", "elsewhere"]
    assert resolve_configs(once) == once
    assert resolve_configs([f"--config={config}"])[1:] == once[2:3]


def test_prepare_data_reads_a_configs_data_beside_it_from_another_folder(tmp_path, monkeypatch, capsys):
    from mfv import cli

    project = tmp_path / "project"
    make_folder(project / "my_data", images=24)
    bundled = yaml.safe_load((Path(__file__).parents[1] / "configs" / "own_data_example.yaml").read_text())
    config = _write(project / "configs" / "mine.yaml", {**bundled, "data": {
        **bundled["data"], "init_args": {**bundled["data"]["init_args"], "data_dir": "../my_data"}}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli.main(["prepare-data", "--config", str(config)])
    out = capsys.readouterr().out
    assert f"data ready: {project / 'configs' / '../my_data'}" in out
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran
    # The same relative path on the command line is the working folder's: there is none here.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare-data", "--config", str(config), "--data.init_args.data_dir", "../my_data"])
    assert exit_.value.code == 2
    assert "../my_data: image folder not found (data.init_args.data_dir" in capsys.readouterr().err
