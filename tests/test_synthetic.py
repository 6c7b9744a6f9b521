"""The synthetic spatial-relation set: determinism, geometry, balance, prompts, errors."""

from __future__ import annotations

import json

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mfv.data.datamodule import SyntheticRelationDataModule
from mfv.data.episodes import EpisodeSampler, encode_episodes, read_scenes
from mfv.data.objects import builtin_library, folder_library
from mfv.data.synthetic import generate_split, min_distractor_distance, validate_relations
from mfv.errors import DataError


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def eval_split(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("syn"), "eval", 24, image_size=200, seed=3, workers=2, progress=False)


def test_same_arguments_give_identical_bytes(tmp_path, eval_split):
    again = generate_split(tmp_path, "eval", 24, image_size=200, seed=3, workers=1, progress=False)
    assert _digest(again) == _digest(eval_split)
    other = generate_split(tmp_path / "other", "eval", 24, image_size=200, seed=4, workers=1, progress=False)
    assert _digest(other) != _digest(eval_split)


def _boxes(table: pd.DataFrame, image_id: int) -> dict[str, np.ndarray]:
    rows = table[table.image_id == image_id]
    return {r.role: np.array([r.x0, r.y0, r.x1, r.y1]) for r in rows.itertuples()}


def test_neighbours_touch_the_anchor_on_their_side(eval_split):
    table = pd.read_parquet(eval_split / "metadata.parquet")
    for image_id in table.image_id.unique():
        b = _boxes(table, image_id)
        a = b["anchor"]
        assert b["above"][3] == a[1] and b["below"][1] == a[3]
        assert b["left"][2] == a[0] and b["right"][0] == a[2]
        # ... and overlap the anchor along the other axis (directly above, not diagonal).
        for role in ("above", "below"):
            assert b[role][0] < a[2] and b[role][2] > a[0]
        for role in ("left", "right"):
            assert b[role][1] < a[3] and b[role][3] > a[1]


def test_distractor_is_far_and_nothing_leaves_the_canvas(eval_split):
    table = pd.read_parquet(eval_split / "metadata.parquet")
    assert (table[["x0", "y0"]] >= 0).all().all() and (table[["x1", "y1"]] <= 200).all().all()
    for image_id in table.image_id.unique():
        b = _boxes(table, image_id)
        centre = lambda box: ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        dx, dy = centre(b["distractor"])
        for role, box in b.items():
            if role != "distractor":
                cx, cy = centre(box)
                # Boxes are rounded to pixels after placement: allow one pixel.
                assert np.hypot(dx - cx, dy - cy) >= min_distractor_distance(200) - 1


def test_relations_are_balanced(eval_split):
    table = pd.read_parquet(eval_split / "metadata.parquet")
    per_image = table.groupby("image_id").relation.first()
    assert per_image.value_counts().to_dict() == {"above": 6, "below": 6, "left": 6, "right": 6}
    assert list(per_image.iloc[:4]) == ["above", "below", "left", "right"]


def test_novel_split_uses_only_heldout_objects(tmp_path):
    split = generate_split(tmp_path, "novel", 12, image_size=160, workers=1, progress=False)
    names = set(pd.read_parquet(split / "metadata.parquet").name)
    library = builtin_library()
    assert names <= {o.name for o in library.heldout}
    assert not names & {o.name for o in library.train}


def test_composite_split_has_diagonal_neighbours(tmp_path):
    split = generate_split(tmp_path, "composite", 8, image_size=200, workers=1, progress=False)
    table = pd.read_parquet(split / "metadata.parquet")
    b = _boxes(table, 0)
    assert b["above-left"][2] == b["anchor"][0] and b["above-left"][3] == b["anchor"][1]
    assert b["below-right"][0] == b["anchor"][2] and b["below-right"][1] == b["anchor"][3]
    assert set(table.groupby("image_id").relation.first()) == {"above-left", "above-right", "below-left", "below-right"}


def test_builtin_library_sizes_and_distinct_names():
    library = builtin_library()
    assert len(library.train) >= 32 and len(library.heldout) >= 10
    names = library.names()
    assert len(set(names)) == len(names)


def test_prompts_are_in_the_papers_format(tiny_adapter, eval_split):
    scenes = read_scenes(eval_split)
    sampler = EpisodeSampler(scenes, ["above", "below", "left", "right"], shots=2, seed=0)
    clean = sampler.episode(1, "clean")
    prompt = tiny_adapter.build_prompt(clean.demonstrations, clean.query)
    d = clean.demonstrations
    assert prompt.text == (
        f"<image>Q:{d[0].question}. A:{d[0].answer}.<|endofchunk|>\n"
        f"<image>Q:{d[1].question}. A:{d[1].answer}.<|endofchunk|>\n"
        f"<image>Q:{clean.query.question}. A:"
    )
    assert clean.relation == "below" and clean.answer == scenes[1].neighbours["below"]
    zero = sampler.episode(1, "zero_shot")
    assert tiny_adapter.build_prompt(zero.demonstrations, zero.query).text == f"<image>Q:{scenes[1].anchor}. A:"
    corrupted = sampler.episode(1, "corrupted")
    assert corrupted.query.question == clean.query.question and corrupted.answer == clean.answer
    batch = encode_episodes(tiny_adapter, [clean, zero], sampler.relations)
    assert batch.answer_ids[0] == tiny_adapter.tokenizer.convert_tokens_to_ids(clean.answer)


def test_corrupted_labels_mix_relations(eval_split):
    sampler = EpisodeSampler(read_scenes(eval_split), ["above", "below", "left", "right"], shots=4, seed=0)
    for index in range(8):
        episode = sampler.episode(index, "corrupted")
        assert sorted(episode.demo_relations) == ["above", "below", "left", "right"]
        clean = sampler.episode(index, "clean")
        assert set(clean.demo_relations) == {clean.relation}
        # Same demonstration images and questions; only the labels differ.
        assert [d.question for d in episode.demonstrations] == [d.question for d in clean.demonstrations]


def test_datamodule_generates_caches_and_batches(tmp_path, tiny_adapter):
    dm = SyntheticRelationDataModule(
        data_dir=str(tmp_path), image_size=64, batch_size=4,
        num_images={"eval": 16, "train": 20, "test": 8, "novel": 8, "composite": 8},
    )
    dm.prepare_data()
    stamp = (dm.split_dir("train") / "metadata.parquet").stat().st_mtime_ns
    dm.prepare_data()
    assert (dm.split_dir("train") / "metadata.parquet").stat().st_mtime_ns == stamp
    dm.attach(tiny_adapter)
    batch = next(iter(dm.train_dataloader()))
    assert batch.prompts.pixel_values.shape[:3] == (4, 1, 1)
    assert len(dm.sampler("train")) + len(dm.sampler("val")) == 20
    clean = next(iter(dm.dataloader("eval", "clean", shots=3)))
    assert clean.prompts.pixel_values.shape[1] == 4


def _write_png(path: Path, colour: str = "red") -> None:
    Image.new("RGBA", (20, 10), colour).save(path)


def test_objects_folder_errors(tmp_path):
    folder = tmp_path / "objs"
    folder.mkdir()
    for name in ("apple", "ball", "cat"):
        _write_png(folder / f"{name}.png")
    with pytest.raises(DataError, match="has 3 training objects; this split needs at least 6"):
        folder_library(folder, 6)
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: not a PNG"):
        folder_library(folder, 1)
    (folder / "notes.txt").unlink()
    (folder / "dog.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="dog.png: unreadable image"):
        folder_library(folder, 1)


def test_objects_folder_generates(tmp_path):
    folder = tmp_path / "objs"
    folder.mkdir()
    for i, name in enumerate(["apple", "ball", "cat", "dog", "egg", "fish", "hat"]):
        _write_png(folder / f"{name}.png", colour=["red", "blue", "green", "black", "orange", "purple", "pink"][i])
    split = generate_split(tmp_path / "out", "eval", 4, image_size=160, objects=str(folder), workers=1, progress=False)
    assert set(pd.read_parquet(split / "metadata.parquet").name) <= {"apple", "ball", "cat", "dog", "egg", "fish", "hat"}


def test_photo_objects_orientation_from_opaque_box_and_fixed_size(tmp_path):
    folder = tmp_path / "objs"
    folder.mkdir()
    # A long object on a large transparent square canvas: only the opaque box says it is long.
    canvas = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    canvas.paste(Image.new("RGBA", (80, 20), "red"), (10, 40))
    canvas.save(folder / "pen.png")
    for i, name in enumerate(["apple", "ball", "cat", "dog", "egg", "fish"]):
        Image.new("RGBA", (30, 30), ["blue", "green", "black", "orange", "purple", "pink"][i]).save(folder / f"{name}.png")
    (folder / "sizes.json").write_text(json.dumps({"pen": 180}))
    library = folder_library(folder, 6)
    pen = next(s for s in library.train if s.name == "pen")
    assert pen.is_long and pen.aspect == pytest.approx(4.0) and pen.long_side == 180
    assert next(s for s in library.train if s.name == "apple").long_side == 200
    assert pen.render(100).size == (100, 25) and pen.render(100, rotate=True).size == (25, 100)
    split = generate_split(tmp_path / "out", "eval", 40, image_size=800, objects=str(folder), workers=1,
                           progress=False)
    table = pd.read_parquet(split / "metadata.parquet")
    pens = table[table.name == "pen"]
    vertical = pens[pens.role.isin(["above", "below"])]
    assert len(vertical) and ((vertical.y1 - vertical.y0) > (vertical.x1 - vertical.x0)).all()  # rotated
    long_sides = pens.apply(lambda r: max(r.x1 - r.x0, r.y1 - r.y0), axis=1)
    assert abs(long_sides.mean() - 180) < 12 and long_sides.std() < 15  # a fixed size plus sd-10 jitter


def test_canvas_too_small_and_unknown_relation(tmp_path):
    with pytest.raises(DataError, match="too small"):
        generate_split(tmp_path, "eval", 4, image_size=8, progress=False)
    with pytest.raises(DataError, match="unknown relation.*valid"):
        validate_relations(["above", "behind"])
    with pytest.raises(DataError, match="unknown split"):
        generate_split(tmp_path, "holdout", 4, progress=False)


def test_builtin_objects_have_distinct_first_tokens(tiny_adapter):
    from mfv.data.datamodule import first_token_clashes
    from mfv.models.openflamingo import random_openflamingo

    adapter = random_openflamingo(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=32)
    assert first_token_clashes(adapter, builtin_library().names()) == []
    # A tokenizer that knows only some names maps the others to <unk>: a clash is reported.
    assert first_token_clashes(tiny_adapter, ["apple", "zebra", "yak"]) == [["zebra", "yak"]]
