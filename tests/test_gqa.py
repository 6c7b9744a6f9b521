"""GQA preparation on scene graphs in GQA's real schema, written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mfv.data.gqa import (FilterSettings, GQARelationDataModule, iter_scene_graphs, normalise_relation, prepare,
                          resolve_relations)
from mfv.method.extraction import ExtractionSettings, cache_key
from mfv.errors import DataError


def obj(name, x, y, w, h, relations=()):
    return {"name": name, "x": x, "y": y, "w": w, "h": h, "attributes": [],
            "relations": [{"name": n, "object": o} for n, o in relations]}


def good_image(i: int, relation: str = "to the left of") -> dict:
    """100x100 image: three valid objects (10-25% area) and one subject->object relation."""
    return {"width": 100, "height": 100, "objects": {
        f"{i}a": obj("cat", 0, 0, 40, 40, [(relation, f"{i}b")]),
        f"{i}b": obj("dog", 50, 0, 40, 40, [("to the right of", f"{i}a")]),
        f"{i}c": obj("lamp", 0, 50, 30, 40),
    }}


def write(tmp_path: Path, graphs: dict, name="sg.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(graphs))
    return path


def images_for(tmp_path: Path, ids) -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for image_id in ids:
        Image.new("RGB", (100, 100), "white").save(folder / f"{image_id}.jpg")
    return folder


def test_stream_reader_equals_json_load(tmp_path):
    graphs = {f"n{i}": good_image(i) for i in range(50)}
    path = write(tmp_path, graphs)
    assert dict(iter_scene_graphs(path, chunk_size=64)) == graphs  # tiny chunks cross every boundary


def test_relation_names_are_normalised():
    assert normalise_relation("to the left of") == "left of"
    assert normalise_relation("To  the right of") == "right of"
    assert resolve_relations(["spatial"])[:4] == ["above", "below", "left of", "right of"]
    assert "riding" in resolve_relations(["agentic"])


def _summary(tmp_path, graphs, **settings):
    path = write(tmp_path, graphs)
    images = images_for(tmp_path, graphs)
    return prepare([path], images, ["spatial"], tmp_path / "out", FilterSettings(**settings), progress=False)


def test_every_filter_removes_what_it_should(tmp_path):
    graphs = {"ok": good_image(0)}
    too_few = good_image(1)
    del too_few["objects"]["1c"]
    graphs["few"] = too_few
    tiny = good_image(2)
    tiny["objects"]["2c"] = obj("lamp", 0, 50, 5, 5)  # 0.25% area: invalid, leaves 2 objects
    graphs["tiny"] = tiny
    duplicate = good_image(3)
    duplicate["objects"]["3c"]["name"] = "cat"
    graphs["dup"] = duplicate
    ambiguous = good_image(4)
    ambiguous["objects"]["4a"]["relations"].append({"name": "to the left of", "object": "4c"})
    graphs["amb"] = ambiguous
    no_relation = good_image(5, relation="wearing")
    no_relation["objects"]["5b"]["relations"] = []
    graphs["norel"] = no_relation
    blacklisted = good_image(6)
    blacklisted["objects"]["6c"]["name"] = "sky"
    graphs["sky"] = blacklisted
    summary = _summary(tmp_path, graphs)
    assert summary["removed_images"] == {"object_count": 3, "duplicate_names": 1,
                                         "ambiguous_subject_predicate": 1, "relation_count": 1}
    assert summary["images_with_tasks"] == 1 and summary["tasks"] == 2


def test_filters_are_configurable(tmp_path):
    graphs = {"ok": good_image(0)}
    dup = good_image(3)
    dup["objects"]["3c"]["name"] = "cat"
    graphs["dup"] = dup
    summary = _summary(tmp_path, graphs, unique_names=False)
    assert summary["images_with_tasks"] == 2


def test_split_is_balanced_image_disjoint_and_deterministic(tmp_path):
    from datasets import load_from_disk

    graphs = {f"l{i}": good_image(i) for i in range(20)}
    graphs.update({f"a{i}": good_image(100 + i, relation="above") for i in range(10)})
    path = write(tmp_path, graphs)
    images = images_for(tmp_path, graphs)
    first = prepare([path], images, ["spatial"], tmp_path / "one", seed=3, progress=False)
    second = prepare([path], images, ["spatial"], tmp_path / "two", seed=3, progress=False)
    assert first["tasks_per_relation"] == second["tasks_per_relation"] and first["split"] == "image_disjoint"
    per = first["tasks_per_relation"]
    for relation, total in (("left of", 20), ("above", 10), ("right of", 30)):
        assert per["train"][relation] + per["test"][relation] == total
        assert abs(per["train"][relation] - per["test"][relation]) <= 2, (relation, per)
    one, two = load_from_disk(str(tmp_path / "one/dataset")), load_from_disk(str(tmp_path / "two/dataset"))
    assert one["train"]["image_id"] == two["train"]["image_id"]
    assert not set(one["train"]["image_id"]) & set(one["test"]["image_id"])  # no image in both splits
    prepare([path], images, ["spatial"], tmp_path / "three", seed=4, progress=False)
    assert load_from_disk(str(tmp_path / "three/dataset"))["train"]["image_id"] != one["train"]["image_id"]
    per_relation = prepare([path], images, ["spatial"], tmp_path / "four", seed=3, progress=False, split="per_relation")
    assert per_relation["tasks_per_relation"]["train"]["left of"] == 10


def test_malformed_objects_and_missing_targets_are_counted(tmp_path, capsys):
    graphs = {f"n{i}": good_image(i) for i in range(3)}
    del graphs["n1"]["objects"]["1c"]["x"]  # an object without x
    graphs["n2"]["objects"]["2c"]["relations"] = [{"name": "above", "object": "no-such-id"}]
    summary = _summary(tmp_path, graphs)
    assert summary["malformed_entries"] == 1 and "n1" in summary["malformed_examples"][0]
    assert summary["malformed_by_kind"] == {"KeyError": 1}
    assert summary["removed_relations"] == {"missing_object": 1}
    assert summary["images_with_tasks"] == 2


SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "gqa-agentic-sample"


def _sample_images(tmp_path: Path) -> tuple[Path, Path]:
    graphs = json.loads((SAMPLE / "sceneGraphs.json").read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id, entry in graphs.items():
        Image.new("RGB", (int(entry["width"]), int(entry["height"])), "white").save(folder / f"{image_id}.jpg")
    return SAMPLE / "sceneGraphs.json", folder


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="the shared GQA sample is not next to this checkout")
def test_authors_released_sample_prepares_to_its_published_counts(tmp_path):
    graphs, images = _sample_images(tmp_path)
    released = prepare([graphs], images, ["agentic"], tmp_path / "released",
                       FilterSettings(min_objects=2, drop_ambiguous=False, blacklist=()), progress=False)
    assert (released["images_with_tasks"], released["tasks"]) == (373, 494)
    paper = prepare([graphs], images, ["agentic"], tmp_path / "paper", progress=False)
    assert (paper["images_with_tasks"], paper["tasks"]) == (281, 332)
    with pytest.warns(UserWarning, match="standing in"):
        dm = GQARelationDataModule(str(tmp_path / "paper"), relations=["agentic"], shots=4)
        sampler = dm.sampler("eval")
    assert "standing in" in sampler.skipped
    for index in range(len(sampler)):  # no relation aborts episode sampling; demos from distinct images
        for mode in ("clean", "corrupted"):
            episode = sampler.episode(index, mode)
            assert len(episode.demonstrations) == 4
    # Different filters over the same scene graphs: different data fingerprints, hence cache keys.
    other = GQARelationDataModule(str(tmp_path / "released"), relations=["agentic"], shots=4)
    assert dm.fingerprint("eval") != other.fingerprint("eval")


def test_missing_images_are_skipped_and_counted(tmp_path, capsys):
    graphs = {f"n{i}": good_image(i) for i in range(4)}
    path = write(tmp_path, graphs)
    images = images_for(tmp_path, ["n0", "n1"])
    summary = prepare([path], images, ["spatial"], tmp_path / "out", progress=False)
    assert summary["missing_images"] == 2 and summary["images_with_tasks"] == 2
    assert capsys.readouterr().err.count("have no file") == 1


def test_malformed_entry_is_reported_with_its_id(tmp_path, capsys):
    graphs = {"n0": good_image(0), "broken42": {"width": 100, "objects": {"x": {"name": "cat"}}}}
    summary = _summary(tmp_path, graphs)
    assert summary["malformed_entries"] == 1 and "broken42" in summary["malformed_examples"][0]
    assert "broken42" in capsys.readouterr().err


def test_empty_result_says_which_filter_removed_what(tmp_path):
    graphs = {"dup": good_image(0)}
    graphs["dup"]["objects"]["0c"]["name"] = "cat"
    with pytest.raises(DataError, match="duplicate_names 1"):
        _summary(tmp_path, graphs)


def test_invalid_json_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"n0": {"width": 100,')
    with pytest.raises(DataError, match="bad.json"):
        list(iter_scene_graphs(path))


def test_datamodule_episodes(tmp_path, tiny_adapter):
    graphs = {f"l{i}": good_image(i) for i in range(12)}
    graphs.update({f"a{i}": good_image(100 + i, relation="above") for i in range(12)})
    path = write(tmp_path, graphs)
    images = images_for(tmp_path, graphs)
    prepare([path], images, ["left of", "above"], tmp_path / "gqa", progress=False)
    dm = GQARelationDataModule(str(tmp_path / "gqa"), relations=["left of", "above"], shots=2, batch_size=4)
    dm.prepare_data()
    dm.attach(tiny_adapter)
    sampler = dm.sampler("test")
    clean = sampler.episode(0, "clean")
    prompt = tiny_adapter.build_prompt(clean.demonstrations, clean.query)
    assert prompt.text.endswith(f"<image>Q:{clean.query.question}. A:") and prompt.text.count("<image>") == 3
    assert set(clean.demo_relations) == {clean.relation}
    corrupted = sampler.episode(0, "corrupted")
    assert sorted(corrupted.demo_relations) == ["above", "left of"]
    batch = next(iter(dm.dataloader("test", "clean")))
    assert batch.prompts.pixel_values.shape[1] == 3


def test_episodes_use_distinct_images_other_than_the_query(tmp_path):
    graphs = {f"l{i}": good_image(i) for i in range(8)}
    graphs.update({f"a{i}": good_image(100 + i, relation="above") for i in range(8)})
    folder = tmp_path / "images"
    folder.mkdir()
    for number, image_id in enumerate(graphs):  # a colour per image, so images can be told apart
        Image.new("RGB", (100, 100), (10 * number, 0, 0)).save(folder / f"{image_id}.png")
    prepare([write(tmp_path, graphs)], folder, ["left of", "above"], tmp_path / "gqa", progress=False,
            image_ext=".png")
    dm = GQARelationDataModule(str(tmp_path / "gqa"), relations=["left of", "above"], shots=3, val_fraction=0.0)
    sampler = dm.sampler("train")
    for index in range(len(sampler)):
        for mode in ("clean", "corrupted", "shuffled"):
            episode = sampler.episode(index, mode)
            colours = [e.image.getpixel((0, 0)) for e in (*episode.demonstrations, episode.query)]
            assert len(set(colours)) == 4, (index, mode, colours)


def test_two_gqa_preparations_get_different_cache_keys(tmp_path, tiny_adapter):
    graphs = {f"l{i}": good_image(i) for i in range(12)}
    graphs.update({f"a{i}": good_image(100 + i, relation="above") for i in range(12)})
    graphs["a0"]["objects"]["100c"]["w"] = 8  # 3% of the image: only a looser min-area keeps it valid
    path, images = write(tmp_path, graphs), images_for(tmp_path, graphs)
    prepare([path], images, ["left of", "above"], tmp_path / "strict", progress=False)
    prepare([path], images, ["left of", "above"], tmp_path / "loose", FilterSettings(min_area=0.01), progress=False)
    keys = set()
    for name in ("strict", "loose"):
        dm = GQARelationDataModule(str(tmp_path / name), relations=["left of", "above"], shots=2)
        settings = ExtractionSettings(relations=dm.relations, shots=2)
        keys.add(cache_key(tiny_adapter, settings, dm.fingerprint("eval")))
    assert len(keys) == 2
