"""Drills on what users hand mfv (issue #33): paths in their own data, spreadsheet CSVs, an
existing GQA preparation, and the Python API given wrong types or values.

Each drill asserts one clear line (naming the file, line and field, or the argument and what it
expects) before anything is opened or computed, or the correct result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import mfv
from mfv import cli
from mfv.data.episodes import EpisodeSampler, Scene
from mfv.data.own import OwnRelationDataModule, read_examples
from mfv.errors import ConfigError, DataError
from mfv.method.function_vector import FunctionVectorSet
from tests.conftest import WORDS

ROW = {"query": "cup", "answer": "saucer", "relation": "on"}


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    """The exception's message, asserted to be one line holding every needle."""
    message = str(exc.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


# --------------------------------------------------------------------------- your own data: paths


@pytest.fixture
def folders(tmp_path) -> Path:
    """``my_data/photos/001.png`` and, beside it, ``ok/photos/001.png`` (outside the data folder)."""
    _image(tmp_path / "my_data" / "photos" / "001.png")
    _image(tmp_path / "ok" / "photos" / "001.png")
    return tmp_path


@pytest.mark.parametrize("name, link", [
    ("../ok/photos/001.png", None),
    ("../../../etc/passwd", None),
    ("../" * 40 + "etc/passwd", None),
    ("photos/linked.png", "file"),  # a link inside the folder to a file outside it
    ("outside/001.png", "folder"),  # a linked folder pointing out
])
def test_an_image_path_leaving_the_data_folder_is_refused_before_opening_anything(folders, monkeypatch, name, link):
    root = folders / "my_data"
    if link == "file":
        (root / "photos" / "linked.png").symlink_to(folders / "ok" / "photos" / "001.png")
    if link == "folder":
        (root / "outside").symlink_to(folders / "ok" / "photos", target_is_directory=True)
    rows = [{"image": "photos/001.png", **ROW}, {"image": name, **ROW, "query": "spoon"}]
    (root / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("an image was opened"))
    with pytest.raises(DataError) as info:
        OwnRelationDataModule(data_dir=str(root), annotations="examples.jsonl", shots=1)
    one_line(info, "examples.jsonl:2: field 'image'", name, "leaves the data folder", "copy the image into")
    assert not opened


def test_links_inside_the_folder_and_dotted_paths_that_stay_in_it_are_read(folders):
    root = folders / "my_data"
    (root / "photos" / "same.png").symlink_to(root / "photos" / "001.png")
    rows = [{"image": "photos/same.png", **ROW}, {"image": "photos/../photos/001.png", **ROW, "query": "spoon"}]
    (root / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.query for e in read_examples(root / "examples.jsonl", root)] == ["cup", "spoon"]


@pytest.mark.parametrize("name, needle", [("photos/loop.png", "Symlink loop"), ("photos/\0.png", "null byte"),
                                          ("a" * 5000, "File name too long")])
def test_an_unusable_image_path_is_one_line(folders, name, needle):
    root = folders / "my_data"
    (root / "photos" / "loop.png").symlink_to(root / "photos" / "loop.png")
    (root / "examples.jsonl").write_text(json.dumps({"image": name, **ROW}) + "\n")
    with pytest.raises(DataError) as info:
        read_examples(root / "examples.jsonl", root)
    assert len(one_line(info, "examples.jsonl:1: field 'image'", "is not a usable path", needle)) < 600


def test_an_absolute_image_path_is_still_refused(folders):
    root = folders / "my_data"
    (root / "examples.jsonl").write_text(json.dumps({"image": str(root / "photos" / "001.png"), **ROW}) + "\n")
    with pytest.raises(DataError) as info:
        read_examples(root / "examples.jsonl", root)
    one_line(info, "examples.jsonl:1: field 'image'", "is absolute")


# --------------------------------------------------------------------------- spreadsheet files


def _photos(root: Path, count: int = 3) -> list[str]:
    return [str(_image(root / "photos" / f"{i:03d}.png", (40 * i, 90, 10)).relative_to(root)) for i in range(count)]


def test_a_csv_saved_by_a_spreadsheet_reads_as_the_jsonl(tmp_path):
    """UTF-8 BOM, CRLF line ends, a trailing row of empty cells and an empty last line."""
    names = _photos(tmp_path)
    rows = [{"image": n, "query": f"q{i}", "answer": f"a{i}", "relation": "on"} for i, n in enumerate(names)]
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["image,query,answer,relation", *(",".join(r.values()) for r in rows), ",,,", ""]
    (tmp_path / "examples.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    from_csv = read_examples(tmp_path / "examples.csv", tmp_path)
    from_jsonl = read_examples(tmp_path / "examples.jsonl", tmp_path)
    assert [e.__dict__ | {"line": 0} for e in from_csv] == [e.__dict__ | {"line": 0} for e in from_jsonl]
    assert [e.line for e in from_csv] == [2, 3, 4]  # the header is line 1
    (tmp_path / "spaced.csv").write_text("\n".join([", ".join(lines[0].split(",")), *lines[1:]]))
    assert read_examples(tmp_path / "spaced.csv", tmp_path) == from_csv  # "image, query, ..." by hand
    # A spreadsheet of a semicolon locale separates with ';'.
    (tmp_path / "semicolons.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).replace(",", ";").encode())
    assert read_examples(tmp_path / "semicolons.csv", tmp_path) == from_csv


def test_a_jsonl_with_a_byte_order_mark_and_crlf_is_read(tmp_path):
    names = _photos(tmp_path, 2)
    text = "".join(json.dumps({"image": n, **ROW, "query": f"q{i}"}) + "\r\n" for i, n in enumerate(names))
    (tmp_path / "examples.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\r\n")
    assert [(e.query, e.line) for e in read_examples(tmp_path / "examples.jsonl", tmp_path)] == [("q0", 1), ("q1", 2)]


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    names = _photos(tmp_path, 1)
    (tmp_path / "examples.csv").write_bytes(f"image,query,answer,relation\r\n{names[0]},cup,saucer,on\r\n"
                                            .encode("utf-16"))
    with pytest.raises(DataError) as info:
        read_examples(tmp_path / "examples.csv", tmp_path)
    one_line(info, "examples.csv", "not UTF-8", "save it as UTF-8")


# --------------------------------------------------------------------------- mfv prepare-gqa --out


def _gqa_image(i: int) -> dict:
    def obj(name, x, y, relations=()):
        return {"name": name, "x": x, "y": y, "w": 40, "h": 40, "attributes": [],
                "relations": [{"name": n, "object": o} for n, o in relations]}

    return {"width": 100, "height": 100, "objects": {f"{i}a": obj("man", 0, 0, [("wearing", f"{i}b")]),
                                                      f"{i}b": obj("hat", 50, 0), f"{i}c": obj("lamp", 0, 50)}}


@pytest.fixture(scope="module")
def gqa_inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("gqa")
    graphs = {f"w{i}": _gqa_image(i) for i in range(8)}
    (root / "sg.json").write_text(json.dumps(graphs))
    for image_id in graphs:
        _image(root / "images" / f"{image_id}.jpg")
    return root, ["prepare-gqa", "--scene_graphs", str(root / "sg.json"), "--images", str(root / "images"),
                  "--relations", "agentic", "--progress", "false"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_gqa_refuses_an_existing_preparation_unless_asked(gqa_inputs, tmp_path, capsys):
    root, args = gqa_inputs
    out = tmp_path / "data" / "gqa"
    cli.main([*args, "--out", str(out), "--seed", "1"])
    before = _tree(out)
    assert {"summary.json", "dataset/dataset_dict.json"} <= set(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--out", str(out), "--seed", "2"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--out {out} holds a preparation already" in err and "--overwrite true" in err
    assert _tree(out) == before  # untouched
    cli.main([*args, "--out", str(out), "--seed", "2", "--overwrite", "true"])
    assert json.loads((out / "summary.json").read_text())["seed"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["gqa"]  # no staging or old folder left beside it


def test_prepare_gqa_never_replaces_a_folder_of_other_files(gqa_inputs, tmp_path, capsys):
    root, args = gqa_inputs
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--out", str(tmp_path), "--overwrite", "true"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "notes.txt" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "dataset").exists()


@pytest.mark.parametrize("earlier", [False, True])
def test_an_interrupted_preparation_leaves_nothing_half_written(gqa_inputs, tmp_path, monkeypatch, earlier):
    """Interrupted after the dataset is written, before the summary: ``--out`` holds the earlier
    preparation whole (or nothing), and no staging folder is left."""
    from mfv.data.gqa import output, prepare

    root, _ = gqa_inputs
    out = tmp_path / "gqa"
    inputs = ([root / "sg.json"], root / "images", ["agentic"])
    if earlier:
        prepare(*inputs, out, progress=False)
    before = _tree(out) if earlier else None

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "atomic_write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(*inputs, out, seed=5, progress=False, overwrite=True)
    assert (_tree(out) if earlier else out.exists()) == (before if earlier else False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["gqa"] if earlier else [])


# --------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def word_scenes(tmp_path_factory) -> list[Scene]:
    """Twelve scenes named with the tiny model's words (its tokenizer knows only those)."""
    root = tmp_path_factory.mktemp("scenes")
    scenes = []
    for i in range(12):
        path = _image(root / f"{i}.png", (20 * i, 100, 50))
        anchor, up, down = (WORDS[(i + j) % len(WORDS)] for j in range(3))
        scenes.append(Scene(str(path), anchor, {"above": up, "below": down}, ("above", "below")[i % 2]))
    return scenes


@pytest.fixture(scope="module")
def sampler(word_scenes) -> EpisodeSampler:
    return EpisodeSampler(word_scenes, ["above", "below"], shots=2, seed=0)


@pytest.fixture(scope="module")
def fvs(tiny_adapter) -> FunctionVectorSet:
    width = tiny_adapter.hidden_size
    return FunctionVectorSet({"above": torch.zeros(width), "below": torch.zeros(width)}, 1, {},
                             tiny_adapter.backbone_id, tiny_adapter.shape_signature())


@pytest.mark.parametrize("options, error, needles", [
    ({"k": "6"}, TypeError, ("mfv.extract: k='6' (str)", "expected an int >= 1")),
    ({"k": 0}, ConfigError, ("k=0 is out of range",)),
    ({"layer": 99}, ConfigError, ("layer=99 is out of range", "0..2")),
    ({"num_mean_prompts": 2.5}, TypeError, ("num_mean_prompts=2.5 (float)",)),
])
def test_extract_with_a_wrong_argument_is_one_line(tiny_adapter, sampler, tmp_path, options, error, needles):
    with pytest.raises(error) as info:
        mfv.extract(tiny_adapter, sampler, cache_dir=tmp_path, progress=False, **options)
    one_line(info, *needles)
    assert not any(tmp_path.iterdir())  # refused before any compute or cache write


def test_a_path_instead_of_a_datamodule_is_one_line(tiny_adapter, fvs, tmp_path):
    with pytest.raises(TypeError) as info:
        mfv.extract(tiny_adapter, "data/api", cache_dir=tmp_path)
    one_line(info, "mfv.extract: data='data/api' (str)", "build the DataModule first", "mfv.OwnData")
    with pytest.raises(TypeError) as info:
        mfv.evaluate(tiny_adapter, fvs, Path("data/api"))
    one_line(info, "mfv.evaluate: data=", "a list of mfv.Episode or a DataModule")


def test_evaluate_without_fvs_is_one_line(tiny_adapter, sampler):
    episodes = [sampler.episode(i, "zero_shot") for i in range(2)]
    with pytest.raises(TypeError) as info:
        mfv.evaluate(tiny_adapter, None, episodes)
    one_line(info, "mfv.evaluate: fvs=None", "mfv.extract(...) or mfv.load_vectors(...)")
    with pytest.raises(TypeError) as info:
        mfv.evaluate(tiny_adapter, "fvs.safetensors", episodes)
    one_line(info, "mfv.load_vectors(path, model) reads it")


def test_an_unknown_split_names_the_valid_ones_and_the_closest(tmp_path):
    data = mfv.SyntheticData(data_dir=str(tmp_path), image_size=32, num_images={"test": 4})
    with pytest.raises(ConfigError) as info:
        data.sampler("tset")
    one_line(info, "no split 'tset'", "'train', 'val', 'test'", "did you mean 'test'?")
    with pytest.raises(ConfigError) as info:
        data.sampler("validation")
    one_line(info, "did you mean 'val'?")
    assert not any(tmp_path.iterdir())  # nothing generated for a misspelt split


def test_an_episode_index_past_the_split_is_refused_not_wrapped(sampler, tmp_path):
    last = sampler.episode(len(sampler) - 1, "zero_shot")
    with pytest.raises(IndexError) as info:
        sampler.episode(10**6, "zero_shot")
    one_line(info, "episode 1000000 out of range", f"has {len(sampler)} episodes", f"0..{len(sampler) - 1}")
    with pytest.raises(IndexError):
        sampler.episode(-1, "zero_shot")
    with pytest.raises(TypeError):
        sampler.episode("3", "zero_shot")
    with pytest.raises(DataError) as info:
        sampler.episode(0, "zero-shot")
    one_line(info, "unknown episode mode 'zero-shot'", "did you mean 'zero_shot'?")
    with pytest.raises(DataError) as info:
        sampler.episode(0, "clean", relation="beside")
    one_line(info, "relation 'beside'", "['above', 'below']")
    with pytest.raises(TypeError) as info:
        sampler.episode(0, "clean", shots="2")
    one_line(info, "shots must be an int >= 0")
    # The one legitimate cycle: extraction's prompt stream, past the queries on purpose.
    assert sampler.draw(2 * len(sampler) - 1, "zero_shot").query.question == last.query.question


def test_an_own_data_split_is_named_when_the_index_is_past_it(tmp_path):
    names = _photos(tmp_path, 6)
    rows = [{"image": n, "query": WORDS[i], "answer": WORDS[i + 1], "relation": "on", "split": s}
            for i, n in enumerate(names) for s in [("train", "test")[i % 2]]]
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = OwnRelationDataModule(data_dir=str(tmp_path), shots=1)
    test = data.sampler("test")
    with pytest.raises(IndexError) as info:
        test.episode(10**6, "zero_shot")
    one_line(info, f"the 'test' split has {len(test)} episodes")
    with pytest.raises(ConfigError) as info:
        data.sampler("novel")  # the file has none
    one_line(info, "no split 'novel'", "'train', 'val', 'test', 'eval'")


def test_extraction_still_takes_more_prompts_than_a_split_has(tiny_adapter, sampler, tmp_path):
    fvs = mfv.extract(tiny_adapter, sampler, k=2, layer=1, selection="pooled", num_mean_prompts=len(sampler) + 4,
                      num_aie_prompts=4, aie_filter="all", cache_dir=tmp_path, progress=False)
    assert fvs.relations == ["above", "below"] and torch.isfinite(fvs.stacked()).all()


@pytest.mark.parametrize("vector, layer, error, needles", [
    ("nan", 1, ConfigError, ("mfv.steer: vector holds", "NaN or inf")),
    ("inf", [0, 1], ConfigError, ("NaN or inf",)),
    ("narrow", 1, ConfigError, ("width 7", "hidden size 32")),
    ("ok", 7, ConfigError, ("layer=7 is out of range", "0..2")),
    ("ok", -1, ConfigError, ("layer=-1 is out of range",)),
    ("ok", "1", TypeError, ("layer='1' (str)",)),
    ("list", 1, TypeError, ("vector=", "(list)", "a torch.Tensor of width 32")),
])
def test_steer_refuses_a_bad_vector_or_layer_in_one_line(tiny_adapter, vector, layer, error, needles):
    width = tiny_adapter.hidden_size
    vectors = {"ok": torch.zeros(width), "narrow": torch.zeros(7), "list": [0.0] * width,
               "nan": torch.full((width,), float("nan")),
               "inf": torch.tensor([[float("inf")] * width, [0.0] * width])}
    with pytest.raises(error) as info:
        with mfv.steer(tiny_adapter, vectors[vector], layer=layer):
            pytest.fail("steered with a bad injection")
    one_line(info, *needles)


def test_a_refused_steer_leaves_the_model_unsteered(tiny_adapter, sampler):
    from mfv.steering import steered_logits

    batch = mfv.api.encode_episodes(tiny_adapter, [sampler.episode(0, "zero_shot")], ["above", "below"])
    before = steered_logits(tiny_adapter, batch.prompts, None)
    with pytest.raises(ConfigError):
        with mfv.steer(tiny_adapter, torch.full((tiny_adapter.hidden_size,), float("nan")), layer=1):
            pass
    assert torch.equal(steered_logits(tiny_adapter, batch.prompts, None), before)


def test_predict_with_a_wrong_type_is_one_line(tiny_adapter):
    with pytest.raises(TypeError) as info:
        mfv.predict(tiny_adapter, "data/api")
    one_line(info, "mfv.predict: episodes='data/api' (str)", "an mfv.Episode")
    with pytest.raises(TypeError) as info:
        mfv.predict("openflamingo-tiny", [])
    one_line(info, "mfv.predict: model='openflamingo-tiny' (str)", "mfv.load(")
