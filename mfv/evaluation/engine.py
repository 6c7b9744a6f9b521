"""Evaluation as a library: conditions to scores over a backbone, no trainable module needed.

Each condition records one outcome per dataset row (seen, correct, relation, answer
probability), addressed by the row's dataset index. Across ranks the outcome tables are
gathered with ``max``: counts stay exact whatever padding a distributed sampler adds.

Conditions that share a dataset (zero-shot prompts with several injected vectors: FV
conditions, layer and K sweeps, composite variants) are scored from one loader: each batch
is encoded once and, with ``reuse``, run once up to the last position
(:func:`mfv.steering.prompt_pass`), after which every condition recomputes only the last
position (from its injection layer up where the backbone has a minimal path). With ``reuse`` the frozen vision tower's per-image
work is also kept for the whole run (:meth:`BackboneAdapter.reuse_context`).

The trainable module's validation and test loops record into :class:`Outcomes` from here;
:func:`score_conditions` runs a list of conditions in this process, or on every rank of a
Lightning ``Fabric`` (DDP).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch

from mfv.console import progress
from mfv.data.episodes import EncodedBatch, episode_collator
from mfv.evaluation.conditions import Condition
from mfv.evaluation.scoring import Score
from mfv.method.aie import answer_probability
from mfv.models.base import BackboneAdapter
from mfv.steering import prompt_pass, steered_logits


def group_by_dataset(conditions: Sequence[Condition], share: bool = True) -> list[list[int]]:
    """Indices of conditions sharing one dataset object, in first-seen order (one per group
    when not ``share``)."""
    groups: dict[int, list[int]] = {}
    for index, condition in enumerate(conditions):
        groups.setdefault(id(condition.dataset) if share else index, []).append(index)
    return list(groups.values())


class Outcomes:
    """Per-row outcomes of several conditions, each over its own dataset.

    Args:
        sizes: Dataset length of each condition.
        device: Where the tables live (the backbone's device: gathers run there).
    """

    def __init__(self, sizes: Sequence[int], device: torch.device | str = "cpu") -> None:
        # rows: seen, correct, relation id, answer probability, top-1 token id (constant answers)
        self.tables = [torch.tensor([[0.0], [0.0], [-1.0], [0.0], [-1.0]], device=device).repeat(1, size)
                       for size in sizes]

    def record(self, index: int, batch: EncodedBatch, logits: torch.Tensor) -> None:
        """Writes the outcomes of ``batch`` under condition ``index``."""
        table = self.tables[index]
        rows = batch.indices.to(table.device)
        answers = batch.answer_ids.to(logits.device)
        table[0, rows] = 1.0
        table[1, rows] = (logits.argmax(-1) == answers).float().to(table.device)
        table[2, rows] = batch.relation_ids.float().to(table.device)
        table[3, rows] = answer_probability(logits, answers).detach().float().to(table.device)
        table[4, rows] = logits.argmax(-1).float().to(table.device)  # exact below 2**24 ids

    def scores(self, relations_of: Sequence[Sequence[str]],
               gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[Score]:
        """One score per condition over every row seen on any rank (``gather``: an all-gather
        returning ``(ranks, ...)``, or the table itself in a single process)."""
        scores = []
        for relations, table in zip(relations_of, self.tables):
            gathered = gather(table) if gather is not None else table
            if gathered.dim() == 3:
                gathered = gathered.max(0).values
            seen = gathered[0] > 0
            scores.append(Score.from_tensors(list(relations), gathered[1][seen], gathered[2][seen],
                                             gathered[3][seen], gathered[4][seen]))
        return scores


def condition_logits(adapter: BackboneAdapter, conditions: Sequence[Condition], batch: EncodedBatch,
                     share_prompt_pass: bool = True, done: Callable[[int], None] | None = None
                     ) -> list[torch.Tensor]:
    """Last-position logits of ``batch`` under each condition (no graph).

    With ``share_prompt_pass`` and some condition injecting, the prompt runs once and each
    condition recomputes only its last position (where the backbone offers that path).
    ``done(i)`` is called as condition ``i``'s logits are ready (progress bars).
    """
    with torch.no_grad():
        steered = any(c.steer is not None for c in conditions)
        prefix = prompt_pass(adapter, batch.prompts) if share_prompt_pass and steered else None
        logits = []
        for position, condition in enumerate(conditions):
            logits.append(steered_logits(adapter, batch.prompts, condition.injection(batch), prefix))
            if done is not None:
                done(position)
        return logits


class ConditionBars:
    """One progress bar per stage: the conditions of a group sharing a loader advance one bar,
    labelled with what they share (``composite weights (8 conditions)``), by one step per
    condition and batch; cleared when the group ends (the report's table follows). In a log it
    writes plain lines (:func:`mfv.console.progress`). Disabled, it does nothing."""

    def __init__(self, conditions: Sequence[Condition], batches: int, enabled: bool) -> None:
        labels = [c.label() for c in conditions]
        self.bar = progress(total=batches * len(conditions), desc=stage_label(labels), unit="step",
                            leave=False) if enabled else None

    def advance(self, position: int) -> None:
        """Condition ``position`` of the group finished one more batch."""
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def stage_label(labels: Sequence[str]) -> str:
    """One label for a stage's conditions: the one label, else what they share before a colon
    (``composite weights (8 conditions)``), else the first one's and how many more."""
    if len(labels) == 1:
        return labels[0]
    heads = {label.split(":", 1)[0] for label in labels}
    if len(heads) == 1 and all(":" in label for label in labels):
        return f"{heads.pop()} ({len(labels)} conditions)"
    return f"{labels[0]} and {len(labels) - 1} more"


def score_conditions(
    adapter: BackboneAdapter,
    conditions: Sequence[Condition],
    batch_size: int = 16,
    num_workers: int = 0,
    reuse: bool = True,
    fabric: Any | None = None,
    progress: bool = False,
) -> dict[str, Score]:
    """Scores of ``conditions`` by name.

    Args:
        adapter: The backbone (on its device).
        conditions: What to evaluate (:mod:`mfv.evaluation.conditions`).
        batch_size: Prompts per batch.
        num_workers: DataLoader workers.
        reuse: Compute nothing twice (shared images and prompt passes); ``False``: every
            condition from scratch. Scores are equal either way to float rounding.
        fabric: A launched ``lightning.Fabric``: each rank scores its share of every dataset
            and the outcomes are gathered. ``None``: this process scores everything.
        progress: One labelled progress bar per condition (:class:`ConditionBars`).
    """
    conditions = list(conditions)
    outcomes = Outcomes([len(c.dataset) for c in conditions], adapter.device)
    store: dict | None = {} if reuse else None
    for group in group_by_dataset(conditions, reuse):
        dataset = conditions[group[0]].dataset
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             collate_fn=episode_collator(adapter, dataset.relations))
        if fabric is not None:
            loader = fabric.setup_dataloaders(loader, move_to_device=False)
        members = [conditions[i] for i in group]
        bars = ConditionBars(members, len(loader), progress)
        try:
            for batch in loader:
                with adapter.reuse_context(store) if store is not None else nullcontext():
                    logits = condition_logits(adapter, members, batch, reuse, bars.advance)
                for index, row_logits in zip(group, logits):
                    outcomes.record(index, batch, row_logits)
        finally:
            bars.close()
    gather = fabric.all_gather if fabric is not None else None
    scores = outcomes.scores([c.dataset.relations for c in conditions], gather)
    return {c.name: s for c, s in zip(conditions, scores)}
