"""GQA attributes as non-spatial relations: ``colour of`` and ``material of``.

From the same scene graphs as the spatial set: the query is an object's name, the answer
its colour (or material) attribute, e.g. ``Q:car. A:red`` (``colour of``) or ``Q:table.
A:wooden`` (``material of``). ``--relations attributes`` (or ``[spatial,attributes]``) in
``mfv prepare-gqa`` builds them; the task's object box is the object's own box.

An attribute counts when it is in the relation's vocabulary below (GQA's own words). An
object with two colours (``white``, ``black``) has no single answer: with the
``drop_ambiguous`` filter it gives no task for that relation (counted as
``ambiguous_attribute``), without it one task per value.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

COLOURS = ("white", "black", "blue", "green", "red", "brown", "yellow", "gray", "grey", "orange", "pink",
           "purple", "silver", "tan", "beige", "gold", "maroon", "navy", "cream", "khaki", "teal", "turquoise")
MATERIALS = ("wooden", "wood", "metal", "metallic", "plastic", "glass", "brick", "concrete", "stone", "leather",
             "porcelain", "ceramic", "steel", "paper", "cardboard", "denim", "wicker", "rubber", "cotton", "marble",
             "tile", "iron", "wire", "straw", "wool", "silk", "aluminum", "chrome", "granite", "bamboo")
VOCABULARY = {"colour of": frozenset(COLOURS), "material of": frozenset(MATERIALS)}
ATTRIBUTES = tuple(VOCABULARY)  # the ``attributes`` relation set


def attribute_values(obj: dict, relation: str) -> list[str]:
    """The object's attributes in ``relation``'s vocabulary (lower-cased, each once, in order)."""
    values = [" ".join(str(a).strip().lower().split()) for a in obj.get("attributes") or []]
    return list(dict.fromkeys(v for v in values if v in VOCABULARY[relation]))


def attribute_triples(valid: dict[str, dict], relations: Iterable[str], drop_ambiguous: bool,
                      removed: Counter) -> list[tuple[str, str, str]]:
    """``(object_id, relation, value)`` for every valid object and attribute relation asked for.

    Args:
        valid: The image's objects that passed the filters, by id.
        relations: The relations asked for (those not in :data:`ATTRIBUTES` are ignored).
        drop_ambiguous: Skip an object with several values of one relation.
        removed: Counts what was skipped (``ambiguous_attribute``).
    """
    triples = []
    for relation in (r for r in relations if r in VOCABULARY):
        for object_id, obj in valid.items():
            values = attribute_values(obj, relation)
            if len(values) > 1 and drop_ambiguous:
                removed["ambiguous_attribute"] += 1
                continue
            triples.extend((object_id, relation, value) for value in values)
    return triples


def objects_with_attributes(entry: dict) -> int:
    """How many of the image's objects have any attribute of the vocabularies (for the summary:
    a scene-graph file without attributes is told apart from one the filters emptied)."""
    objects = entry.get("objects") if isinstance(entry, dict) else None
    if not isinstance(objects, dict):
        return 0  # a malformed entry: tasks_of_image reports it
    return sum(1 for obj in objects.values()
               if isinstance(obj, dict) and any(attribute_values(obj, r) for r in VOCABULARY))
