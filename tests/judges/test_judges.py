"""Judge mechanics: score aggregation, the local judge's exact number distribution, caching."""

import math

import pytest
import torch

from guard.core.chat import format_prompt
from guard.judges import COHERENCE_RUBRIC, CachedJudge, JudgeFilter, render_rubric, score_from_candidates
from guard.judges.local import LocalJudge
from guard.core.layers import active_hook_count

from helpers import make_tiny_model

RUBRIC = "Rate {answer} as an answer to {question}. Reply with a number from 0 to 100."


def test_score_from_candidates_is_the_papers_weighted_mean():
    assert score_from_candidates([("80", 0.5), ("90", 0.3), ("Hello", 0.2)]) == pytest.approx((40 + 27) / 0.8)
    # the same integer written twice adds up; out-of-range and non-integers are ignored
    assert score_from_candidates([("7", 0.2), (" 7", 0.2), ("101", 0.5), ("-3", 0.1)]) == pytest.approx(7)
    assert score_from_candidates([("REFUSAL", 0.8), ("10", 0.2)]) is None  # numeric mass < 25%
    assert score_from_candidates([("REFUSAL", 0.8), ("10", 0.2)], min_mass=0.1) == pytest.approx(10)


def _brute_force(model, tokenizer, prompt_ids, paths):
    """P(k) from one unbatched, uncached forward per prefix: the definition the judge implements."""
    def logprobs(prefix):
        ids = torch.tensor([prompt_ids + list(prefix)])
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)

    prefixes = {path[:i] for path in paths.values() for i in range(len(path))} | set(paths.values())
    inner = {p for p in prefixes if any(len(q) > len(p) and q[:len(p)] == p for q in paths.values())}
    table = {p: logprobs(p) for p in inner | {()}}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    digit = torch.tensor([t[0].isdigit() for t in tokens] + [False] * (model.config.vocab_size - len(tokens)))
    result = {}
    for k, path in paths.items():
        p = math.exp(sum(float(table[path[:i]][tok]) for i, tok in enumerate(path)))
        if path in inner and path:
            p *= 1 - float(table[path].exp()[digit].sum())
        result[k] = p
    return result


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_local_judge_distribution_matches_brute_force(arch, smol_tokenizer):
    model = make_tiny_model(arch, vocab_size=len(smol_tokenizer))
    if arch == "gemma2":  # a window shorter than the judge prompt exercises the sliding-window cache
        model.config.sliding_window = 8
        for layer in model.model.layers:
            layer.self_attn.sliding_window = 8 if layer.self_attn.sliding_window else None
    judge = LocalJudge(model, smol_tokenizer)
    got = judge.distribution("Is the sky green?", "Yes, absolutely.", RUBRIC)
    prompt = format_prompt(smol_tokenizer, render_rubric(RUBRIC, "Is the sky green?", "Yes, absolutely."))
    prompt_ids = smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    paths = judge._number_paths(prompt)
    assert paths[100] == tuple(smol_tokenizer("100", add_special_tokens=False)["input_ids"])  # digits: 1, 0, 0
    with torch.no_grad():
        expected = _brute_force(model, smol_tokenizer, prompt_ids, paths)
    assert set(got) == set(range(101))
    for k in range(101):
        assert got[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-12), k
    assert 0 < sum(got.values()) <= 1 + 1e-6
    assert active_hook_count(model) == 0 and not model.training


def test_local_judge_scores_a_model_that_always_says_42(smol_tokenizer):
    """A model that answers '4', then '2', then ends its turn must score 42, not 4 or 4.2."""
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    four, two, end = (smol_tokenizer.convert_tokens_to_ids(t) for t in ("4", "2", "<|im_end|>"))
    real_forward = model.forward

    def forward(input_ids=None, **kwargs):
        out = real_forward(input_ids=input_ids, **kwargs)
        logits = torch.full_like(out.logits, -1e4)
        after_four = input_ids == four
        logits[..., four] = torch.where(after_four | (input_ids == two), -1e4, 30.0)
        logits[..., two] = torch.where(after_four, 30.0, -1e4)
        logits[..., end] = 0.0
        out.logits = logits
        return out

    model.forward = forward
    judge = LocalJudge(model, smol_tokenizer)
    assert judge.score("q", "a", RUBRIC) == pytest.approx(42, abs=1e-6)
    assert sum(judge.distribution("q", "a", RUBRIC).values()) == pytest.approx(1, abs=1e-6)


def test_judge_filter_rule():
    rule = JudgeFilter(judge=None)  # type: ignore[arg-type]
    assert rule.keep(60, True, 80) and not rule.keep(50, True, 80) and not rule.keep(60, True, 40)
    assert rule.keep(40, False, 50) and not rule.keep(50, False, 80) and not rule.keep(None, False, 90)
    assert JudgeFilter(judge=None, coherence_threshold=None).keep(60, True, None)  # type: ignore[arg-type]
    assert "{question}" in COHERENCE_RUBRIC and "{answer}" in COHERENCE_RUBRIC


def test_cached_judge_scores_each_answer_once_and_survives_reopening(tmp_path):
    class Counting:
        name = "counting"
        calls = 0

        def score(self, question, answer, rubric):
            Counting.calls += 1
            return None if answer == "refuse" else float(len(answer))

    first = CachedJudge(Counting(), tmp_path / "judge.sqlite")
    assert first.score("q", "abc", RUBRIC) == 3.0 and first.score("q", "abc", RUBRIC) == 3.0
    assert first.score("q", "refuse", RUBRIC) is None and first.score("q", "refuse", RUBRIC) is None
    assert first.score("q", "abc", COHERENCE_RUBRIC) == 3.0  # another rubric is another question
    assert Counting.calls == 3 and first.hits == 2
    first.close()
    again = CachedJudge(Counting(), tmp_path / "judge.sqlite")
    assert again.score("q", "abc", RUBRIC) == 3.0 and again.score("q", "refuse", RUBRIC) is None
    assert Counting.calls == 3
