"""Release layouts of the Hugging Face families, for full-size rehearsals and loading tests: a
random model with a family's release config (or a reduction of it), saved as a download is
(:func:`mfv.models.families.release.write_release_layout`)."""

from __future__ import annotations

from functools import partial

from mfv.models.families import qwen3vl, qwen25vl
from mfv.models.families.release import write_release_layout

QWEN3VL_4B_INSTRUCT = qwen3vl.RELEASE
QWEN25VL_3B_INSTRUCT = qwen25vl.RELEASE
write_qwen3vl_layout = partial(write_release_layout, qwen3vl.FAMILY)
write_qwen25vl_layout = partial(write_release_layout, qwen25vl.FAMILY)
