"""Splits of your own examples: from their ``split`` field, or cut by image with a seed.

Cuts are image-disjoint (an image's examples stay together, so no split shows the model an
image another one asks about) and greedily balanced per relation, in a seeded image order:
the same file, fractions and seed give the same splits on every machine.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from mfv.data.own.reader import OwnExample
from mfv.errors import DataError


def cut_by_image(examples: Sequence[OwnExample], fraction: float, seed: int, salt: str
                 ) -> tuple[list[OwnExample], list[OwnExample]]:
    """``(kept, held)``: about ``fraction`` of each relation's examples held out, whole images at a time.

    Images are visited in a seeded order; an image is held while the relations it shows
    still need examples to reach their share (``fraction`` of their examples). Both parts
    keep the file's order.
    """
    by_image: dict[str, list[OwnExample]] = defaultdict(list)
    for example in examples:
        by_image[example.image_path].append(example)
    target = {r: fraction * n for r, n in Counter(e.relation for e in examples).items()}
    images = sorted(by_image)
    random.Random(f"{seed}:{salt}").shuffle(images)
    held_counts: Counter = Counter()
    held_images: set[str] = set()
    for image in images:
        shown = Counter(e.relation for e in by_image[image])
        if sum(n * (target[r] - held_counts[r]) for r, n in shown.items()) > 0:
            held_images.add(image)
            held_counts.update(shown)
    kept = [e for e in examples if e.image_path not in held_images]
    held = [e for e in examples if e.image_path in held_images]
    return kept, held


def assign_splits(examples: Sequence[OwnExample], path: str | Path, test_fraction: float, val_fraction: float,
                  seed: int) -> dict[str, list[OwnExample]]:
    """The examples of each split: ``train``, ``val``, ``test``, ``eval`` and (when given) ``novel``.

    With a ``split`` field the examples go where it says; a missing ``val`` is cut from
    ``train`` (``val_fraction``, by image) and a missing ``eval`` (the AIE / FV extraction
    prompts) is ``train`` and ``val`` together, as for GQA. Without one, ``test`` is cut from
    all examples (``test_fraction``), then ``val`` from the rest; ``eval`` is the rest.

    Raises:
        DataError: the ``split`` field leaves ``train`` or ``test`` without any example.
    """
    if examples and examples[0].split is not None:
        parts: dict[str, list[OwnExample]] = {s: [e for e in examples if e.split == s] for s in
                                              ("train", "val", "test", "eval", "novel")}
        for needed in ("train", "test"):
            if not parts[needed]:
                raise DataError(f"{path}: field 'split': no example has split {needed!r} (train.py fine-tunes on "
                                f"'train' and reports on 'test')")
        if not parts["val"]:
            parts["train"], parts["val"] = cut_by_image(parts["train"], val_fraction, seed, "val")
        if not parts["eval"]:
            held = {id(e) for e in parts["val"]}  # val may have been cut from train just above
            parts["eval"] = [e for e in examples if e.split == "train" or id(e) in held]
        if not parts["novel"]:
            del parts["novel"]
        return parts
    rest, test = cut_by_image(examples, test_fraction, seed, "test")
    train, val = cut_by_image(rest, val_fraction, seed, "val")
    return {"train": train, "val": val, "test": test, "eval": rest}
