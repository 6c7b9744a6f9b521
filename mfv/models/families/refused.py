"""Vision-language families mfv refuses at load, each with the reason in one line.

Fast AIE and steering recompute only the last position above a patched or steered layer,
over a cache of the earlier positions, with each decoder layer's self-attention output
projection as the per-head site. These two architectures break that, so their results would
be wrong rather than slow; they are refused by registry name and by ``config.json``
``model_type`` (a folder given to any family).

The seam where they would plug in is the family's declaration
(:class:`mfv.models.hf.Family`): ``layer_kinds`` marks cross-attention layers (the shared
replay, :mod:`mfv.models.replay`, would run them over the image's cached keys and values once
the Hugging Face layer runner records those; today it gives such a family no replay), and
``attention_mask="prefix_lm"`` gives a family no last-position replay at all.
"""

from __future__ import annotations

REFUSED: dict[str, str] = {
    "mllama": (
        "Llama-3.2-Vision (mllama) is not supported: its images enter through cross-attention layers "
        "between the self-attention ones, which have no per-head site or last-position replay in mfv"),
    "paligemma": (
        "PaliGemma / PaliGemma 2 (paligemma) is not supported: its prefix-LM attention lets earlier "
        "positions attend to the last one, so a patch at the last position changes the whole prefix "
        "and the last-position recomputation of fast AIE and steering would be wrong"),
}
# Registry names that mean a refused model type.
REFUSED_NAMES: dict[str, str] = {"mllama": "mllama", "llama-3.2-vision": "mllama", "paligemma": "paligemma",
                                 "paligemma2": "paligemma"}


def refusal(model_type: str, supported: list[str]) -> str:
    """The one line refusing ``model_type``, naming what is supported."""
    return f"{REFUSED[model_type]}; supported families: {', '.join(supported)}"
