"""GQA relation set: scene-graph filtering, a relation-balanced split, episodes, DataModule.

    python -m mfv.data.gqa prepare --scene-graphs train_sceneGraphs.json val_sceneGraphs.json \\
        --images gqa/images --relations spatial --out data/gqa

Scene graphs are read as a stream (one image entry at a time), so GQA's full train file
(~75k images, hundreds of MB) prepares in bounded memory. Filters (each configurable):
object area 5-50% of the image; 3-30 valid objects; 1-15 matching relations; no duplicate
object names; no subject with the same predicate towards several objects; a blacklist
of names. Relation names are normalised ("to the left of" -> "left of"). The output is a
Hugging Face ``datasets`` DatasetDict (train/test, 50/50 per relation, seeded) plus
``summary.json`` (tasks per relation, what each filter removed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mfv.data.datamodule import RelationDataModule, hash_files, split_seed
from mfv.data.episodes import Episode, EpisodeSampler, Mode, Scene
from mfv.errors import DataError
from mfv.models.base import Example

SPATIAL = ("above", "below", "left of", "right of", "next to", "behind", "in front of")
AGENTIC = ("wearing", "holding", "carrying", "sitting on", "standing on", "standing in", "riding")
RELATION_SETS = {"spatial": SPATIAL, "agentic": AGENTIC}
RENAMES = {"to the left of": "left of", "to the right of": "right of", "on the left of": "left of",
           "on the right of": "right of"}
BLACKLIST = ("sky", "wall", "floor", "ceiling", "building", "trees", "grass", "ocean", "water", "fence", "bush",
             "neck", "hair", "legs", "rocks", "bushes", "clouds", "cloud", "sun", "stars", "cars", "leaves",
             "fingers", "hand", "arm")


@dataclass
class FilterSettings:
    """The paper's filters; every bound is configurable."""

    min_area: float = 0.05
    max_area: float = 0.50
    min_objects: int = 3
    max_objects: int = 30
    min_relations: int = 1
    max_relations: int = 15
    unique_names: bool = True
    drop_ambiguous: bool = True
    blacklist: tuple[str, ...] = BLACKLIST


def normalise_relation(name: str) -> str:
    name = " ".join(name.strip().lower().split())
    return RENAMES.get(name, name)


def resolve_relations(names: Sequence[str]) -> list[str]:
    """``spatial``/``agentic`` expand to their sets; other names are taken as given."""
    relations: list[str] = []
    for name in names:
        for relation in RELATION_SETS.get(name, (normalise_relation(name),)):
            if relation not in relations:
                relations.append(relation)
    return relations


def iter_scene_graphs(path: str | Path, chunk_size: int = 1 << 22) -> Iterator[tuple[str, Any]]:
    """Streams ``(image_id, entry)`` pairs of a top-level JSON object without loading it whole."""
    decoder = json.JSONDecoder()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"scene-graph file {path} not found")
    with path.open("r", encoding="utf-8") as handle:
        buffer = handle.read(chunk_size)
        position = 0
        eof = False

        def ensure(n: int) -> None:
            nonlocal buffer, position, eof
            while not eof and len(buffer) - position < n:
                more = handle.read(chunk_size)
                if not more:
                    eof = True
                    break
                buffer = buffer[position:] + more
                position = 0

        def skip_space() -> None:
            nonlocal position
            while True:
                ensure(1)
                while position < len(buffer) and buffer[position] in " \t\r\n,":
                    position += 1
                if position < len(buffer) or eof:
                    return

        def decode() -> Any:
            nonlocal buffer, position, eof
            while True:
                try:
                    value, end = decoder.raw_decode(buffer, position)
                    # A number or literal may be cut at the buffer's end: make sure it is whole.
                    if end == len(buffer) and not eof:
                        raise json.JSONDecodeError("partial", buffer, end)
                    position = end
                    return value
                except json.JSONDecodeError as exc:
                    if eof:
                        raise DataError(f"{path}: malformed JSON near character {exc.pos}: {exc.msg}") from exc
                    more = handle.read(chunk_size)
                    if not more:
                        eof = True
                    buffer = buffer[position:] + more
                    position = 0

        skip_space()
        if position >= len(buffer) or buffer[position] != "{":
            raise DataError(f"{path}: expected a JSON object of scene graphs keyed by image id")
        position += 1
        while True:
            skip_space()
            if position < len(buffer) and buffer[position] == "}":
                return
            key = decode()
            skip_space()
            if position >= len(buffer) or buffer[position] != ":":
                raise DataError(f"{path}: malformed JSON after key {key!r}")
            position += 1
            skip_space()
            yield str(key), decode()


@dataclass
class PrepareReport:
    """What the filters did, for the summary."""

    images_seen: int = 0
    removed: Counter = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    missing_images: int = 0


def _valid_objects(entry: dict, settings: FilterSettings) -> dict[str, dict]:
    area = float(entry["width"]) * float(entry["height"])
    valid = {}
    for object_id, obj in entry["objects"].items():
        ratio = float(obj["w"]) * float(obj["h"]) / area
        name = str(obj["name"]).strip().lower()
        if settings.min_area <= ratio <= settings.max_area and name not in settings.blacklist:
            valid[object_id] = obj
    return valid


def tasks_of_image(
    image_id: str, entry: dict, relations: set[str], settings: FilterSettings, report: PrepareReport
) -> list[dict]:
    """The (subject, relation, object) tasks an image contributes, after every filter."""
    try:
        valid = _valid_objects(entry, settings)
        names = [str(o["name"]).strip().lower() for o in valid.values()]
        if not settings.min_objects <= len(valid) <= settings.max_objects:
            report.removed["object_count"] += 1
            return []
        if settings.unique_names and len(set(names)) != len(names):
            report.removed["duplicate_names"] += 1
            return []
        triples = []
        for subject_id, subject in valid.items():
            for relation in subject.get("relations", []):
                predicate = normalise_relation(relation["name"])
                if predicate in relations and relation["object"] in valid:
                    triples.append((subject_id, predicate, relation["object"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        report.malformed.append(f"{image_id} ({type(exc).__name__}: {exc})")
        return []
    triples = sorted(set(triples))
    if not settings.min_relations <= len(triples) <= settings.max_relations:
        report.removed["relation_count"] += 1
        return []
    if settings.drop_ambiguous:
        counts = Counter((s, p) for s, p, _ in triples)
        if any(c > 1 for c in counts.values()):
            report.removed["ambiguous_subject_predicate"] += 1
            return []
    tasks = []
    for subject_id, predicate, object_id in triples:
        subject, obj = valid[subject_id], valid[object_id]
        tasks.append({
            "image_id": image_id,
            "relation": predicate,
            "subject": str(subject["name"]).strip().lower(),
            "object": str(obj["name"]).strip().lower(),
            "subject_box": [float(subject[k]) for k in ("x", "y", "w", "h")],
            "object_box": [float(obj[k]) for k in ("x", "y", "w", "h")],
            "width": int(entry["width"]),
            "height": int(entry["height"]),
        })
    return tasks


def balanced_split(tasks: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """50/50 per relation, seeded; images never straddle the split within a relation."""
    by_relation: dict[str, list[dict]] = defaultdict(list)
    for task in tasks:
        by_relation[task["relation"]].append(task)
    train, test = [], []
    for relation in sorted(by_relation):
        items = sorted(by_relation[relation], key=lambda t: (t["image_id"], t["subject"], t["object"]))
        images = sorted({t["image_id"] for t in items})
        random.Random(f"{seed}:{relation}").shuffle(images)
        train_images = set(images[: (len(images) + 1) // 2])
        for task in items:
            (train if task["image_id"] in train_images else test).append(task)
    return train, test


def prepare(
    scene_graphs: Sequence[str | Path],
    images: str | Path,
    relations: Sequence[str],
    out: str | Path,
    settings: FilterSettings | None = None,
    seed: int = 0,
    image_ext: str = ".jpg",
    progress: bool = True,
) -> dict[str, Any]:
    """Filters scene graphs into tasks and writes the split dataset and its summary.

    Raises:
        DataError: unreadable input, or nothing left after filtering (the message says
        which filter removed what).
    """
    from datasets import Dataset, DatasetDict
    from tqdm.auto import tqdm

    settings = settings or FilterSettings()
    wanted = set(resolve_relations(relations))
    report = PrepareReport()
    images = Path(images)
    tasks: list[dict] = []
    for file in scene_graphs:
        for image_id, entry in tqdm(iter_scene_graphs(file), desc=Path(file).name, disable=not progress, unit="img"):
            report.images_seen += 1
            found = tasks_of_image(image_id, entry, wanted, settings, report)
            if not found:
                continue
            path = images / f"{image_id}{image_ext}"
            if not path.is_file():
                report.missing_images += 1
                continue
            for task in found:
                task["image_path"] = str(path)
            tasks.extend(found)
    if report.malformed:
        print(f"warning: {len(report.malformed)} malformed scene-graph entries skipped, e.g. "
              f"{report.malformed[:3]}", file=sys.stderr)
    if report.missing_images:
        print(f"warning: {report.missing_images} images with tasks have no file in {images}; skipped", file=sys.stderr)
    if not tasks:
        raise DataError(
            f"no task left after filtering {report.images_seen} images for relations {sorted(wanted)}: "
            f"removed by object_count {report.removed['object_count']}, duplicate_names "
            f"{report.removed['duplicate_names']}, relation_count {report.removed['relation_count']}, "
            f"ambiguous_subject_predicate {report.removed['ambiguous_subject_predicate']}; "
            f"{report.missing_images} had no image file, {len(report.malformed)} were malformed"
        )
    train, test = balanced_split(tasks, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(str(out / "dataset"))
    summary = {
        "images_seen": report.images_seen,
        "tasks": len(tasks),
        "images_with_tasks": len({t["image_id"] for t in tasks}),
        "tasks_per_relation": {split: dict(Counter(t["relation"] for t in part)) for split, part in
                               (("train", train), ("test", test))},
        "removed_images": dict(report.removed),
        "missing_images": report.missing_images,
        "malformed_entries": len(report.malformed),
        "malformed_examples": report.malformed[:20],
        "relations": sorted(wanted),
        "filters": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "seed": seed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----- episodes and DataModule ---------------------------------------------------------

def scenes_of(rows: Sequence[dict]) -> list[Scene]:
    """One scene per task: the subject is the anchor, the relation's object the answer."""
    return [Scene(r["image_path"], r["subject"], {r["relation"]: r["object"]}, r["relation"]) for r in rows]


class GQAEpisodeSampler(EpisodeSampler):
    """Episodes over GQA tasks: demonstrations come from other images of the same relation;
    corrupted prompts take each demonstration from a different relation."""

    def __init__(self, scenes, relations, shots=4, seed=0, demo_scenes=None) -> None:
        super().__init__(scenes, relations, shots, seed, demo_scenes)
        self.by_relation: dict[str, list[Scene]] = defaultdict(list)
        for scene in self.demo_pool:
            self.by_relation[scene.relation].append(scene)

    def episode(self, index: int, mode: Mode = "clean", shots: int | None = None, relation: str | None = None) -> Episode:
        shots = self.shots if shots is None else shots
        query = self.queries[index % len(self.queries)]
        relation = relation or query.relation
        rng = np.random.default_rng([self.seed, index])
        demos, labels = [], []
        if mode != "zero_shot":
            if mode == "clean":
                labels = [relation] * shots
            else:  # corrupted / shuffled: labels from mixed relations
                present = [r for r in self.relations if self.by_relation.get(r)]
                labels = [present[i % len(present)] for i in rng.permutation(max(shots, len(present)))][:shots]
            for label in labels:
                pool = [s for s in self.by_relation.get(label, []) if s.image_path != query.image_path]
                if not pool:
                    raise DataError(f"no demonstration image for relation {label!r} other than the query's")
                scene = pool[int(rng.integers(len(pool)))]
                demos.append(Example(scene.load_image(), scene.anchor, scene.neighbours[label]))
        return Episode(relation, tuple(demos), Example(query.load_image(), query.anchor),
                       query.neighbours[relation], mode, tuple(labels))


class GQARelationDataModule(RelationDataModule):
    """Batches of GQA relation episodes, images loaded lazily with the adapter's preprocessing.

    Args:
        dataset_dir: Output folder of ``python -m mfv.data.gqa prepare``.
        relations: Relations to use (``spatial``, ``agentic`` or names).
        shots: Demonstrations per N-shot prompt.
        batch_size: Prompts per batch.
        num_workers: DataLoader workers.
        seed: Episode seed.
        val_fraction: Part of the train split held out to pick the best epoch.
    """

    def __init__(self, dataset_dir: str = "data/gqa", relations: Sequence[str] = ("spatial",), shots: int = 4,
                 batch_size: int = 16, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.2,
                 shuffle_train: bool = True) -> None:
        super().__init__()
        self.dataset_dir = Path(dataset_dir)
        self.relations = resolve_relations(relations)
        self.shots, self.batch_size, self.num_workers = shots, batch_size, num_workers
        self.seed, self.val_fraction, self.shuffle_train = seed, val_fraction, shuffle_train
        self._samplers: dict[str, GQAEpisodeSampler] = {}

    def has_split(self, split: str) -> bool:
        return split in ("train", "val", "test", "eval")

    def split_dir(self, split: str) -> Path:
        return self.dataset_dir / "dataset"

    def fingerprint(self, split: str) -> str:
        """Hash of the prepared task table the split is drawn from (any other filter or
        seed at prepare time gives other bytes) and how ``val`` is cut."""
        source = "test" if split == "test" else "train"
        files = [p for p in (self.dataset_dir / "dataset" / source).iterdir() if p.is_file()]
        if not files:
            raise DataError(f"{self.dataset_dir}/dataset/{source} is empty: run `python -m mfv.data.gqa prepare` again")
        return hash_files(files, split, self.val_fraction)

    def prepare_data(self) -> None:
        if not (self.dataset_dir / "dataset").is_dir():
            raise DataError(f"{self.dataset_dir}/dataset not found: run `python -m mfv.data.gqa prepare ...` first")

    def sampler(self, split: str) -> GQAEpisodeSampler:
        if split not in self._samplers:
            from datasets import load_from_disk

            data = load_from_disk(str(self.dataset_dir / "dataset"))
            source = "test" if split == "test" else "train"
            rows = [r for r in data[source] if r["relation"] in self.relations]
            missing = sorted(set(self.relations) - {r["relation"] for r in rows})
            if missing:
                raise DataError(f"{self.dataset_dir}: no {source} task for relation(s) {missing}")
            scenes = scenes_of(rows)
            if split in ("train", "val"):
                order = sorted(range(len(scenes)), key=lambda i: zlib.crc32(scenes[i].image_path.encode()))
                cut = int(len(order) * (1 - self.val_fraction))
                scenes = [scenes[i] for i in (order[:cut] if split == "train" else order[cut:])]
            self._samplers[split] = GQAEpisodeSampler(scenes, self.relations, self.shots,
                                                      seed=split_seed(self.seed, split))
        return self._samplers[split]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mfv.data.gqa")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="filter scene graphs and write the split dataset")
    prep.add_argument("--scene-graphs", nargs="+", required=True)
    prep.add_argument("--images", required=True)
    prep.add_argument("--relations", nargs="+", default=["spatial"])
    prep.add_argument("--out", required=True)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--image-ext", default=".jpg")
    defaults = FilterSettings()
    prep.add_argument("--min-area", type=float, default=defaults.min_area)
    prep.add_argument("--max-area", type=float, default=defaults.max_area)
    prep.add_argument("--min-objects", type=int, default=defaults.min_objects)
    prep.add_argument("--max-objects", type=int, default=defaults.max_objects)
    prep.add_argument("--min-relations", type=int, default=defaults.min_relations)
    prep.add_argument("--max-relations", type=int, default=defaults.max_relations)
    prep.add_argument("--allow-duplicate-names", action="store_true")
    prep.add_argument("--keep-ambiguous", action="store_true")
    prep.add_argument("--blacklist", nargs="*", default=list(BLACKLIST))
    args = parser.parse_args(argv)
    settings = FilterSettings(args.min_area, args.max_area, args.min_objects, args.max_objects, args.min_relations,
                              args.max_relations, not args.allow_duplicate_names, not args.keep_ambiguous,
                              tuple(b.lower() for b in args.blacklist))
    try:
        summary = prepare(args.scene_graphs, args.images, args.relations, args.out, settings, args.seed, args.image_ext)
    except DataError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps({k: summary[k] for k in ("images_seen", "tasks", "tasks_per_relation", "removed_images")}, indent=2))


if __name__ == "__main__":
    main()
