"""Installed anywhere (#34): bundled configs and organism found by name from any folder, torch's
threads from the usable cores, short fast help, one-line errors with suggestions, constant
answers reported, and (slow) the documented install from a built wheel in a fresh venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mfv import resources, threads, usage
from mfv.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
MFV = [sys.executable, "-m", "mfv.cli"]


def run_mfv(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MFV, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ----- bundled configs and organism ---------------------------------------------------------------

def test_a_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toy = resources.config_path("toy")
    assert Path(toy).is_file() and Path(toy).name == "toy.yaml"
    assert resources.config_path("configs/toy.yaml") == toy  # the clone's README form, from elsewhere
    assert resources.resolve_configs(["--config", "toy", "--config=own_data_example", "--x", "toy"]) == [
        "--config", toy, f"--config={resources.config_path('own_data_example')}",
        # its data folder, written in the config, is read beside it (a user's own: --data.init_args.data_dir)
        f"--data.init_args.data_dir={Path(resources.config_path('own_data_example')).parent / 'my_data'}", "--x", "toy"]
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    assert resources.config_path("mine.yaml") == "mine.yaml"  # a file as given wins
    with pytest.raises(ConfigError, match="bundled: .*toy"):
        resources.config_path("toi")


def test_the_organism_and_every_config_are_bundled():
    organism = resources.organism_dir()
    assert (organism / "config.json").is_file() and (organism / "model.safetensors").is_file()
    assert {"toy", "own_data_example", "organism_card"} <= set(resources.config_names())
    # No config reaches the organism through a path relative to the working folder.
    for name in resources.config_names():
        assert "checkpoints/organism" not in "".join(
            line.split("#")[0] for line in Path(resources.config_path(name)).read_text().splitlines()), name


def test_the_wheel_build_copies_the_bundled_files(tmp_path):
    from mfv.compat import _copy_bundled

    written = _copy_bundled(ROOT, tmp_path / "bundled")
    names = {p.relative_to(tmp_path / "bundled").as_posix() for p in written}
    assert {"configs/toy.yaml", "organism/model.safetensors", "organism/tokenizer/tokenizer.json",
            "constraints.txt"} <= names


# ----- threads -------------------------------------------------------------------------------------

def test_threads_follow_affinity_quota_and_override(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "_CGROUP_V2", quota)
    quota.write_text("max 100000\n")
    assert threads.usable_cores() == 4
    quota.write_text("150000 100000\n")  # 1.5 cores: 2 threads
    assert threads.usable_cores() == 2
    monkeypatch.setenv(threads.ENV, "")  # restored after the test (take_threads_option sets it)
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.set_threads() == 2 == torch.get_num_threads()
        assert threads.take_threads_option(["train", "--threads", "1", "--x", "2"]) == ["train", "--x", "2"]
        assert threads.set_threads() == 1 and "threads: 1" in threads.summary()
        monkeypatch.setenv(threads.ENV, "zero")
        with pytest.raises(ConfigError, match="MFV_THREADS"):
            threads.set_threads()
    finally:
        torch.set_num_threads(before)


# ----- help, suggestions, one-line errors --------------------------------------------------------

def test_help_is_short_and_fast_without_torch():
    code = ("import sys, time; t = time.perf_counter(); from mfv.cli import main; from mfv.usage import SHORT_HELP\n"
            "for c in SHORT_HELP:\n"
            "    try: main([c, '--help'])\n"
            "    except SystemExit as e: assert e.code == 0, c\n"
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'help imported torch'\n"
            "print('seconds', time.perf_counter() - t)")  # printed, not asserted: fast because torch stays out
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert max(len(text.splitlines()) for text in usage.SHORT_HELP.values()) <= 30
    assert "--help full" in usage.SHORT_HELP["train"]
    assert usage.wants_help(["--config", "toy", "--help"]) == "short"
    assert usage.wants_help(["--help", "full"]) == usage.wants_help(["--help-all"]) == "full"
    assert usage.full_help_argv(["--help", "full"]) == ["--help"]


@pytest.mark.slow
def test_short_help_names_only_real_options():
    """Every --option the short help of train/evaluate names is in the full parser's help."""
    import re

    done = run_mfv("evaluate", "--help", "full")
    assert done.returncode == 0, done.stderr[-2000:]
    for option in set(re.findall(r"(--[a-z_]+(?:\.[a-z_]+)*)", usage.SHORT_HELP["train"] + usage.SHORT_HELP["evaluate"])):
        if option not in ("--help", "--threads") and not option.startswith("--data.init_args."):
            assert option in done.stdout, option


def test_an_unknown_option_gets_a_suggestion_and_no_abbreviation_passes(capsys):
    import jsonargparse

    usage.strict_parsers()
    parser = jsonargparse.ArgumentParser(prog="mfv x")
    parser.add_argument("--trainer.max_epochs", type=int, default=1)
    parser.add_argument("--model.layer", type=int, default=1)
    for argv, expected in ((["--model.lyer", "2"], "error: unknown option --model.lyer; did you mean --model.layer?"),
                           (["--trainer.max_epoch", "2"], "did you mean --trainer.max_epochs?")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 2, err  # the usage's first line, the error
    assert parser.parse_args(["--trainer.max_epochs", "3"])["trainer.max_epochs"] == 3


def test_typo_and_abbreviation_through_the_command_are_one_line(tmp_path, monkeypatch, capsys):
    from mfv.cli import main

    monkeypatch.chdir(tmp_path)
    for option, suggested in (("--model.lyer", "--model.layer"), ("--trainer.max_epoch", "--trainer.max_epochs")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", "toy", option, "2"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 2 and len(lines) == 1, err[-2000:]
        assert f"did you mean {suggested}" in lines[0] and len(err.strip().splitlines()) <= 3  # + usage, threads


def test_wrapped_errors_become_the_users_line():
    try:
        try:
            raise DataError("my_data/examples.jsonl:4: field 'answer' missing; data.init_args.relations")
        except DataError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n"
                             "  - something\n  - Expected a <class 'NoneType'>\nGiven value: Namespace(x=1)") from inner
    except ValueError as wrapped:
        assert usage.plain_message(wrapped) == "my_data/examples.jsonl:4: field 'answer' missing; model.relations"
    text = ("Does not validate against any of the Union subtypes\nSubtypes: [a]\nErrors:\n  - the reason\n"
            "  - Expected a <class 'NoneType'>\nGiven value: Namespace(...)")
    assert usage.plain_message(text) == "the reason"


# ----- constant answers ----------------------------------------------------------------------------

def test_a_constant_answer_is_reported_once_per_split():
    from mfv.evaluation.answers import constant_answer_warnings, constant_token
    from mfv.evaluation.scoring import Score

    n = 20
    constant = Score(["a", "b"], np.zeros(n), np.arange(n) % 2, np.zeros(n), np.full(n, 7))
    varied = Score(["a", "b"], np.zeros(n), np.arange(n) % 2, np.zeros(n), np.arange(n))
    assert constant_token(constant) == 7 and constant_token(varied) is None
    right = Score(["a", "b"], np.ones(n), np.arange(n) % 2, np.zeros(n), np.full(n, 7))
    assert constant_token(right) is None  # always the answer: nothing to warn about

    class Words:
        def decode(self, ids):
            return {7: " banana"}[ids[0]]

    warnings = constant_answer_warnings({"zero-shot": constant, "fv": varied, "icl": constant},
                                        {"zero-shot": {"split": "test"}, "icl": {"split": "test"}}, Words())
    assert len(warnings) == 1 and "'banana'" in warnings[0] and "test split" in warnings[0]
    assert "zero-shot, icl" in warnings[0]


# ----- the documented install, from a built wheel -----------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MFV_TEST_INSTALL") != "1", reason="minutes: set MFV_TEST_INSTALL=1 (.ci/run does)")
def test_the_wheel_runs_its_demo_in_an_empty_folder(tmp_path):
    """.ci/installed.sh: wheel, fresh venv, torch then the wheel with constraints, `mfv demo`.

    torch comes from PyTorch's CPU index, as documented; offline, MFV_TORCH_INDEX= (empty) takes
    it from pip's configured sources (a local wheel folder)."""
    quick = tmp_path / "quick.yaml"  # a short run: the acceptance is that it reaches its report
    quick.write_text("trainer: {max_epochs: 1}\naie: {num_mean_prompts: 16, num_aie_prompts: 8}\n"
                     "evaluation: {shots: [1], max_k: 4, sweep_limit: 8}\n"
                     "data: {init_args: {num_images: {eval: 40, train: 64, test: 24, novel: 24, composite: 24}}}\n")
    started = time.perf_counter()
    done = subprocess.run([str(ROOT / ".ci" / "installed.sh"), "--limit", "8", "--configs", f"[toy,{quick}]"],
                          capture_output=True, text=True, timeout=3000,
                          env={**os.environ, "MFV_WORK": str(tmp_path / "work"), "PYTHON": sys.executable})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    metrics = json.loads((tmp_path / "work" / "empty" / "X" / "eval" / "metrics.json").read_text())
    assert metrics["conditions"]
    print(f"installed demo: {time.perf_counter() - started:.0f} s")


# ----- prepare-data checks what train would ------------------------------------------------------

def test_prepare_data_uses_model_relations_and_prints_counts(tmp_path, monkeypatch, capsys):
    from mfv.cli import main
    from tests.test_own_data import make_folder, write_jsonl

    rows = make_folder(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    main(["prepare-data", "--config", "own_data_example", "--data.init_args.data_dir", "d"])
    out = capsys.readouterr().out
    table = out.split("data ready: d\n", 1)[1].splitlines()
    assert table[0].split() == ["split", "above", "below", "left", "right", "total"]
    assert {line.split()[0] for line in table[1:]} >= {"train", "test"}
    main(["prepare-data", "--config", "own_data_example", "--data.init_args.data_dir", "d", "--model.relations", "left"])
    out = capsys.readouterr().out
    assert out.split("data ready: d\n", 1)[1].splitlines()[0].split() == ["split", "left", "total"]
    write_jsonl(tmp_path / "d" / "examples.jsonl", [dict(r, relation="on") if r["relation"] == "above" else r
                                                     for r in rows])
    with pytest.raises(SystemExit):
        main(["prepare-data", "--config", "own_data_example", "--data.init_args.data_dir", "d"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model.relations has 'above'" in err[0] and "Namespace" not in err[0]


# ----- console --------------------------------------------------------------------------------------

def test_one_bar_per_stage_and_plain_lines_in_a_log():
    import io

    from mfv.console import progress
    from mfv.evaluation.engine import stage_label

    assert stage_label([f"composite weights: mode {i}" for i in range(8)]) == "composite weights (8 conditions)"
    assert stage_label(["1-shot ICL", "4-shot ICL"]) == "1-shot ICL and 1 more"
    stream = io.StringIO()  # not a terminal, as a log
    bar = progress(total=3, desc="stage", file=stream, position=2)
    for _ in range(3):
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert lines and all(line.startswith("stage:") for line in lines) and "100%" in lines[-1]


def test_lightning_bars_are_plain_lines_in_a_log(monkeypatch):
    import io

    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from mfv.console import PlainLines, quiet

    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a log, not a terminal
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False)
    quiet(trainer)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, TQDMProgressBar) and sum(isinstance(c, TQDMProgressBar) for c in trainer.callbacks) == 1
    train_bar = bar.init_train_tqdm()
    assert isinstance(train_bar.fp, PlainLines) or isinstance(getattr(train_bar.fp, "_wrapped", None), PlainLines)
    train_bar.close()
