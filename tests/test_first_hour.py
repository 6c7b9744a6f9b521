"""A researcher's first hour (issue #27): version, CLI conventions, list options, a quiet
console, paper figures, installing without the Makefile, licence and citation files."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import sysconfig
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import mfv
from mfv import cli, console, seeds
from mfv.compat import HOOK_LINE, HOOK_PTH, OPEN_FLAMINGO_INSTALL

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- version, help, usage


def test_version_is_printed_and_has_one_source(capsys):
    cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"mfv {mfv.__version__}"
    run = subprocess.run([sys.executable, "-m", "mfv.cli", "--version"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and run.stdout.strip() == f"mfv {mfv.__version__}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "mfv.__version__"' in pyproject


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["trian"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err and len(err.splitlines()) == 1
    assert tuple(cli._commands()) == cli.COMMANDS


@pytest.mark.parametrize("command", ["seeds", "prepare-gqa", "demo", "generate-synthetic", "prepare-data"])
def test_usage_and_tip_name_the_subcommand(command, capsys):
    argv = list(sys.argv)
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--no_such_option", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: mfv {command}" in err
    assert f"run: mfv {command} --help" in err
    assert sys.argv == argv  # restored for whoever called main in-process


def test_lightning_commands_keep_sys_argv_for_ddp_ranks(monkeypatch):
    """Lightning starts each further DDP rank by re-running sys.argv: it must stay the real one."""
    seen = {}
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mfv", "train", "--config", "x.yaml"])
    monkeypatch.setattr(cli, "_commands", lambda: {"train": lambda args: seen.update(argv=list(sys.argv), args=args)})
    cli.main(["train", "--config", "x.yaml"])
    assert seen == {"argv": ["/venv/bin/mfv", "train", "--config", "x.yaml"], "args": ["--config", "x.yaml"]}


def test_prepare_data_help_lists_only_its_own_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare-data", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--data" in out and "ignored" not in out and "--trainer" not in out


# --------------------------------------------------------------------------- list options


def _prepare():
    import importlib

    return importlib.import_module("mfv.data.gqa.prepare").prepare


def test_bare_values_of_list_options_become_lists():
    prepare = _prepare()
    assert cli.bracket_lists(["--relations", "agentic", "--out", "o"], prepare) == \
        ["--relations", '["agentic"]', "--out", "o"]
    assert cli.bracket_lists(["--scene_graphs", "a.json", "b.json", "--images", "i"], prepare) == \
        ["--scene_graphs", '["a.json","b.json"]', "--images", "i"]
    assert cli.bracket_lists(["--relations=left of"], prepare) == ['--relations=["left of"]']
    assert cli.bracket_lists(["--settings.blacklist", "sky"], prepare) == ["--settings.blacklist", '["sky"]']
    for kept in (["--relations", "[above,below]"], ["--relations", "null"], ["--scene_graphs", "-"],
                 ["--out", "x.json"], ["--seed", "3"]):
        assert cli.bracket_lists(kept, prepare) == kept
    once = cli.bracket_lists(["--relations", "above", "below"], prepare)
    assert cli.bracket_lists(once, prepare) == once  # idempotent


def test_numbers_stay_numbers_in_sections():
    from mfv.evaluation.protocol import EvaluationSettings
    from mfv.training.module import FunctionVectorModule

    assert cli.bracket_lists(["--evaluation.shots", "1", "4"], evaluation=EvaluationSettings) == \
        ["--evaluation.shots", "[1,4]"]
    assert cli.bracket_lists(["--model.relations", "above"], model=FunctionVectorModule) == \
        ["--model.relations", '["above"]']
    assert cli.bracket_lists(["--trainer.devices", "2"], model=FunctionVectorModule) == ["--trainer.devices", "2"]


def _good_image(i: int, relation: str) -> dict:
    def obj(name, x, y, relations=()):
        return {"name": name, "x": x, "y": y, "w": 40, "h": 40, "attributes": [],
                "relations": [{"name": n, "object": o} for n, o in relations]}

    return {"width": 100, "height": 100, "objects": {f"{i}a": obj("man", 0, 0, [(relation, f"{i}b")]),
                                                      f"{i}b": obj("hat", 50, 0), f"{i}c": obj("lamp", 0, 50)}}


def test_prepare_gqa_takes_bare_values_and_never_dumps_a_file(tmp_path, capsys):
    from PIL import Image

    graphs = {f"w{i}": _good_image(i, "wearing") for i in range(12)}
    graphs.update({f"x{i}": _good_image(100 + i, "wearing") for i in range(1500)})  # no image files: skipped
    scene_graphs = tmp_path / "train_sceneGraphs.json"
    scene_graphs.write_text(json.dumps(graphs))
    assert scene_graphs.stat().st_size > 200_000
    images = tmp_path / "images"
    images.mkdir()
    for image_id in list(graphs)[:12]:
        Image.new("RGB", (100, 100), "white").save(images / f"{image_id}.jpg")
    cli.main(["prepare-gqa", "--scene_graphs", str(scene_graphs), "--images", str(images), "--relations", "agentic",
              "--out", str(tmp_path / "gqa"), "--progress", "false"])
    summary = json.loads((tmp_path / "gqa" / "summary.json").read_text())
    assert summary["tasks"] == 12 and set(summary["tasks_per_relation"]["train"]) == {"wearing"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # a bad call with the same bare file: short, and no file content
        cli.main(["prepare-gqa", "--scene_graphs", str(scene_graphs), "--images", str(images), "--relations",
                  "agentic", "--out", str(tmp_path / "gqa2"), "--progress", "false", "--split", "no_such_split"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err) < 3000 and "File name too long" not in err and '"objects"' not in err
    assert "no_such_split" in err


# --------------------------------------------------------------------------- mfv seeds


def test_seeds_takes_overrides_without_a_separator(monkeypatch):
    called = {}
    monkeypatch.setattr(seeds, "run_seeds", lambda *args: called.setdefault("args", args))
    seeds.main(["--config", "c.yaml", "--trainer.max_epochs", "1", "--seeds", "2", "--evaluation.shots", "[1]",
                "--trainer.devices", "-1", "--limit=4"])
    assert called["args"] == ("c.yaml", 2, "runs/seeds", 4,
                              ["--trainer.max_epochs", "1", "--evaluation.shots", "[1]", "--trainer.devices", "-1"])
    called.clear()
    seeds.main(["--config", "c.yaml", "--", "--model.init", "random"])  # the old convention still works
    assert called["args"] == ("c.yaml", 3, "runs/seeds", None, ["--model.init", "random"])


def test_seeds_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        seeds.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: mfv seeds")
    for option in ("--config", "--seeds", "--out", "--limit"):
        line = next(l for l in out.splitlines() if l.strip().startswith(option))
        assert len(line.split(maxsplit=2)) == 3, line  # option, metavar, help text
    assert "no -- is needed" in " ".join(out.split())
    with pytest.raises(SystemExit) as info:
        seeds.main(["--config", "c.yaml", "--seeds", "0"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- quiet console


@pytest.fixture
def recorded():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet()
        yield caught


def test_quiet_silences_the_known_warnings_at_their_source(recorded, monkeypatch):
    from jsonargparse._typehints import serialize_as_import_path
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loops.fit_loop import _FitLoop
    from lightning.pytorch.utilities._pytree import _tree_flatten

    from mfv.training.callbacks import AtomicCheckpointIO

    _tree_flatten(1)  # Lightning builds torch's deprecated LeafSpec
    serialize_as_import_path(AtomicCheckpointIO())  # jsonargparse saving train.py's plugin into config.yaml
    frozen = types.SimpleNamespace(trainer=types.SimpleNamespace(lightning_module=torch.nn.Linear(1, 1).eval()))
    _FitLoop._warn_if_modules_in_eval_mode(frozen)
    monkeypatch.setattr(sys, "argv", ["mfv", "--config", "x.yaml"])
    parser = types.SimpleNamespace(parse_args=lambda args: {})
    LightningCLI.parse_arguments(types.SimpleNamespace(), parser, ["--config", "x.yaml"])
    assert not [str(w.message) for w in recorded]
    warnings.warn("any other warning", UserWarning)
    serialize_as_import_path(object())  # another instance jsonargparse cannot write: still reported
    assert len(recorded) == 2


def test_quiet_drops_the_litlogger_tip_only(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    console.quiet()
    console.quiet()  # idempotent: one filter per logger
    logger = logging.getLogger(next(iter(console.NOISE_LOGS)))
    assert sum(isinstance(f, console._DropMessage) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
                       "(https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_quiet_trainer_progress_bar_has_no_version(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = L.Trainer(logger=TensorBoardLogger(str(tmp_path)), enable_checkpointing=False, accelerator="cpu",
                        enable_model_summary=False)
    bar = trainer.progress_bar_callback
    assert "v_num" in bar.get_metrics(trainer, None)
    console.quiet(trainer)
    console.quiet(trainer)
    bar = trainer.progress_bar_callback  # where stdout is a log (pytest's), quiet put in a plain-lines bar
    assert "v_num" not in bar.get_metrics(trainer, None)
    assert "v_num" not in pickle.loads(pickle.dumps(bar)).get_metrics(trainer, None)  # ddp_spawn pickles it


def _check_reference_metrics(metrics: dict) -> None:
    """Every accuracy and sweep point as before the evaluation library replaced the module's
    test loops (the reference was written by the same command at commit 64bb7e5); conditions
    added since (the softmax_affine composites, #35) are not in it."""
    reference = json.loads((REPO / "tests/data/toy_reference_metrics.json").read_text())
    assert set(reference["summary"]) <= set(metrics["summary"]), set(reference["summary"]) - set(metrics["summary"])
    summary = {name: metrics["summary"][name] for name in reference["summary"]}
    assert summary == pytest.approx(reference["summary"], abs=1e-9)
    for name, by_split in reference["sweeps"].items():
        for split, accuracies in by_split.items():
            assert metrics["sweeps"][name][split]["accuracy"] == pytest.approx(accuracies, abs=1e-9), (name, split)


def _bar_labels(stderr: str) -> set[str]:
    """The labels of every tqdm bar written to ``stderr`` (carriage returns, cursor moves)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    return {m.group(1).strip() for line in re.split(r"[\r\n]", text)
            if (m := re.match(r"^(.*?):\s+\d+%\|", line))}


@pytest.mark.slow
def test_evaluate_prints_no_known_noise_a_labelled_bar_per_stage_and_the_reference_metrics(tmp_path):
    """``evaluate.py --config configs/toy.yaml --model.layer 2 --limit 8 --evaluation.max_k 4``
    in a fresh process (import-time warnings included): no Lightning, jsonargparse or litlogger
    warning, one labelled progress bar per evaluation stage, the table, the train override
    taken, and every accuracy and sweep point of the reference run (one run of the toy config
    serves all three claims)."""
    done = subprocess.run([sys.executable, "evaluate.py", "--config", "configs/toy.yaml", "--model.layer", "2",
                           "--limit", "8", "--evaluation.max_k", "4", "--out", str(tmp_path / "eval"),
                           "--data.init_args.data_dir", str(tmp_path / "data"),
                           "--aie.cache_dir", str(tmp_path / "cache")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("Warning", "warn(", "litlogger", "LitLogger", "jsonargparse", "LightningCLI's args"):
        assert noise not in done.stderr, (noise, done.stderr[-3000:])
    labels = _bar_labels(done.stderr)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["layer"] == 2 and metrics["conditions"]["zero_shot"]["n"] == 8
    # One labelled bar per evaluation stage (#34): a lone condition's own label, else what the
    # stage's conditions share (mfv.evaluation.engine.stage_label). The test split's sweep
    # points share the zero-shot prompts' loader.
    sweep_points = len(metrics["sweeps"]["layer"]["x"]) + len(metrics["sweeps"]["k"]["x"])
    assert {f"validation sweep ({sweep_points} conditions)", f"zero-shot and {2 + sweep_points} more", "1-shot ICL",
            "4-shot ICL", "10-shot ICL", "novel objects: 4-shot ICL", "analogies: 4-shot ICL",
            "composite weights (4 conditions)"} <= labels, sorted(labels)
    _check_reference_metrics(metrics)
    assert "| zero-shot + extracted FV (`zero_shot_fv`) |" in done.stdout  # the summary table


# --------------------------------------------------------------------------- figures and report


class FakeExtraction:
    relations = ["above", "below", "left", "right"]

    def __init__(self, layers: int = 8, heads: int = 8):
        generator = torch.Generator().manual_seed(0)
        self._aie = {r: torch.randn(layers, heads, generator=generator) for r in self.relations}
        self.aie_pooled = sum(self._aie.values()) / len(self._aie)

    def aie(self, relation):
        return self._aie[relation]

    def heads(self, k, selection):
        order = self.aie_pooled.flatten().argsort(descending=True)[:k].tolist()
        width = self.aie_pooled.shape[1]
        return {r: [(i // width, i % width) for i in order] for r in self.relations}


def _condition(group, accuracy, n=40, description=None):
    return {"group": group, "accuracy": accuracy, "ci95": [max(0, accuracy - 0.1), min(1, accuracy + 0.1)], "n": n,
            "description": description, "per_relation": {"above": {"accuracy": accuracy}}}


def fake_metrics(layer=1, k=6, chosen_layer=1, chosen_k=6, not_run=None) -> dict:
    conditions = {"zero_shot": _condition("test", 0.2, description="zero-shot"),
                  "zero_shot_fv": _condition("test", 0.8), "icl_1": _condition("test", 0.6),
                  "icl_4": _condition("test", 1.0, description="4-shot ICL"),
                  "novel_zero_shot": _condition("novel", 0.1), "novel_icl_4": _condition("novel", 0.9),
                  "novel_zero_shot_fv": _condition("novel", 0.7),
                  "analogy_icl_0": _condition("analogy", 0.15, 16), "analogy_icl_1": _condition("analogy", 0.4, 16),
                  "analogy_icl_4": _condition("analogy", 0.5, 16),
                  "analogy_composite_normalized": _condition("analogy", 0.45, 16)}
    def sweep(xs, chosen):
        return {"x": xs, "val": {"accuracy": [0.5] * len(xs), "ci95": [[0.4, 0.6]] * len(xs), "n": 25},
                "test": {"accuracy": [0.6] * len(xs), "ci95": [[0.5, 0.7]] * len(xs), "n": 30},
                "chosen_on": "val", "chosen": chosen, "test_at_chosen": {"accuracy": 0.6, "ci95": [0.5, 0.7], "n": 30}}

    heads = FakeExtraction().heads(k, "pooled")
    return {"summary": {n: c["accuracy"] for n, c in conditions.items()}, "conditions": conditions,
            "comparisons": {}, "analogy_weights": {},
            "sweeps": {"layer": sweep(list(range(8)), chosen_layer), "k": sweep(list(range(1, 11)), chosen_k)},
            "extraction": {"heads_for_half_positive_aie": 4, "lm_heads": 64, "heads_for_half_positive_aie_share": 0.06,
                           "top10_positive_aie_share": 0.9},
            "injected": {"extracted": {"layer": layer, "k": k, "selection": "pooled",
                                       "heads": {r: [list(h) for h in hs] for r, hs in heads.items()}}},
            "settings": {"layer": layer, "k": k, "selection": "pooled", "backbone": "organism", "limit": None},
            "not_run": not_run or {}}


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _check_paper_figure(figure, max_width: float) -> None:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert figure.get_figwidth() <= max_width + 1e-6
    sizes = [t.get_fontsize() for t in figure.findobj(lambda o: hasattr(o, "get_fontsize") and hasattr(o, "get_text"))
             if t.get_text().strip() and t.get_visible()]
    assert sizes and min(sizes) >= 7, min(sizes)
    legends = figure.legends + [a.get_legend() for a in figure.axes if a.get_legend()]
    data_axes = [a for a in figure.axes if a.get_visible() and a.get_label() != "<colorbar>"]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for axis in data_axes:
            assert not _overlaps(box, axis.get_window_extent(renderer)), "a legend covers a panel"


def test_figures_are_fit_for_a_paper():
    from mfv.evaluation import plots, report

    metrics = fake_metrics()
    figures = report.figures(metrics, FakeExtraction())
    assert set(figures) == {"conditions", "layer_sweep", "k_sweep", "aie_heatmap"}
    _check_paper_figure(figures["conditions"], plots.TEXT_WIDTH)
    for axis in figures["conditions"].axes:  # zero-shot and ICL reference lines in every panel, analogies too
        styles = sorted(line.get_linestyle() for line in axis.lines if line.get_linestyle() != "None")
        assert styles == ["--", ":"], (axis.get_title(loc="left"), styles)
    assert any("n = 16" in a.get_title(loc="left") for a in figures["conditions"].axes)
    for stem in ("layer_sweep", "k_sweep"):
        figure = figures[stem]
        _check_paper_figure(figure, plots.COLUMN_WIDTH)
        note = figure.axes[0].get_title(loc="left")
        assert "n = 25 (val), 30 (test)" in note
        assert ("K = 6 heads (pooled) held fixed" if stem == "layer_sweep" else "injected after layer 1") in note
    _check_paper_figure(figures["aie_heatmap"], plots.TEXT_WIDTH)
    for figure in figures.values():
        plots.save_close(figure)


def test_aie_grid_stays_at_text_width_for_a_large_model():
    from mfv.evaluation import plots

    extraction = FakeExtraction(32, 32)
    heads = extraction.heads(10, "pooled")
    figure = plots.aie_grid(extraction.aie_pooled, {r: extraction.aie(r) for r in extraction.relations}, heads,
                            heads["above"])
    _check_paper_figure(figure, plots.TEXT_WIDTH)
    plots.save_close(figure)


def test_write_report_writes_a_pdf_beside_each_png(tmp_path):
    from mfv.evaluation import plots, report

    metrics = fake_metrics()
    result = types.SimpleNamespace(to_dict=lambda: metrics)
    report.write_report(result, tmp_path, FakeExtraction())
    for stem in report.figure_stems(metrics):
        assert (tmp_path / f"{stem}.png").stat().st_size > 0
        assert (tmp_path / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    figures_line = "Figures (PNG and PDF): conditions, layer_sweep, k_sweep, aie_heatmap."
    assert figures_line in (tmp_path / "report.md").read_text()
    figure = plots.sweep_plot([1, 2], {"a": ([0.1, 0.2], [[0, 0.2], [0.1, 0.3]])}, "x", "t")
    assert plots.save(figure, tmp_path / "single.png") == tmp_path / "single.png"
    assert (tmp_path / "single.pdf").is_file()  # plots.save (train.py's AIE heatmap) writes both too


def test_figures_are_drawn_once_for_png_and_tensorboard_and_pdfs_keep_real_fonts(tmp_path):
    """The PNG from the one raster draw equals matplotlib's own savefig, TensorBoard gets it at
    screen size, and the PDF embeds TrueType text with fontTools left as it was."""
    import numpy as np
    from fontTools import subset
    from PIL import Image

    from mfv.evaluation import plots

    def figure():
        return plots.sweep_plot([1, 2, 3], {"fixed": ([0.1, 0.5, 0.4], [[0, 0.2], [0.4, 0.6], [0.3, 0.5]])}, "K", "t",
                                {"zero-shot (test)": 0.2}, chosen=2, note="K held fixed\nn = 8 prompts per point")

    reference = figure()
    with plots.paper_style():
        reference.savefig(tmp_path / "reference.png", format="png", dpi=plots.PNG_DPI)
    drawn = figure()
    pixels = plots.render(drawn)
    defaults = list(subset.Options._drop_tables_default)
    plots.write(drawn, tmp_path / "once", pixels=pixels)
    once, saved = (np.asarray(Image.open(tmp_path / name)) for name in ("once.png", "reference.png"))
    assert np.array_equal(once, saved)
    assert plots.screen_pixels(pixels).shape == (pixels.shape[0] // 2, pixels.shape[1] // 2, 3)
    pdf = (tmp_path / "once.pdf").read_bytes()
    assert b"/FontFile2" in pdf and b"/ToUnicode" in pdf  # Type 42: text stays text
    assert subset.Options._drop_tables_default == defaults
    for f in (reference, drawn):
        plots.save_close(f)


def test_report_lists_not_run_conditions_and_where_layer_and_k_came_from():
    from mfv.evaluation import report

    chosen = report.report_markdown(fake_metrics())
    assert "The injected layer 1 and K 6 are the validation sweeps' choices." in chosen and "Not run" not in chosen
    fixed = report.report_markdown(fake_metrics(layer=1, k=18, chosen_layer=0, chosen_k=2,
                                                not_run={"icl_10": "10 shots: the test split has 8 demonstrations"}))
    assert ("layer 1 (`model.layer`; validation chose 0) and K 18 (`aie.k`; validation chose 2, outside the swept "
            "1..10) were fixed by the config") in fixed
    assert "## Not run" in fixed and "| `icl_10` | 10 shots: the test split has 8 demonstrations |" in fixed


# --------------------------------------------------------------------------- installing, licence, citation


def _requirement_names(requirements) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_pyproject_declares_open_flamingos_real_needs():
    from importlib import metadata

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    ours = _requirement_names(project["project"]["dependencies"])
    theirs = {r for r in metadata.requires("open-flamingo") if "extra ==" not in r}
    # torch==2.0.1 is the pin that keeps it out of the dependencies; sentencepiece serves LLaMA tokenizers only.
    needed = _requirement_names(theirs) - {"sentencepiece"}
    assert needed <= ours, needed - ours
    assert "open-flamingo" not in ours
    assert project["tool"]["setuptools"]["cmdclass"]["build_py"] == "mfv.compat.BuildPyWithHook"
    assert OPEN_FLAMINGO_INSTALL in (REPO / "pyproject.toml").read_text()


def test_the_build_writes_the_import_hook_into_the_wheel(tmp_path):
    from setuptools import Distribution

    from mfv.compat import BuildPyWithHook

    command = BuildPyWithHook(Distribution({"name": "mfv", "packages": []}))
    command.initialize_options()
    command.build_lib = str(tmp_path)
    command.finalize_options()
    command.run()
    assert (tmp_path / HOOK_PTH).read_text() == HOOK_LINE
    assert str(tmp_path / HOOK_PTH) in command.get_outputs()
    assert HOOK_LINE.startswith("import ")  # site.py executes only lines that start with "import"


def test_licence_citation_and_changelog():
    assert "MIT License" in (REPO / "LICENSE").read_text() and "mfv authors" in (REPO / "LICENSE").read_text()
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["version"] == mfv.__version__
    paper = citation["preferred-citation"]
    assert paper["title"] == "Multimodal Function Vectors for Spatial Relations"
    assert any("2510.02528" in str(i["value"]) for i in paper["identifiers"])
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{mfv.__version__}]" in changelog and "## [Unreleased]" in changelog


@pytest.mark.slow
def test_pip_install_into_an_existing_environment_without_the_makefile(tmp_path):
    """A fresh venv (no pip, no mfv) that sees this venv's third-party packages through a
    path entry (which runs none of their .pth files), then ``pip install --no-deps
    --no-build-isolation .`` of a copy of the sources: mfv, its console script and the
    import hook come from the wheel, so ``import lightning`` before ``import mfv`` works."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "mfv", source / "mfv", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "shared_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              str(source)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert (site_packages / HOOK_PTH).read_text() == HOOK_LINE
    check = ("import lightning, torchvision, mfv, open_flamingo\n"
             "from open_flamingo.src.flamingo import Flamingo\n"
             "print(mfv.__file__)")
    run = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()).is_relative_to(site_packages)
    version = subprocess.run([venv / "bin" / "mfv", "--version"], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env=env)
    assert version.stdout.strip() == f"mfv {mfv.__version__}"
