"""A model that answers one constant token: said in the console, report.md and metrics.json.

A backbone that cannot say the answers (the model organism knows 61 words; a photo's objects
are not among them) scores 0.0 everywhere, and the numbers alone do not say why. Where every
prediction of a condition is the same token (and not every answer is it), the evaluation
warns once per split, naming the token and the conditions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mfv.evaluation.scoring import Score

# Fewer prompts than this prove nothing about a constant answer.
MIN_PROMPTS = 10


def constant_token(score: Score) -> int | None:
    """The token id every prediction of ``score`` is, where there is one and it is not always
    right (``None``: the predictions vary, were not recorded, or are too few)."""
    predicted = score.predicted
    if predicted is None or len(predicted) < MIN_PROMPTS or score.correct.all():
        return None
    first = int(predicted[0])
    return first if bool(np.all(predicted == first)) else None


def constant_answer_warnings(scores: Mapping[str, Score], conditions: Mapping[str, dict], tokenizer: Any
                             ) -> list[str]:
    """One warning per split where some condition answers one constant token.

    Args:
        scores: condition -> its score (with predictions).
        conditions: condition -> its description (``split`` used).
        tokenizer: Decodes a token id.
    """
    by_split: dict[tuple[str, int], list[str]] = {}
    for name, score in scores.items():
        token = constant_token(score)
        if token is not None:
            by_split.setdefault((conditions.get(name, {}).get("split", "?"), token), []).append(name)
    warnings = []
    for (split, token), names in by_split.items():
        word = tokenizer.decode([token]).strip() if hasattr(tokenizer, "decode") else str(token)
        warnings.append(f"the model answers one constant token, {word!r}, to every prompt of the {split} split under "
                        f"{len(names)} condition(s) ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): "
                        "it may be unable to say these answers (the model organism knows only the words its model "
                        "card lists)")
    return warnings
