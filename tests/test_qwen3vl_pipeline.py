"""Loading Qwen3-VL from files: clear errors for missing weights (the pipeline on the stand-in is
tests/test_families_pipeline.py)."""

from __future__ import annotations

import pytest

from mfv.errors import MissingWeightsError
from mfv.models import load_backbone


def test_missing_qwen_weights_are_a_clear_error(tmp_path):
    """A hub id not in the cache: the download command; a local folder that is not there:
    what it should hold, never a download of a local path."""
    missing = tmp_path / "no-such-qwen"
    with pytest.raises(MissingWeightsError, match="holds config.json") as local:
        load_backbone("qwen3vl", model_path=str(missing))
    assert "huggingface-cli" not in str(local.value) and str(missing) in str(local.value)
    with pytest.raises(MissingWeightsError, match="huggingface-cli download Qwen/No-Such-Model"):
        load_backbone("qwen3vl", model_path="Qwen/No-Such-Model", cache_dir=str(tmp_path / "hub"))
