"""Your own data: the README block, the reader's one-line refusals, deterministic episodes and
splits, the CLI selecting the DataModule, and GQA attributes from the shared scene graphs."""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mfv.data.own import OwnRelationDataModule, read_examples
from mfv.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "gqa-agentic-sample"
RELATIONS = ("above", "below", "left", "right")


def make_folder(root: Path, images: int = 24, seed: int = 0, split: bool = False) -> list[dict]:
    """A folder of small images and ``examples.jsonl``: per image one example per relation,
    named with the organism's object names (its tokenizer knows only those)."""
    from mfv.data.objects import builtin_library

    (root / "photos").mkdir(parents=True, exist_ok=True)
    names = builtin_library().names()[:12]
    rng = random.Random(seed)
    rows = []
    for i in range(images):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle([8 + i % 20, 8, 40, 40 + i % 16], fill=(10 * i % 255, 80, 160))
        image.save(root / "photos" / f"{i:03d}.png")
        anchor, *others = rng.sample(names, 1 + len(RELATIONS))
        for relation, answer in zip(RELATIONS, others):
            row = {"image": f"photos/{i:03d}.png", "query": anchor, "answer": answer, "relation": relation}
            if split:
                row["split"] = "test" if i % 4 == 0 else "train"
            rows.append(row)
    write_jsonl(root / "examples.jsonl", rows)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _readme_block() -> str:
    section = (ROOT / "docs" / "data.md").read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_block_runs_on_a_generated_folder(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "my_data")
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_block(), "docs/data.md", "exec"), namespace)
    assert "expected" in capsys.readouterr().out
    conditions = namespace["result"].to_dict()["conditions"]
    assert {"zero_shot", "zero_shot_fv", "icl_1"} <= set(conditions)
    assert conditions["zero_shot_fv"]["n"] == len(namespace["data"].sampler("test"))


BAD = [  # (rows or text, line, what the message must name)
    ([{"image": "photos/000.png", "answer": "cat", "relation": "above"}], 1, "field 'query' missing"),
    ([{"image": "photos/nope.png", "query": "a", "answer": "b", "relation": "above"}], 1, "field 'image': "
                                                                                           "photos/nope.png not found"),
    ([{"image": "photos/000.png", "query": " ", "answer": "b", "relation": "above"}], 1, "field 'query' is empty"),
    ([{"image": "photos/000.png", "query": "a", "answer": "b", "relation": "above"}] * 2, 2,
     "fields 'image', 'query', 'relation' repeat line 1"),
    ([{"image": ["photos/000.png", "photos/001.png"], "query": "a", "answer": "b", "relation": "above"}], 1,
     "field 'image' is a list of 2"),
    ([{"image": "photos/000.png", "query": "a", "answer": 7, "relation": "above"}], 1, "field 'answer' must be text"),
    ([{"image": "photos/000.png", "query": "a", "answer": "b", "relation": "above", "split": "dev"}], 1,
     "field 'split' is 'dev'"),
    ([{"image": "photos/000.png", "query": "a", "answer": "b", "relation": "above", "split": "train"},
      {"image": "photos/001.png", "query": "a", "answer": "b", "relation": "above"}], 2, "field 'split' missing"),
    ('{"image": "photos/000.png", "query": "a", "answer": "b", "relation": "above"}\n{"image": \n', 2,
     "not a JSON object"),
]


@pytest.mark.parametrize("rows, line, named", BAD, ids=[b[2][:30] for b in BAD])
def test_reader_refuses_bad_input_with_one_line_naming_file_line_and_field(tmp_path, rows, line, named):
    make_folder(tmp_path, images=2)
    path = tmp_path / "examples.jsonl"
    path.write_text(rows) if isinstance(rows, str) else write_jsonl(path, rows)
    with pytest.raises(DataError) as caught:
        read_examples(path, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}:{line}: ") and named in message, message


def test_csv_is_read_as_jsonl_and_a_missing_column_is_named(tmp_path):
    rows = make_folder(tmp_path, images=3)
    header = "image,query,answer,task\n"
    (tmp_path / "examples.csv").write_text(header + "".join(f"{r['image']},{r['query']},{r['answer']},"
                                                            f"{r['relation']}\n" for r in rows))
    from_csv = read_examples(tmp_path / "examples.csv", tmp_path)
    from_jsonl = read_examples(tmp_path / "examples.jsonl", tmp_path)
    assert [(e.image_path, e.query, e.answer, e.relation) for e in from_csv] == \
           [(e.image_path, e.query, e.answer, e.relation) for e in from_jsonl]
    assert from_csv[1].line == 3  # the header is line 1
    (tmp_path / "bad.csv").write_text("image,answer,relation\nphotos/000.png,b,above\n")
    with pytest.raises(DataError, match=r"bad.csv:1: field 'query': no such column"):
        read_examples(tmp_path / "bad.csv", tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no examples"):
        read_examples(tmp_path / "empty.jsonl", tmp_path)


def test_unknown_relation_and_undecodable_image_are_named(tmp_path):
    make_folder(tmp_path, images=6)
    with pytest.raises(DataError, match=r"examples.jsonl: data.init_args.relations has 'beside', which no example "
                                        r"has in field 'relation'"):
        OwnRelationDataModule(str(tmp_path), relations=["above", "beside"], shots=1)
    (tmp_path / "photos" / "002.png").write_bytes(b"not a png")
    data = OwnRelationDataModule(str(tmp_path), relations=["above"], shots=1)
    with pytest.raises(DataError, match=r"examples.jsonl:9: field 'image': photos/002.png does not decode"):
        data.prepare_data()


def _episodes(data: OwnRelationDataModule, split: str) -> list:
    sampler = data.sampler(split)
    out = []
    for index in range(min(len(sampler), 12)):
        for mode in ("clean", "zero_shot", "corrupted", "shuffled"):
            e = sampler.episode(index, mode)
            out.append((e.relation, e.answer, e.query.question, e.query.image.tobytes(), e.demo_relations,
                        [(d.question, d.answer, d.image.tobytes()) for d in e.demonstrations]))
    return out


def test_datamodule_is_deterministic_image_disjoint_and_content_addressed(tmp_path):
    make_folder(tmp_path, images=30)
    first, second = (OwnRelationDataModule(str(tmp_path), shots=2, seed=3) for _ in range(2))
    assert first.relations == list(RELATIONS)
    images = {s: {e.image_path for e in first.splits[s]} for s in ("train", "val", "test")}
    assert not (images["train"] & images["test"] or images["train"] & images["val"] or images["val"] & images["test"])
    assert {e.image_path for e in first.splits["eval"]} == images["train"] | images["val"]
    assert all({e.relation for e in first.splits[s]} == set(RELATIONS) for s in ("val", "test"))
    for split in ("eval", "train", "val", "test"):
        assert _episodes(first, split) == _episodes(second, split)
        assert first.fingerprint(split) == second.fingerprint(split)
    episode = first.sampler("eval").episode(0, "clean")
    shown = [d.image.tobytes() for d in episode.demonstrations] + [episode.query.image.tobytes()]
    assert len(set(shown)) == 3  # each demonstration from another image, never the query's
    assert OwnRelationDataModule(str(tmp_path), shots=2, split_seed=1).splits["test"] != first.splits["test"]
    before = first.fingerprint("test")
    Image.new("RGB", (64, 64), "black").save(sorted(images["test"])[0])  # same path, other bytes
    assert OwnRelationDataModule(str(tmp_path), shots=2, seed=3).fingerprint("test") != before


def test_split_field_is_followed(tmp_path):
    make_folder(tmp_path, images=24, split=True)
    data = OwnRelationDataModule(str(tmp_path), shots=2, val_fraction=0.25)
    assert {e.split for e in data.splits["test"]} == {"test"} and len(data.splits["test"]) == 6 * 4
    assert {e.split for e in data.splits["train"] + data.splits["val"]} == {"train"}
    assert len(data.splits["eval"]) == 18 * 4 and not data.has_split("novel")
    rows = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "examples.jsonl", [{**r, "split": "train"} for r in rows])
    with pytest.raises(DataError, match="field 'split': no example has split 'test'"):
        OwnRelationDataModule(str(tmp_path), shots=2)


def test_train_cli_selects_the_datamodule_by_class_path(tmp_path, monkeypatch, capsys):
    from mfv.commands.train import FunctionVectorCLI, build_cli

    make_folder(tmp_path / "my_data")
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "own_data_example.yaml")
    cli = build_cli(FunctionVectorCLI, ["--config", config, "--data.init_args.data_dir", "my_data",
                                         "--trainer.logger", "false"])
    assert isinstance(cli.datamodule, OwnRelationDataModule) and cli.datamodule.relations == list(RELATIONS)
    with pytest.raises(SystemExit) as exit_:
        build_cli(FunctionVectorCLI, ["--config", config, "--data.init_args.data_dir", "my_data",
                             "--model.relations", "[above,beside]"])
    err = capsys.readouterr().err.strip().splitlines()
    # train.py names the field the user sets (model.relations, linked to data.init_args.relations).
    assert exit_.value.code == 2 and len(err) == 1 and "examples.jsonl: model.relations has 'beside'" in err[0]


def test_prepare_data_names_an_undecodable_image_in_one_line(tmp_path, monkeypatch, capsys):
    from mfv import cli

    make_folder(tmp_path / "my_data", images=24)  # prepare-data reads every split as train would (2-shot val)
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "own_data_example.yaml")
    cli.main(["prepare-data", "--config", config, "--data.init_args.data_dir", "my_data"])
    assert "data ready: my_data" in capsys.readouterr().out
    (tmp_path / "my_data" / "photos" / "001.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare-data", "--config", config, "--data.init_args.data_dir", "my_data"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and err == ["error: my_data/examples.jsonl:5: field 'image': photos/001.png empty file"]


# --------------------------------------------------------------------------- GQA attributes


def test_attribute_tasks_from_a_scene_graph(tmp_path):
    from mfv.data.gqa import prepare, resolve_relations

    assert resolve_relations(["attributes", "color of"]) == ["colour of", "material of"]
    objects = {"a": {"name": "car", "x": 0, "y": 0, "w": 40, "h": 40, "attributes": ["Red", "shiny"], "relations": []},
               "b": {"name": "table", "x": 50, "y": 0, "w": 40, "h": 40, "attributes": ["wooden", "brown", "white"],
                     "relations": []},
               "c": {"name": "lamp", "x": 0, "y": 50, "w": 30, "h": 40, "attributes": [], "relations": []}}
    graphs = {f"g{i}": {"width": 100, "height": 100, "objects": objects} for i in range(4)}
    (tmp_path / "images").mkdir()
    for image_id in graphs:
        Image.new("RGB", (100, 100), "white").save(tmp_path / "images" / f"{image_id}.jpg")
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(graphs))
    summary = prepare([path], tmp_path / "images", ["attributes"], tmp_path / "out", progress=False)
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "out" / "dataset"))
    tasks = {(t["relation"], t["subject"], t["object"]) for part in data.values() for t in part}
    # The table has two colours: no colour task for it (ambiguous), its material stays.
    assert tasks == {("colour of", "car", "red"), ("material of", "table", "wooden")}
    assert summary["removed_relations"] == {"ambiguous_attribute": 4} and summary["objects_with_attributes"] == 8


@pytest.fixture(scope="module")
def gqa_sample(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The shared scene graphs and blank images of their sizes (never copied into the project)."""
    graphs = json.loads((SAMPLE / "sceneGraphs.json").read_text())
    folder = tmp_path_factory.mktemp("gqa") / "images"
    folder.mkdir()
    for image_id, entry in graphs.items():
        Image.new("RGB", (int(entry["width"]), int(entry["height"])), "white").save(folder / f"{image_id}.jpg")
    return SAMPLE / "sceneGraphs.json", folder, graphs


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="the shared GQA sample is not next to this checkout")
def test_gqa_attributes_build_from_the_shared_scene_graphs(gqa_sample, tmp_path):
    from mfv.data.gqa import GQARelationDataModule, prepare
    from mfv.data.gqa.attributes import COLOURS, MATERIALS

    path, images, graphs = gqa_sample
    # The sample's objects carry no attributes (its README): the refusal says so.
    with pytest.raises(DataError, match="no object has a colour or material attribute"):
        prepare([path], images, ["attributes"], tmp_path / "none", progress=False)
    for entry in graphs.values():  # GQA's full scene graphs list attributes: give each object one of each
        for object_id, obj in entry["objects"].items():
            h = zlib.crc32(object_id.encode())
            obj["attributes"] = [COLOURS[h % 8], MATERIALS[h // 8 % 6], "large"]
    (tmp_path / "sg.json").write_text(json.dumps(graphs))
    summary = prepare([tmp_path / "sg.json"], images, ["attributes"], tmp_path / "out", progress=False)
    train = summary["tasks_per_relation"]["train"]
    assert set(train) == {"colour of", "material of"} and train["colour of"] == train["material of"] > 100
    data = GQARelationDataModule(str(tmp_path / "out"), relations=["attributes"], shots=4)
    assert data.relations == ["colour of", "material of"]
    sampler = data.sampler("eval")
    for index in range(4):
        episode = sampler.episode(index, "clean")
        vocabulary = COLOURS if episode.relation == "colour of" else MATERIALS
        assert episode.answer in vocabulary and all(d.answer in vocabulary for d in episode.demonstrations)
        assert set(sampler.episode(index, "corrupted").demo_relations) == {"colour of", "material of"}
