"""Which splits the evaluation protocol reads, with what shots and prompt prefixes.

:func:`requirements` is the protocol's own statement (:mod:`mfv.evaluation.plan` builds
the conditions it describes); :func:`mfv.preflight.plan_evaluation` checks the data against
it before any compute. ``tests/test_drills.py`` runs an evaluation and asserts that every
split it reads is stated here, so a condition on a new split cannot go unchecked.
"""

from __future__ import annotations

from mfv.requirements import SplitUse


def requirements(settings, datamodule, aie) -> dict[str, SplitUse]:
    """split -> how the protocol uses it.

    Args:
        settings: The :class:`~mfv.evaluation.settings.EvaluationSettings`.
        datamodule: The relation DataModule (which splits it has, its shots).
        aie: The ``aie:`` section the protocol extracts with (the ``eval`` split's prompts).
    """
    limit = {"--limit": settings.limit} if settings.limit is not None else {}
    authors = settings.protocol == "authors"  # layer and K chosen on test, as their scripts do
    uses = {"eval": aie.prompt_use(datamodule.shots),
            "test": SplitUse("evaluation, layer and K sweeps" if authors else "evaluation", shots=datamodule.shots,
                             prompts=dict(limit))}
    if datamodule.has_split("novel"):
        uses["novel"] = SplitUse("evaluation on novel objects", shots=datamodule.shots, prompts=dict(limit))
    if datamodule.has_split("val"):  # and the softmax_affine composite's fit
        uses["val"] = SplitUse("layer and K sweeps (reported; chosen on test)" if authors else "layer and K sweeps")
    if settings.analogies and datamodule.has_split("composite"):
        uses["composite"] = SplitUse("analogies", every_relation=False)
    return uses
