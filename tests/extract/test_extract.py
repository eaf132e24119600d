import pytest
import torch

from guard.core.chat import format_prompt
from guard.extract.extraction import ExtractionConfig, ExtractionError, extract_vector
from guard.core.generation import SamplingConfig, encode, generate
from guard.judges import COHERENCE_RUBRIC, JudgeFilter
from guard.traits import load_trait

SMALL = ExtractionConfig(max_questions=2, max_pairs=2, samples_per_prompt=2,
                         sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3),
                         generation_batch_size=3, forward_batch_size=3)


def test_vector_is_difference_of_mean_response_activations(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    result = extract_vector(model, tokenizer, load_trait("sycophancy"), SMALL)
    kept = [s for s in result.samples if s.kept]
    assert len(result.samples) == 2 * 2 * 2 * 2
    # Recompute every sample alone, unpadded, with output_hidden_states: mean over response tokens.
    per_sample = []
    for s in kept:
        prompt = encode(tokenizer, [s.prompt])[0]
        ids = torch.tensor([prompt + s.response_ids])
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        per_sample.append(torch.stack([h[0, len(prompt):].mean(0) for h in hs[1:-1]]))
    acts = torch.stack(per_sample)
    pos = torch.tensor([s.positive for s in kept])
    want = acts[pos].mean(0) - acts[~pos].mean(0)
    got = result.vector.vectors[:-1]  # last layer differs from hidden_states[-1] by the final norm
    assert (got - want).abs().max() < 1e-4


def test_metadata_records_settings_and_counts(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    vec = extract_vector(model, tokenizer, load_trait("evil"), SMALL).vector
    meta = vec.meta
    assert meta.trait == "evil" and meta.num_layers == 3 and meta.hidden_size == 32
    assert meta.extraction["sampling"] == {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 3}
    assert meta.extraction["judge"] is None and meta.extraction["trait_fingerprint"]
    assert meta.counts["pos_generated"] == meta.counts["neg_generated"] == 8
    assert len(meta.layer_stats["effect_size"]) == 3 and len(meta.norms) == 3
    vec.check_model(model)


def test_sampling_is_reproducible(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    prompts = encode(tokenizer, [format_prompt(tokenizer, q) for q in ("Hi there", "A much longer question here?")])
    a = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=5, seed=7), batch_size=1)
    b = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=5, seed=7), batch_size=1)
    assert a == b and all(0 < len(r) <= 5 for r in a)


class ParityJudge:
    """Deterministic and checkable: trait score by answer-length parity, coherence low for lengths divisible by 3."""
    name = "parity-test-judge"

    def __init__(self):
        self.calls = 0

    def score(self, question, answer, rubric):
        self.calls += 1
        assert "{question}" in rubric
        if rubric == COHERENCE_RUBRIC:
            return 20.0 if len(answer) % 3 == 0 else 80.0
        return 100.0 if len(answer) % 2 else 0.0


def test_judge_filter_keeps_trait_positive_high_and_negative_low_and_coherent(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    judge = ParityJudge()
    result = extract_vector(model, tokenizer, load_trait("sycophancy"), SMALL, judge=JudgeFilter(judge))
    nonempty = [s for s in result.samples if s.response_ids]
    trait_ok = [(s.score > 50) if s.positive else (s.score < 50) for s in nonempty]
    # coherence is asked only of answers that passed the trait rule
    assert judge.calls == len(nonempty) + sum(trait_ok)
    for s, ok in zip(nonempty, trait_ok):
        assert (s.coherence is not None) == ok
        assert s.kept == (ok and s.coherence >= 50)
    assert any(ok and s.coherence < 50 and not s.kept for s, ok in zip(nonempty, trait_ok))
    counts = result.vector.meta.counts
    assert counts["pos_kept"] == sum(s.kept and s.positive for s in result.samples)
    assert result.vector.meta.extraction["judge"] == {
        "judge": "parity-test-judge", "pos_threshold": 50.0, "neg_threshold": 50.0, "coherence_threshold": 50.0}


def test_nothing_left_after_filtering_is_a_clear_error(tiny_chat_model):
    model, tokenizer = tiny_chat_model

    class Never:
        name = "never"

        def score(self, question, answer, rubric):
            return None

    with pytest.raises(ExtractionError, match="no trait-positive answers left.*judge thresholds"):
        extract_vector(model, tokenizer, load_trait("sycophancy"), SMALL, judge=JudgeFilter(Never()))
