"""The module's validation and test loops: per-prompt outcomes, exact under DDP, and the
evaluation conditions of :mod:`mfv.evaluation` run as test dataloaders.

Each loop records one outcome per dataset row (seen, correct, relation, answer
probability), addressed by the row's dataset index and gathered across ranks with ``max``:
counts stay exact whatever padding a distributed sampler adds. Conditions that share a
dataset (zero-shot prompts with several injected vectors: FV conditions, layer and K sweeps,
composite variants) form one dataloader: each batch is encoded once and, where the backbone
offers it (:meth:`BackboneAdapter.last_position_prefix`), run once up to the last position,
after which every condition recomputes only the last position from its injection layer up.

Fitting (every epoch over the same images) and evaluation with ``reuse`` keep the frozen
vision tower's per-image work in one store for the whole run
(:meth:`BackboneAdapter.reuse_context`, entered per step).
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from mfv.data.episodes import EncodedBatch, episode_collator
from mfv.evaluation.conditions import Condition
from mfv.evaluation.scoring import Score
from mfv.hooks import add_to_residual
from mfv.io import atomic_torch_save
from mfv.method.aie import answer_probability


def group_by_dataset(conditions: list[Condition], share: bool = True) -> list[list[int]]:
    """Indices of conditions sharing one dataset object, in first-seen order (one per group
    when not ``share``)."""
    groups: dict[int, list[int]] = {}
    for index, condition in enumerate(conditions):
        groups.setdefault(id(condition.dataset) if share else index, []).append(index)
    return list(groups.values())


class ConditionLoops:
    """Mixin of :class:`~mfv.training.module.FunctionVectorModule` (needs ``adapter``,
    ``relations`` and ``forward``)."""

    def init_condition_loops(self) -> None:
        # Evaluation conditions for the test loop (see mfv.evaluation); None = test the trained FVs.
        self.conditions: list[Condition] | None = None
        self.scores: dict[int, Score] = {}
        self.outcome_file: str | None = None
        self.eval_loader_options: dict[str, int] = {"batch_size": 16, "num_workers": 0}
        self.reuse = False  # evaluation turns it on: images encoded once, prompt passes shared
        # Per-image work of the frozen vision tower, kept across steps (fit: always; test: with reuse).
        self._image_store: dict | None = None
        self._outcomes: list[torch.Tensor] = []
        self._groups: list[list[int]] = [[0]]

    def reusing(self):
        """The backbone's reuse context over the run's image store (a no-op without one). Entered
        per step, so that nothing stays installed on the backbone if a run stops with an error."""
        return self.adapter.reuse_context(self._image_store) if self._image_store is not None else nullcontext()

    def on_fit_start(self) -> None:
        self._image_store = {}  # training and validation images, encoded once for every epoch

    def on_fit_end(self) -> None:
        self._image_store = None

    def _start_outcomes(self, sizes: list[int]) -> None:
        # rows: seen, correct, relation id, answer probability
        self._outcomes = [torch.tensor([[0.0], [0.0], [-1.0], [0.0]], device=self.device).repeat(1, size)
                          for size in sizes]

    def _condition_logits(self, condition: Condition, batch: EncodedBatch, prefix) -> torch.Tensor:
        if condition.vectors is None:
            return prefix.base_logits if prefix is not None else self.adapter.forward(batch.prompts)
        vectors = condition.vectors.to(self.device)
        if condition.vector_index != "distributed":
            rows = {"all": lambda: vectors.expand(len(batch), -1), "relation": lambda: vectors[batch.relation_ids],
                    "row": lambda: vectors[batch.indices]}[condition.vector_index]()
            if prefix is not None:
                logits = self.adapter.steered_logits(batch.prompts, rows, condition.layer, prefix=prefix)
                if logits is not None:
                    return logits
            with add_to_residual(self.adapter, condition.layer, rows):
                return self.adapter.forward(batch.prompts)
        layers = [layer for layer in range(vectors.shape[0]) if vectors[layer].any()]
        rows = vectors[layers][:, batch.relation_ids].transpose(0, 1)  # (B, len(layers), hidden)
        if prefix is not None:
            logits = self.adapter.steered_logits(batch.prompts, rows, layers, prefix=prefix)
            if logits is not None:
                return logits
        with ExitStack() as stack:
            for position, layer in enumerate(layers):
                stack.enter_context(add_to_residual(self.adapter, layer, rows[:, position]))
            return self.adapter.forward(batch.prompts)

    def _record(self, batch: EncodedBatch, dataloader_idx: int) -> None:
        if self.conditions is None:
            outcomes = [(0, self(batch))]
        else:
            group = self._groups[dataloader_idx]
            # A shared prompt pass pays off only where some condition injects a vector.
            steered = any(self.conditions[i].vectors is not None for i in group)
            with torch.no_grad():
                prefix = self.adapter.last_position_prefix(batch.prompts) if self.reuse and steered else None
                outcomes = [(i, self._condition_logits(self.conditions[i], batch, prefix)) for i in group]
        for index, logits in outcomes:
            probability = answer_probability(logits, batch.answer_ids)
            buffer = self._outcomes[index]
            buffer[0, batch.indices] = 1.0
            buffer[1, batch.indices] = (logits.argmax(-1) == batch.answer_ids).float()
            buffer[2, batch.indices] = batch.relation_ids.float()
            buffer[3, batch.indices] = probability.detach()

    def _finish_outcomes(self, relations_of: list[list[str]]) -> dict[int, Score]:
        scores = {}
        for index, buffer in enumerate(self._outcomes):
            gathered = self.all_gather(buffer)
            if gathered.dim() == 3:
                gathered = gathered.max(0).values
            seen = gathered[0] > 0
            scores[index] = Score.from_tensors(relations_of[index], gathered[1][seen], gathered[2][seen],
                                               gathered[3][seen])
        self._outcomes = []
        return scores

    def _log_score(self, stage: str, score: Score) -> None:
        # Identical on every rank after the gather: no further reduction.
        for relation, entry in score.per_relation().items():
            self.log(f"{stage}/acc_{relation}", entry["accuracy"], sync_dist=False)
        self.log(f"{stage}/acc", score.accuracy, prog_bar=True, sync_dist=False)

    # ----- validation: the trained FVs on the val split --------------------------------
    def on_validation_epoch_start(self) -> None:
        self._start_outcomes([len(self.trainer.val_dataloaders.dataset)])

    def validation_step(self, batch: EncodedBatch, batch_idx: int) -> None:
        with self.reusing():
            self._record(batch, 0)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._outcomes = []
            return
        self._log_score("val", self._finish_outcomes([self.relations])[0])

    # ----- test: the trained FVs, or the evaluation conditions ------------------------
    def test_dataloader(self) -> list[torch.utils.data.DataLoader]:
        """One loader per dataset shared by conditions (built here so that spawned processes
        build them around their own backbone)."""
        if self.conditions is None:
            raise RuntimeError("trainer.test(module) without a datamodule needs module.conditions (mfv.evaluation)")
        self._groups = group_by_dataset(self.conditions, self.reuse)
        return [torch.utils.data.DataLoader(
            self.conditions[group[0]].dataset, shuffle=False, **self.eval_loader_options,
            collate_fn=episode_collator(self.adapter, self.conditions[group[0]].dataset.relations))
            for group in self._groups]

    def on_test_epoch_start(self) -> None:
        if self.conditions is None:
            loaders = self.trainer.test_dataloaders
            loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
            self._start_outcomes([len(d.dataset) for d in loaders])
        else:
            self._groups = group_by_dataset(self.conditions, self.reuse)
            self._start_outcomes([len(c.dataset) for c in self.conditions])
        self._image_store = {} if self.reuse else None

    def test_step(self, batch: EncodedBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        with self.reusing():
            self._record(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._image_store = None
        if self.conditions is None:
            self.scores = self._finish_outcomes([self.relations])
            self._log_score("test", self.scores[0])
        else:
            self.scores = self._finish_outcomes([c.dataset.relations for c in self.conditions])
        if self.outcome_file is not None and self.trainer.is_global_zero:
            # Spawned processes (ddp_spawn) hand their scores back to the caller through this file.
            atomic_torch_save({i: [torch.from_numpy(a) for a in (s.correct, s.relation, s.probability)]
                               for i, s in self.scores.items()}, Path(self.outcome_file))
