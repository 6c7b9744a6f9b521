"""What a step of a run reads, as each room states it for the preflight to check.

The evaluation protocol (:func:`mfv.evaluation.requirements.requirements`), the extraction
(:meth:`mfv.method.settings.AIESettings.prompt_use` and
:meth:`~mfv.method.settings.AIESettings.cache_bytes`) and training
(:func:`mfv.preflight.plan_training`) each say which splits they read, with how many shots
and which prompt prefixes; :mod:`mfv.preflight` asks them and checks the data against
their answers, so a new condition on a new split is checked without a preflight edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SplitUse:
    """How a run uses one split.

    Attributes:
        purpose: What for (named in messages).
        shots: Demonstrations its N-shot prompts hold (0: zero-shot only).
        shots_field: The setting that asks for ``shots``.
        prompts: setting -> how many of the split's first prompts it takes (each such prefix
            must cover every relation).
        every_relation: Whether every relation of the run must have prompts here.
    """

    purpose: str
    shots: int = 0
    shots_field: str = "data.init_args.shots"
    prompts: dict[str, int] = field(default_factory=dict)
    every_relation: bool = True
