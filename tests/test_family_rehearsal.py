"""benchmarks/family_rehearsal.py on a reduced release layout: loads through ``mfv.load`` and its
exactness checks hold (the full-shape runs are in benchmarks/results/family_*_cpu.json)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.family_rehearsal import REFERENCE_HEADS, rehearse, release_config
from mfv.models import hf_families
from mfv.models.families.release import reduce_release, write_release_layout

FAMILY = "llava-onevision"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    family = hf_families()[FAMILY]
    work = tmp_path_factory.mktemp("rehearsal")
    tokens = len(family.stand_in.tokenizer(None))
    config = reduce_release(family.stand_in.release, family.stand_in.reduction, vocab_size=tokens)
    write_release_layout(family, work / "release", config)
    (work / "release" / "COMPLETE").write_text("test\n")
    torch.manual_seed(0)
    return rehearse(FAMILY, work, None)


def test_the_checks_hold_on_a_reduced_layout(result):
    assert result["dtype"] == "bfloat16" and result["layers_run"] == 2
    assert result["null_patch"] <= 1e-7
    assert result["max_diff_aie"] <= 1e-3 and len(result["reference_heads"]) == REFERENCE_HEADS
    assert max(abs(a) for a in result["reference_aie"]) > 0  # the reference heads move the answer
    assert result["max_diff_steered_logits"] <= 1e-2 < result["steering_effect"]
    assert result["seconds_per_prompt"] > 0 and result["load_peak_rss_gb"] > 0


def test_reduced_depth_keeps_the_width_and_the_layer_pattern():
    config = release_config("gemma3", 4)
    release = hf_families()["gemma3"].stand_in.release["text_config"]
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["text_config"]["hidden_size"] == release["hidden_size"]
    if "layer_types" in release:
        assert config["text_config"]["layer_types"] == release["layer_types"][:4]
