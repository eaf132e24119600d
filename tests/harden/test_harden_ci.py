"""The harden report's confidence intervals: per-condition CIs, paired differences vs none and
optimised vs control, and the closing sentence's "no difference"."""

import json

import numpy as np
import torch

from helpers import make_tiny_model
from guard.harden.hardening import ConditionReport, HardenConfig, HardenReport, compare_conditions, harden
from guard.harden.optimize import EPOConfig
from guard.traits import load_trait
from guard.core.vectors import PersonaVector, metadata_for


def _report(gaps_by_condition):
    conditions = []
    for name, gaps in gaps_by_condition.items():
        neutral = [-2.0, -2.1, -1.9, -2.05]
        conditions.append(ConditionReport(name, None if name == "none" else f"{name} prompt", 0.0, 0.0,
                                          float(np.mean(gaps)), float(np.mean(neutral)), None, target=0.0,
                                          values={"projection": [0.1, 0.2, 0.3, 0.4], "preference_gap": gaps,
                                                  "neutral_loglik": neutral}))
    bootstrap = {"n_boot": 500, "level": 0.95, "seed": 0}
    comparisons = compare_conditions(conditions, **bootstrap)
    return HardenReport("sycophancy", 1, "system", {}, conditions, {}, [], [], 1.0, comparisons, bootstrap)


def test_closing_sentence_says_no_difference_when_the_paired_ci_contains_zero():
    none = [0.5, 0.1, -0.2, 0.4, 0.3, 0.0]
    same = _report({"none": none, "instruction": none, "optimised": [g - 0.1 for g in none],
                    "random-direction control": [g - 0.1 + d for g, d in zip(none, (0.02, -0.02, 0.01, -0.01, 0, 0))]})
    text = same.markdown()
    assert "No difference between the optimised prompt and the control" in text
    assert "optimised minus none -0.100 [-0.100, -0.100]" in text
    assert "capability (neutral answers' log-likelihood): optimised -2.013 vs none -2.013; paired difference " \
           "no difference (+0.000 [+0.000, +0.000])" in text
    lower = _report({"none": none, "instruction": none, "optimised": [g - 0.3 for g in none],
                     "random-direction control": [g - 0.05 for g in none]})
    text = lower.markdown()
    assert "The optimised prompt lowers it more than the control does (paired -0.250 [-0.250, -0.250])." in text
    assert "| instruction | no difference (+0.000 [+0.000, +0.000]) |" in text  # projection is the same for all
    data = json.loads(json.dumps(lower.to_dict()))
    assert data["conditions"][0]["vs_none"] == {}
    assert data["conditions"][2]["vs_none"]["preference_gap"]["verdict"] == "lower"
    assert data["comparisons"]["optimised vs random-direction control"]["preference_gap"]["value"] == -0.25


def test_harden_reports_cis_and_paired_differences_on_the_test_items(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    vector = PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)),
                           meta)
    config = HardenConfig(contexts=1, candidates=2,
                          epo=EPOConfig(prompt_length=3, population=2, children_per_member=3, iterations=1, topk=8))
    report = harden(model, smol_tokenizer, vector, load_trait("sycophancy"), config)
    none = report.conditions[0]
    assert none.vs_none == {} and report.bootstrap["n_boot"] == 2000
    for c in report.conditions:
        assert set(c.estimates) == {"projection", "preference_gap", "neutral_loglik"}
        assert abs(c.estimates["preference_gap"].value - c.preference_gap) < 1e-9
        assert abs(c.estimates["neutral_loglik"].value - c.neutral_loglik) < 1e-9
        assert len(c.values["preference_gap"]) == report.validation["test_pairs"]
        assert len(c.values["projection"]) == report.validation["test_questions"]
    for c in report.conditions[1:]:
        for key, difference in c.vs_none.items():
            assert difference.value == float(np.mean(np.subtract(c.values[key], none.values[key])))
    assert set(report.comparisons) == {"optimised vs random-direction control"}
    text = report.markdown()
    assert "Each condition minus none, paired over the same test items" in text and "95% CI" in text
    saved = json.loads(json.dumps(report.to_dict()))
    assert saved["conditions"][1]["vs_none"]["preference_gap"]["verdict"] in ("higher", "lower", "no difference")
