"""The auto-steering pipeline end to end on tiny random models of two architectures with a tiny
SAE: the spec it writes, the dev/test split it keeps, the density filter, the report."""

import json
import math
from contextlib import contextmanager

import pytest
import torch
from conftest import DESCRIPTION, LAYER, make_sae, tiny_model

import guard.autosteer.data as autosteer_data
from guard.autosteer import (
    AutosteerConfig,
    AutosteerError,
    AutosteerResult,
    autosteer,
    build_contrastive,
    ensure_dev_only,
    load_prompt_bank,
    retrieve_latents,
)
from guard.autosteer.pipeline import (
    CONTROL_FILES,
    MARKDOWN_FILE,
    REPORT_FILE,
    SPEC_FILE,
)
from guard.core.layers import active_hook_count
from guard.core.steering import Steering
from guard.errors import VectorMismatchError
from guard.measure import behavior

PLANTED = 5
TINY = AutosteerConfig(k=2, candidates=6, cosine_candidates=2, budget=3, n_dev=3, n_test=3, max_new_tokens=4,
                       n_boot=200, min_output_score=-1e6, samples=1)


@contextmanager
def prompts_seen_per_stage():
    """Record every user prompt templated for the model, with the pipeline stage running then."""
    seen: dict[str, set] = {}
    stage = {"now": None}
    originals = {module: module.format_prompt for module in (autosteer_data, behavior)}

    def recording(original):
        def format_prompt(tokenizer, user, system=None):
            seen.setdefault(stage["now"], set()).add(user)
            return original(tokenizer, user, system)
        return format_prompt

    for module, original in originals.items():
        module.format_prompt = recording(original)
    try:
        yield seen, (lambda name: stage.__setitem__("now", name))
    finally:
        for module, original in originals.items():
            module.format_prompt = original


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def run(request, word_tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the per-test one_thread
    model = tiny_model(request.param, word_tokenizer)
    sae = make_sae(model, planted=PLANTED)
    with prompts_seen_per_stage() as (seen, on_stage):
        result = autosteer(model, word_tokenizer, sae, DESCRIPTION, TINY, sae_source="tiny-sae", on_stage=on_stage)
    torch.set_num_threads(threads)
    return model, sae, result, seen, request.param


def test_the_spec_loads_on_its_model_and_is_refused_on_another(run, tmp_path, word_tokenizer):
    model, _, result, _, arch = run
    out = result.save(tmp_path / "out", model)
    assert {SPEC_FILE, REPORT_FILE, MARKDOWN_FILE, *CONTROL_FILES.values()} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # the temporary directory is gone
    spec = Steering.load(out / SPEC_FILE, model)
    assert sorted(spec.vectors) == [LAYER] and spec.operator == "add" and spec.coeff == 1.0
    assert torch.allclose(spec.vectors[LAYER], result.steering.vectors[LAYER])
    assert spec.description["method"] == "sae-autosteer" and spec.description["concept"] == DESCRIPTION
    assert [entry["latent"] for entry in spec.description["latents"]] == [r.latent for r in result.latents]
    other = tiny_model(arch, word_tokenizer, seed=3)
    with pytest.raises(VectorMismatchError, match="different weights"):
        Steering.load(out / SPEC_FILE, other)
    with pytest.raises(VectorMismatchError):
        AutosteerResult.load(out, other)
    loaded = AutosteerResult.load(out, model)
    assert loaded.to_dict() == result.to_dict()
    ids = torch.tensor([word_tokenizer("How are you today ?")["input_ids"]])
    with spec.apply(model):
        steered = model(input_ids=ids).logits
    assert active_hook_count(model) == 0
    assert not torch.allclose(steered, model(input_ids=ids).logits)  # it acts, and its hooks are gone after
    with pytest.raises(AutosteerError, match="not an empty directory"):
        result.save(out, model)


def test_test_prompts_never_reach_selection_or_tuning(run):
    _, _, result, seen, _ = run
    split = load_prompt_bank().take(TINY.n_dev, TINY.n_test)
    assert not set(split.dev) & set(split.test)
    for stage in ("dev data", "retrieval", "tuning", "tuning diffmean", "tuning control"):
        assert seen[stage], stage
        assert seen[stage] <= set(split.dev), stage
    assert set(split.test) <= seen["test data"] and seen["report"] >= set(split.test)
    assert result.prompts["dev"] == list(split.dev) and result.prompts["test"] == list(split.test)


def test_density_filter_drops_the_always_on_latent(run):
    _, _, result, _, _ = run
    planted = next(r for r in result.records if r.latent == PLANTED)
    assert planted.status == "dropped" and planted.rule == "dense" and planted.density == 1.0
    assert planted.mean_difference != 0 and "mean difference" in planted.picked_by
    assert PLANTED not in [r.latent for r in result.latents]
    assert result.retrieval["counts"]["dense"] >= 1
    for record in result.records:
        assert record.status in ("chosen", "dropped") and record.rule
        if record.status == "chosen":
            assert record.density <= TINY.max_density and record.output_score is not None
            assert record.auroc is not None and 0 <= record.auroc <= 1


def test_the_report_compares_every_condition_with_cis(run):
    _, _, result, _, _ = run
    names = [c.name for c in result.conditions]
    assert names == ["none", "prompt", "autosteer", "prompt + autosteer", "diffmean", "random latents"]
    for condition in result.conditions:
        for key in ("concept", "fluency", "relevance", "harmonic", "capability"):
            estimate = condition.estimates[key]
            assert estimate.low <= estimate.value <= estimate.high and estimate.level == 0.95
            if key != "capability":
                assert 0 <= estimate.value <= 1 and estimate.n == len(result.prompts["test"])
        assert (condition.name == "none") == (not condition.vs_none)
    assert set(result.comparisons) == set(names) - {"autosteer"}
    assert result.searches["autosteer"].best.score == max(t.score for t in result.searches["autosteer"].trials)
    assert result.strengths == list(result.searches["autosteer"].best.strengths)
    assert len(result.searches["autosteer"].trials) <= TINY.budget
    assert set(result.timings) == {"dev data", "retrieval", "tuning", "tuning diffmean", "tuning control",
                                   "test data", "report"}
    json.dumps(result.to_dict())  # JSON-ready
    assert "## Latents" in result.markdown() and "random latents" in result.markdown()
    control = result.controls["random latents"].description["latents"]
    assert not set(control) & {r.latent for r in result.records}


def test_retrieval_refuses_test_prompts(word_tokenizer):
    model = tiny_model("llama", word_tokenizer)
    sae = make_sae(model)
    split = load_prompt_bank().take(2, 2)
    test_set = build_contrastive(model, word_tokenizer, split.test, DESCRIPTION, "test", max_new_tokens=3)
    with pytest.raises(AutosteerError, match="test prompt"):
        retrieve_latents(model, word_tokenizer, sae, LAYER, test_set,
                         check_prompts=lambda prompts: ensure_dev_only(prompts, split, "retrieval"))
    with pytest.raises(AutosteerError, match="empty"):
        autosteer(model, word_tokenizer, sae, "   ", TINY)
    from guard.errors import SAEError

    with pytest.raises(SAEError, match="other weights"):
        autosteer(tiny_model("llama", word_tokenizer, seed=3), word_tokenizer, sae, DESCRIPTION, TINY)
    with pytest.raises(SAEError, match="not layer 2"):
        autosteer(model, word_tokenizer, sae, DESCRIPTION, TINY, layer=2)


def test_shipped_bank_and_config():
    bank = load_prompt_bank()
    assert len(bank.dev) + len(bank.test) >= 60 and not set(bank.dev) & set(bank.test)
    assert len(set(bank.dev)) == len(bank.dev) and len(set(bank.test)) == len(bank.test)
    with pytest.raises(AutosteerError, match="both dev and test"):
        type(bank)(("a", "b"), ("b",), "x")
    with pytest.raises(AutosteerError, match="test prompt"):
        ensure_dev_only([bank.dev[0], bank.test[0]], bank, "tuning")
    assert AutosteerConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(AutosteerError, match="unknown autosteer setting"):
        AutosteerConfig.from_dict({"budgett": 3})
    for bad in ({"budget": 0}, {"max_density": 1.5}, {"positions": "prompt"}, {"control": "none"},
                {"max_strength": math.inf}):
        with pytest.raises(AutosteerError):
            AutosteerConfig(**bad)
