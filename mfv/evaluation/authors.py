"""The authors' evaluation protocol, on request (``evaluation.protocol: authors``).

mfv's own protocol (``mfv``, the default) scores every test prompt, extracts from the
configured prompt counts and chooses the injection layer and K on the validation split. The
authors' released scripts differ in three ways, each reproduced here and listed in report.md
(``settings.protocol`` of ``metrics.json``):

* **filter**: a test prompt is scored only if the extraction (eval-split) prompt of the same
  relation and image file was answered correctly with 4-shot ICL (:func:`authors_filter`;
  the ``test`` and ``novel`` splits, sweeps included). Image files are matched by their path
  inside the split folder (the synthetic splits all name their images ``images/00000.png``
  on, so test image ``i`` meets eval image ``i``, of the same relation). Where no prompt of a
  split shares an image file with the eval split (image-disjoint splits: GQA, your own data)
  the filter cannot apply: every prompt is scored, and the report says so;
* **prompt counts**: means averaged over every eval prompt and AIE over every matched
  (clean-correct) prompt (:func:`authors_aie_settings`);
* **layer choice on test**: the sweeps choose on the test split (mfv: on validation).

Not reproduced, stated in the README's protocol table: with more than 4 shots the authors'
corrupted prompts drop demonstrations (mfv cycles the labels), and a relation with no
correct prompt crashes their scripts (mfv falls back to all its prompts, or here scores the
other relations, and reports it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mfv.data.episodes import EpisodeSampler, Scene
from mfv.evaluation.conditions import Condition

PROTOCOLS = ("mfv", "authors")
# The authors' filter scores the extraction prompts with this many demonstrations.
AUTHORS_FILTER_SHOTS = 4
# The splits whose prompts the filter applies to (each matched against the eval split).
FILTERED_SPLITS = ("test", "novel")


class IndexedEpisodes(torch.utils.data.Dataset):
    """Episodes ``indices`` of a sampler as a dataset: row ``i`` is episode ``indices[i]``
    (items ``(row, episode)``, as every evaluation dataset)."""

    def __init__(self, sampler: EpisodeSampler, mode: str, shots: int | None, indices: Sequence[int]) -> None:
        self.sampler = sampler
        self.relations = list(sampler.relations)
        self.mode = mode
        self.shots = shots
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, row: int):
        return row, self.sampler.episode(self.indices[row], self.mode, self.shots)


@dataclass
class SplitFilter:
    """What the authors' filter kept of one split's first ``n`` prompts.

    Attributes:
        split: The filtered split.
        n: Prompts considered (the first ``n`` of the split).
        matched: Prompts with an eval prompt of the same relation and image file.
        kept: Query indices scored (ascending).
        note: Why, in words (report.md).
    """

    split: str
    n: int
    matched: int
    kept: list[int]
    note: str

    def summary(self) -> dict:
        return {"n": self.n, "matched": self.matched, "kept": len(self.kept), "note": self.note}


def image_key(datamodule, split: str, scene: Scene) -> str:
    """A scene's image file as the authors name it: its path inside the split's folder."""
    path = Path(scene.image_path)
    try:
        return path.relative_to(datamodule.split_dir(split)).as_posix()
    except ValueError:
        return path.as_posix()


def eval_matches(datamodule, split: str, count: int) -> dict[int, int]:
    """Query index of ``split`` (first ``count``) -> query index of the eval split's prompt of
    the same relation and image file."""
    extraction = datamodule.sampler("eval")
    by_file = {(s.relation, image_key(datamodule, "eval", s)): i for i, s in enumerate(extraction.queries)}
    sampler = datamodule.sampler(split)
    matches = {}
    for index in range(min(count, len(sampler))):
        scene = sampler.queries[index]
        found = by_file.get((scene.relation, image_key(datamodule, split, scene)))
        if found is not None:
            matches[index] = found
    return matches


def authors_filter(datamodule, scorer: Callable[[list[Condition]], dict], limit: int | None
                   ) -> dict[str, SplitFilter]:
    """The authors' filter on the first ``limit`` prompts (all for ``None``) of each split of
    :data:`FILTERED_SPLITS` the datamodule has: the matched eval prompts are scored once
    (4-shot ICL, one scoring pass), and a prompt is kept where its eval prompt was answered."""
    splits = [s for s in FILTERED_SPLITS if datamodule.has_split(s)]
    counts = {s: len(datamodule.sampler(s)) if limit is None else min(limit, len(datamodule.sampler(s)))
              for s in splits}
    matches = {s: eval_matches(datamodule, s, counts[s]) for s in splits}
    needed = sorted({j for m in matches.values() for j in m.values()})
    correct: dict[int, bool] = {}
    if needed:
        extraction = datamodule.sampler("eval")
        condition = Condition("authors_filter", "weights", "eval",
                              IndexedEpisodes(extraction, "clean", AUTHORS_FILTER_SHOTS, needed), None,
                              f"{AUTHORS_FILTER_SHOTS}-shot ICL on the matched eval prompts (authors' filter)")
        outcome = scorer([condition])["authors_filter"].correct
        correct = {j: bool(c) for j, c in zip(needed, outcome)}
    return {s: _kept(datamodule, s, counts[s], matches[s], correct) for s in splits}


def _kept(datamodule, split: str, count: int, matches: dict[int, int], correct: dict[int, bool]) -> SplitFilter:
    """The :class:`SplitFilter` of one split from its matches and the eval prompts' outcomes."""
    if not matches:
        return SplitFilter(split, count, 0, list(range(count)),
                           f"no {split} prompt shares an image file with the eval split (image-disjoint splits): "
                           f"the authors' filter cannot apply, all {count} scored")
    kept = sorted(i for i, j in matches.items() if correct[j])
    if not kept:
        return SplitFilter(split, count, len(matches), list(range(count)),
                           f"no matched eval prompt was answered with {AUTHORS_FILTER_SHOTS}-shot ICL (the authors' "
                           f"scripts would score nothing): all {count} scored")
    sampler = datamodule.sampler(split)
    empty = [r for r in sampler.relations if not any(sampler.queries[i].relation == r for i in kept)]
    note = (f"kept {len(kept)} of {count}: those whose eval prompt of the same relation and image file was "
            f"answered with {AUTHORS_FILTER_SHOTS}-shot ICL ({len(matches)} matched an eval image)")
    if empty:
        note += f"; no prompt kept for {empty} (the authors' scripts stop there; mfv scores the other relations)"
    return SplitFilter(split, count, len(matches), kept, note)


def authors_aie_settings(aie, eval_prompts: int):
    """The ``aie:`` section under the authors' prompt counts: means over every eval prompt,
    AIE over every matched (clean-correct) prompt of the eval split."""
    return dataclasses.replace(aie, num_mean_prompts=eval_prompts, num_aie_prompts=eval_prompts,
                               aie_filter="clean_correct")


def protocol_markdown(metrics: dict) -> str:
    """report.md's lines on the protocol (which one; under the authors', what was filtered,
    the prompt counts and where the layer and K were chosen)."""
    protocol = metrics["settings"].get("protocol") or {"name": "mfv"}
    if protocol["name"] != "authors":
        return ""
    lines = ["\n## Protocol: the authors'\n",
             f"- filter ({AUTHORS_FILTER_SHOTS}-shot ICL on the eval prompt of the same relation and image file):"]
    lines += [f"  - {split}: {f['note']} (n kept {f['kept']} of {f['n']})" for split, f in protocol["filter"].items()]
    counts = metrics.get("extraction", {}).get("prompts_seen")
    lines.append("- prompt counts: means over every eval prompt, AIE over every matched prompt"
                 + (f" (prompts per relation: {counts})" if counts else ""))
    lines.append("- layer and K chosen on the test split (mfv chooses on validation)")
    return "\n".join(lines) + "\n"
