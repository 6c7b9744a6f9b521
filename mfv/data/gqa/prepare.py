"""GQA preparation: scene-graph filtering and a relation-balanced, image-disjoint split.

    mfv prepare-gqa --scene_graphs [train_sceneGraphs.json,val_sceneGraphs.json] \\
        --images gqa/images --relations [spatial] --out data/gqa
    python -m mfv.data.gqa prepare --scene_graphs [train_sceneGraphs.json] --images gqa/images \\
        --relations [above,below] --out data/gqa_ab --settings.min_objects 2

Lists are jsonargparse lists (``[a,b]``), each filter is ``--settings.<name>``
(``mfv prepare-gqa --settings.help`` lists them), ``--split per_relation`` picks the other split.

Scene graphs are read as a stream (one image entry at a time), so GQA's full train file
(~75k images, hundreds of MB) prepares in bounded memory. Filters (each configurable):
object area 5-50% of the image; 3-30 valid objects; 1-15 matching relations; no duplicate
object names; no subject with the same predicate towards several objects; a blacklist
of names. Relation names are normalised ("to the left of" -> "left of"). ``attributes``
(``colour of``, ``material of``) asks an object's colour or material instead
(:mod:`mfv.data.gqa.attributes`). The output is a
Hugging Face ``datasets`` DatasetDict (train/test) plus ``summary.json`` (tasks and images
per relation, what each filter removed, every malformed entry counted by kind), written whole
at the end; an ``--out`` holding a preparation is refused unless ``--overwrite true``. The split
is image-disjoint and greedily balanced per relation (the authors'), or, as an option,
50/50 within each relation (an image may then be train for one relation, test for another).
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from mfv.data.gqa.attributes import ATTRIBUTES, VOCABULARY, attribute_triples, objects_with_attributes
from mfv.data.gqa.output import check_out, write_preparation
from mfv.data.gqa.scene_graphs import iter_scene_graphs
from mfv.errors import DataError, MfvError

SPATIAL = ("above", "below", "left of", "right of", "next to", "behind", "in front of")
AGENTIC = ("wearing", "holding", "carrying", "sitting on", "standing on", "standing in", "riding")
# ``attributes``: an object's colour / material as the answer (mfv.data.gqa.attributes).
RELATION_SETS = {"spatial": SPATIAL, "agentic": AGENTIC, "attributes": ATTRIBUTES}
RENAMES = {"to the left of": "left of", "to the right of": "right of", "on the left of": "left of",
           "on the right of": "right of", "color of": "colour of"}
BLACKLIST = ("sky", "wall", "floor", "ceiling", "building", "trees", "grass", "ocean", "water", "fence", "bush",
             "neck", "hair", "legs", "rocks", "bushes", "clouds", "cloud", "sun", "stars", "cars", "leaves",
             "fingers", "hand", "arm")


@dataclass
class FilterSettings:
    """The paper's filters; every bound is configurable.

    Attributes:
        min_area: Smallest object area / image area.
        max_area: Largest object area / image area.
        min_objects: Fewest valid objects per image.
        max_objects: Most valid objects per image.
        min_relations: Fewest matching relations per image.
        max_relations: Most matching relations per image.
        unique_names: Drop images that repeat an object name.
        drop_ambiguous: Drop images where a subject has the same predicate towards several objects.
        blacklist: Object names never used.
    """

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
    """``spatial``/``agentic``/``attributes`` expand to their sets; other names are taken as given."""
    relations: list[str] = []
    for name in names:
        for relation in RELATION_SETS.get(name, (normalise_relation(name),)):
            if relation not in relations:
                relations.append(relation)
    return relations


@dataclass
class PrepareReport:
    """What the filters did, for the summary."""

    images_seen: int = 0
    removed: Counter = field(default_factory=Counter)
    removed_relations: Counter = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    malformed_kinds: Counter = field(default_factory=Counter)
    missing_images: int = 0
    objects_with_attributes: int = 0  # counted only when attribute relations are asked for


def _valid_objects(entry: dict, settings: FilterSettings) -> dict[str, dict]:
    area = float(entry["width"]) * float(entry["height"])
    valid = {}
    for object_id, obj in entry["objects"].items():
        box = [float(obj[k]) for k in ("x", "y", "w", "h")]  # a missing coordinate is malformed, not fatal
        ratio = box[2] * box[3] / area
        name = str(obj["name"]).strip().lower()
        if settings.min_area <= ratio <= settings.max_area and name not in settings.blacklist:
            valid[object_id] = obj
    return valid


def tasks_of_image(
    image_id: str, entry: dict, relations: set[str], settings: FilterSettings, report: PrepareReport
) -> list[dict]:
    """The (subject, relation, object) tasks an image contributes, after every filter.

    A malformed entry (missing field, wrong type) is recorded in ``report`` with its id and
    skipped; a relation towards an object id the image does not have is counted
    (``removed_relations['missing_object']``) and dropped.
    """
    if relations & VOCABULARY.keys():  # before any filter: tells "no attributes at all" apart
        report.objects_with_attributes += objects_with_attributes(entry)
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
                if predicate not in relations:
                    continue
                if relation["object"] not in entry["objects"]:
                    report.removed_relations["missing_object"] += 1
                elif relation["object"] in valid:
                    triples.append((subject_id, predicate, relation["object"]))
        # Attribute tasks point at a value, not an object id (each object has one value per relation).
        triples += attribute_triples(valid, relations, settings.drop_ambiguous, report.removed_relations)
        width, height = int(entry["width"]), int(entry["height"])
        boxes = {i: [float(valid[i][k]) for k in ("x", "y", "w", "h")] for i in valid}
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        report.malformed.append(f"{image_id} ({type(exc).__name__}: {exc})")
        report.malformed_kinds[type(exc).__name__] += 1
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
    return [{
        "image_id": image_id,
        "relation": predicate,
        "subject": str(valid[subject_id]["name"]).strip().lower(),
        "object": target if predicate in VOCABULARY else str(valid[target]["name"]).strip().lower(),
        "subject_box": boxes[subject_id],
        "object_box": boxes[subject_id if predicate in VOCABULARY else target],
        "width": width,
        "height": height,
    } for subject_id, predicate, target in triples]


SPLITS = ("image_disjoint", "per_relation")


def image_disjoint_split(tasks: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Every image's tasks go to one split; images are assigned greedily (seeded order) to
    the split that most needs their relations to reach half of each relation's tasks."""
    by_image: dict[str, list[dict]] = defaultdict(list)
    for task in tasks:
        by_image[task["image_id"]].append(task)
    totals = Counter(t["relation"] for t in tasks)
    images = sorted(by_image)
    rng = random.Random(f"{seed}:image_disjoint")
    rng.shuffle(images)
    counts = {"train": Counter(), "test": Counter()}
    parts: dict[str, list[dict]] = {"train": [], "test": []}
    for image in images:
        relations = Counter(t["relation"] for t in by_image[image])
        need = {split: sum(n * (totals[r] / 2 - counts[split][r]) for r, n in relations.items()) for split in counts}
        if need["train"] == need["test"]:
            split = rng.choice(["train", "test"])
        else:
            split = max(need, key=need.get)
        counts[split].update(relations)
        parts[split].extend(by_image[image])
    return parts["train"], parts["test"]


def per_relation_split(tasks: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """50/50 per relation, seeded; images never straddle the split within a relation
    (but may across relations)."""
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
    split: Literal["image_disjoint", "per_relation"] = "image_disjoint",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Filters scene graphs into tasks and writes the split dataset and its summary.

    Args:
        scene_graphs: GQA scene-graph JSON files (e.g. train and val), streamed.
        images: Folder of images named ``<image_id><image_ext>``.
        relations: ``spatial``, ``agentic``, ``attributes`` (``colour of``, ``material of``:
            :mod:`mfv.data.gqa.attributes`) or relation names (GQA spellings are normalised).
        out: Output folder (``dataset/`` and ``summary.json``).
        settings: The filters (default: the paper's).
        seed: Split seed.
        image_ext: Image file extension.
        progress: Show a progress bar per file.
        split: ``image_disjoint`` (the authors': greedy balance, no image in both splits) or
            ``per_relation`` (50/50 within each relation).
        overwrite: Replace an earlier preparation at ``out`` (otherwise refused, before any work).

    Raises:
        DataError: unreadable input, or nothing left after filtering (the message says
            which filter removed what).
        ConfigError: ``out`` holds a preparation (without ``overwrite``) or other files, or
            cannot be written; before any scene graph is read.
    """
    out = Path(out)
    check_out(out, overwrite)  # :mod:`mfv.data.gqa.output`: written whole, at the end, or not at all
    if split not in SPLITS:
        raise DataError(f"split = {split!r}; valid: {list(SPLITS)}")
    settings = settings or FilterSettings()
    wanted = set(resolve_relations(relations))
    report = PrepareReport()
    images = Path(images)
    tasks = _collect_tasks(scene_graphs, images, image_ext, wanted, settings, report, progress)
    _check_tasks_left(tasks, report, images, wanted)
    train, test = (image_disjoint_split if split == "image_disjoint" else per_relation_split)(tasks, seed)
    summary = _summary(report, tasks, train, test, split, wanted, settings, seed)
    if wanted & VOCABULARY.keys():
        summary["objects_with_attributes"] = report.objects_with_attributes
    write_preparation(out, train, test, summary)
    return summary


def _collect_tasks(
    scene_graphs: Sequence[str | Path],
    images: Path,
    image_ext: str,
    wanted: set[str],
    settings: FilterSettings,
    report: PrepareReport,
    progress: bool,
) -> list[dict]:
    """Every task of every scene-graph file whose image file exists, with its ``image_path``.

    Args:
        scene_graphs: Scene-graph JSON files, streamed one entry at a time.
        images: Folder of images named ``<image_id><image_ext>``.
        image_ext: Image file extension.
        wanted: Relation names kept.
        settings: The filters.
        report: Updated with what was seen, filtered out, malformed or missing.
        progress: Show a progress bar per file.
    """
    from mfv.console import progress as tqdm  # plain lines in a log

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
    return tasks


def _check_tasks_left(tasks: list[dict], report: PrepareReport, images: Path, wanted: set[str]) -> None:
    """Warns about skipped entries on stderr, and stops when no task is left.

    Raises:
        DataError: no task left; the message counts what each filter removed.
    """
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
            + _no_attributes_hint(report, wanted)
        )


def _no_attributes_hint(report: PrepareReport, wanted: set[str]) -> str:
    """Why attribute relations found nothing, when no object has an attribute of their vocabularies."""
    if not wanted & VOCABULARY.keys() or report.objects_with_attributes:
        return ""
    asked = " and ".join(repr(r) for r in sorted(wanted & VOCABULARY.keys()))
    return (f"; no object has a colour or material attribute: {asked} read each object's 'attributes' field, "
            f"which is empty or holds other words in these scene graphs")


def _summary(report: PrepareReport, tasks: list[dict], train: list[dict], test: list[dict], split: str,
             wanted: set[str], settings: FilterSettings, seed: int) -> dict[str, Any]:
    """The content of ``summary.json``: counts per split and relation, and what each filter did."""
    return {
        "images_seen": report.images_seen,
        "tasks": len(tasks),
        "images_with_tasks": len({t["image_id"] for t in tasks}),
        "tasks_per_relation": {split: dict(Counter(t["relation"] for t in part)) for split, part in
                               (("train", train), ("test", test))},
        "images_per_relation": {split_name: {r: len({t["image_id"] for t in part if t["relation"] == r})
                                             for r in sorted({t["relation"] for t in part})}
                                for split_name, part in (("train", train), ("test", test))},
        "split": split,
        "removed_images": dict(report.removed),
        "removed_relations": dict(report.removed_relations),
        "malformed_by_kind": dict(report.malformed_kinds),
        "missing_images": report.missing_images,
        "malformed_entries": len(report.malformed),
        "malformed_examples": report.malformed[:20],
        "relations": sorted(wanted),
        "filters": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "seed": seed,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m mfv.data.gqa prepare ...`` / ``mfv prepare-gqa ...``: :func:`prepare` from the command line."""
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        argv = argv[1:]
    from mfv.arguments import bracket_lists

    argv = bracket_lists(argv, prepare)  # `--relations agentic` = `--relations [agentic]`
    try:
        summary = CLI(prepare, args=argv, as_positional=False, prog="mfv prepare-gqa")
    except MfvError as exc:  # bad input or --out: one line
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(json.dumps({k: summary[k] for k in ("images_seen", "tasks", "tasks_per_relation", "removed_images",
                                              "removed_relations", "malformed_by_kind")}, indent=2))
    return summary
