"""The evaluation protocol as a library: conditions, scores with intervals, reports.
No trainable module is needed: everything runs over a backbone adapter.

    vectors = Vectors.from_extraction(adapter, extraction, k=10, layer=16)
    result = evaluate(adapter, datamodule, vectors, EvaluationSettings())
    write_report(result, "runs/eval", extraction)

or, for your own conditions, :func:`~mfv.evaluation.engine.score_conditions`.
"""

from mfv.evaluation.conditions import COMPOSITE_MODES, AnalogyProblem, Condition, composite_vectors
from mfv.evaluation.engine import score_conditions
from mfv.evaluation.protocol import EvaluationResult, EvaluationSettings, Vectors, evaluate
from mfv.evaluation.scoring import Score, paired_comparison, wilson_interval

__all__ = [
    "COMPOSITE_MODES", "AnalogyProblem", "Condition", "EvaluationResult", "EvaluationSettings", "Score", "Vectors",
    "composite_vectors", "evaluate", "paired_comparison", "score_conditions", "wilson_interval",
]
