"""``evaluation.protocol: authors`` on the model organism: the authors' filter changes the
scored set (only test prompts whose eval prompt of the same relation and image file was
answered with 4-shot ICL), their prompt counts, the layer chosen on test, and report.md."""

from __future__ import annotations

import pytest
import torch

from mfv.data.datamodule import SyntheticRelationDataModule
from mfv.errors import ConfigError
from mfv.evaluation.authors import AUTHORS_FILTER_SHOTS, _kept, eval_matches
from mfv.evaluation.engine import score_conditions
from mfv.evaluation.protocol import EvaluationSettings, Vectors, evaluate
from mfv.evaluation.report import report_markdown
from mfv.method.function_vector import FunctionVectorSet
from mfv.method.settings import AIESettings
from mfv.models import load_backbone

RELATIONS = ["above", "below", "left", "right"]
# 12 test images but 8 eval images: test images 8..11 have no eval image of the same file.
NUM_IMAGES = {"eval": 8, "train": 8, "test": 12, "novel": 6, "composite": 4}


@pytest.fixture(scope="module")
def organism():
    adapter = load_backbone("openflamingo-tiny")
    adapter.model.eval()
    return adapter


@pytest.fixture(scope="module")
def datamodule(organism, tmp_path_factory):
    data = SyntheticRelationDataModule(data_dir=str(tmp_path_factory.mktemp("authors")), relations=RELATIONS,
                                       shots=4, image_size=64, num_images=NUM_IMAGES, batch_size=16)
    data.attach(organism)
    data.prepare_data()
    return data


@pytest.fixture(scope="module")
def runs(organism, datamodule):
    """Both protocols on the same data and vectors; the authors' filter pass is recorded."""
    vectors = Vectors(FunctionVectorSet({r: torch.randn(organism.hidden_size, generator=torch.Generator().manual_seed(i))
                                         for i, r in enumerate(RELATIONS)}, 1, {}, organism.backbone_id,
                                        organism.shape_signature()))
    passes = []

    def scorer(conditions):
        passes.append([c.name for c in conditions])
        return score_conditions(organism, conditions, 16)

    settings = dict(shots=[1], sweep_limit=12, analogies=False)
    authors = evaluate(organism, datamodule, vectors, EvaluationSettings(protocol="authors", **settings), scorer)
    mfv = evaluate(organism, datamodule, vectors, EvaluationSettings(**settings), scorer)
    return authors, mfv, passes


def test_test_prompts_meet_the_eval_prompt_of_their_image_file(datamodule):
    # The synthetic splits name their images alike: test image i meets eval image i (same relation).
    assert eval_matches(datamodule, "test", 12) == {i: i for i in range(8)}


def test_authors_filter_changes_the_scored_set(organism, datamodule, runs):
    authors, mfv, passes = runs
    assert passes[0] == ["authors_filter"]  # the filter runs before anything is built
    # Which eval prompts the organism answers with 4-shot ICL, scored independently.
    extraction = datamodule.sampler("eval")
    from mfv.data.episodes import EpisodeList
    from mfv.evaluation.conditions import Condition

    episodes = EpisodeList([extraction.episode(j, "clean", AUTHORS_FILTER_SHOTS) for j in range(8)], RELATIONS)
    correct = score_conditions(organism, [Condition("eval", "test", "eval", episodes)], 16)["eval"].correct
    kept = [i for i in range(8) if correct[i]]
    assert 0 < len(kept) < 12
    test_filter = authors.settings["protocol"]["filter"]["test"]
    assert test_filter == {"n": 12, "matched": 8, "kept": len(kept), "note": test_filter["note"]}
    assert f"kept {len(kept)} of 12" in test_filter["note"]
    # Every test condition (and the test sweep) scores only the kept prompts; mfv scores all 12.
    for name in ("zero_shot", "zero_shot_fv", "icl_1", "icl_shuffled_4"):
        assert authors.scores[name].n == len(kept), name
        assert mfv.scores[name].n == 12, name
    assert authors.sweeps["layer"]["test"]["n"] == len(kept)
    # The kept prompts are the same prompts under both protocols: their outcomes agree row by row.
    assert (authors.scores["zero_shot"].correct == mfv.scores["zero_shot"].correct[kept]).all()


def test_authors_choose_the_layer_on_test(runs):
    authors, mfv, _ = runs
    layer = authors.sweeps["layer"]
    assert layer["chosen_on"] == "test" and mfv.sweeps["layer"]["chosen_on"] == "val"
    assert layer["test"]["accuracy"][layer["x"].index(layer["chosen"])] == max(layer["test"]["accuracy"])
    assert authors.settings["protocol"]["name"] == "authors" and mfv.settings["protocol"] == {"name": "mfv"}


def test_report_lists_the_protocol(runs):
    authors, mfv, _ = runs
    for result in (authors, mfv):
        result.extraction = {"heads_for_half_positive_aie": 1, "lm_heads": 64,
                             "heads_for_half_positive_aie_share": 1 / 64, "top10_positive_aie_share": 0.5}
    text = report_markdown(authors.to_dict())
    assert "## Protocol: the authors'" in text and "n kept" in text and "on the test split" in text
    assert "Best injection layer on the test split" in text
    assert "Protocol: the authors'" not in report_markdown(mfv.to_dict())


def test_authors_prompt_counts_and_settings(datamodule):
    aie = AIESettings(num_mean_prompts=3, num_aie_prompts=2, aie_filter="all")
    counted = EvaluationSettings(protocol="authors").aie_settings(aie, datamodule)
    assert (counted.num_mean_prompts, counted.num_aie_prompts, counted.aie_filter) == (8, 8, "clean_correct")
    assert EvaluationSettings().aie_settings(aie, datamodule) is aie
    with pytest.raises(ConfigError, match="evaluation.protocol"):
        EvaluationSettings(protocol="paper").validate()


def test_image_disjoint_splits_keep_every_prompt(datamodule):
    kept = _kept(datamodule, "test", 12, {}, {})
    assert kept.kept == list(range(12)) and "cannot apply" in kept.note


def test_the_preflight_states_the_authors_counts_and_where_layer_and_k_are_chosen(datamodule):
    """What the preflight checks the data against (mfv.preflight.plan_evaluation): every eval
    prompt under the authors' protocol, and the sweeps' choice on test."""
    from mfv.evaluation.requirements import requirements

    aie = AIESettings(num_mean_prompts=3, num_aie_prompts=2)
    authors = EvaluationSettings(protocol="authors")
    uses = requirements(authors, datamodule, authors.aie_settings(aie, datamodule))
    assert uses["eval"].prompts == {"aie.num_mean_prompts": 8, "aie.num_aie_prompts": 8}
    assert "layer and K" in uses["test"].purpose and "chosen on test" in uses["val"].purpose
    mfv = requirements(EvaluationSettings(), datamodule, aie)
    assert mfv["eval"].prompts == {"aie.num_mean_prompts": 3, "aie.num_aie_prompts": 2}
    assert mfv["test"].purpose == "evaluation"
