"""RESGA hardening on a tiny model with SmolLM2's chat template: slots match deployment, the
pipeline selects on validation and reports four conditions."""

import json

import torch

from helpers import make_tiny_model
from guard.harden.hardening import (HardenConfig, ab_direction, away_from, harden, in_context_check, place, projections,
                          suffix_slot, system_slot)
from guard.core.data import ABItem
from guard.harden.optimize import EPO, EPOConfig
from guard.traits import load_trait
from guard.core.vectors import PersonaVector, metadata_for


def _vector(model, layer=1):
    meta = metadata_for(model, "sycophancy", recommended_layer=layer)
    return PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)), meta)


def test_optimised_target_equals_the_deployed_prompt_projection(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    direction = _vector(model).layer(1)
    questions = ["Is my plan good?", "Do you agree with me?"]
    for make_slot, placement in ((system_slot, "system"), (suffix_slot, "suffix")):
        slot = make_slot(smol_tokenizer, questions)
        check = in_context_check(smol_tokenizer, slot, questions[0], placement)
        epo = EPO(model, smol_tokenizer, away_from(direction), 1, slot, EPOConfig(prompt_length=5), validate=check)
        ids = epo._random_prompts(3, torch.Generator().manual_seed(0))
        targets, _ = epo.evaluate(ids)
        for row in range(3):
            text = smol_tokenizer.decode(ids[row].tolist())
            deployed = [place(smol_tokenizer, q, text, placement) for q in questions]
            expected = -sum(projections(model, smol_tokenizer, deployed, direction, 1)) / 2
            assert abs(targets[row].item() - expected) < 1e-4, (placement, text)


def test_ab_direction_is_trait_minus_good(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    items = [ABItem("Choose: (A) yes (B) no", "A", "B"), ABItem("Pick (A) or (B)", "B", "A")]
    direction = ab_direction(model, smol_tokenizer, items, layer=1)
    swapped = ab_direction(model, smol_tokenizer, [ABItem(i.question, i.not_matching, i.matching) for i in items], 1)
    assert torch.allclose(direction, -swapped, atol=1e-5) and direction.norm() > 0


def test_harden_reports_four_conditions_selected_on_validation(smol_tokenizer, tmp_path):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    vector = _vector(model)
    config = HardenConfig(contexts=2, candidates=3, epo=EPOConfig(prompt_length=4, population=4, children_per_member=6,
                                                                  iterations=4, topk=32, restart_every=2))
    report = harden(model, smol_tokenizer, vector, load_trait("sycophancy"), config)
    names = [c.name for c in report.conditions]
    assert names == ["none", "instruction", "optimised", "random-direction control"]
    none, _, optimised, control = report.conditions
    assert none.projection_shift == 0 and optimised.prompt and control.prompt
    assert optimised.prompt in [s["text"] for s in report.validation["optimised"]]
    best_val = max(report.validation["optimised"], key=lambda s: s["validation_target"])
    assert optimised.prompt == best_val["text"]  # picked on validation, not on test
    assert report.validation["validation_questions"] + report.validation["test_questions"] == 25
    paths = report.save(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["trait"] == "sycophancy" and len(saved["conditions"]) == 4
    assert "random-direction control" in paths["markdown"].read_text()


def test_seed_initialisation_starts_from_the_given_text(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    vector = _vector(model)
    init = "Think critically and disagree if necessary."
    config = HardenConfig(contexts=1, candidates=2, init=init,
                          epo=EPOConfig(prompt_length=3, population=2, children_per_member=3, iterations=1, topk=8))
    report = harden(model, smol_tokenizer, vector, load_trait("sycophancy"), config)
    n_tokens = len(smol_tokenizer(init, add_special_tokens=False)["input_ids"])
    frontier_lengths = {len(c["ids"]) for c in report.frontier}
    assert frontier_lengths == {n_tokens}  # the prompt length follows the initial text
    assert report.config["init"] == init
