"""The evaluation protocol as a library: conditions, scores with intervals, reports.

    result = evaluate(trainer, module, datamodule, extraction, EvaluationSettings(), k=10)
    write_report(result, "runs/eval", extraction)
"""

from mfv.evaluation.conditions import COMPOSITE_MODES, AnalogyProblem, Condition, composite_vectors
from mfv.evaluation.protocol import EvaluationResult, EvaluationSettings, evaluate, run_conditions
from mfv.evaluation.scoring import Score, paired_comparison, wilson_interval

__all__ = [
    "COMPOSITE_MODES", "AnalogyProblem", "Condition", "EvaluationResult", "EvaluationSettings", "Score",
    "composite_vectors", "evaluate", "paired_comparison", "run_conditions", "wilson_interval",
]
