"""Screening on a tiny Llama with SmolLM2's tokenizer: exact scores, one forward for all traits,
resume after a crash, the generation cache, refusals, flags, thresholds."""

import json

import pytest
import torch

from helpers import make_tiny_model
from guard.core.chat import format_messages
from guard.core.layers import find_decoder_layers
from guard.screen.samples import Sample
from guard.core.forward import plan_batches
from guard.core.readout import ReadKey
from guard.screen.scoring import (SampleScore, ScreenConfig, ScreenError, Screener, ScreenResult, fit_window, flagged,
                                  percentile, resolve_thresholds, set_relative_scores, set_z_scores)
from guard.core.vectors import PersonaVector, VectorMismatchError, metadata_for

RESPONSES = ["Yes! Brilliant, you are a genius.", "It has a flaw: the budget.", "Sure.",
             "I love it, perfect in every way, change nothing at all.", "No.", "Maybe; it depends on the market."]


def _samples(n=6):
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Is my plan number {i} good?" + " Please answer." * (i % 3)}]
        if i % 4 == 3:  # some multi-turn
            prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] + prompt
        out.append(Sample(f"s{i}", i, tuple(prompt), RESPONSES[i % len(RESPONSES)], f"mem:{i}"))
    return out


def _vector(model, trait, layer, seed):
    meta = metadata_for(model, trait, recommended_layer=layer)
    return PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(seed)), meta)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    return model, smol_tokenizer, [_vector(model, "sycophancy", 1, 0), _vector(model, "evil", 2, 1)]


def _direct(model, tokenizer, sample, response_text, vector, layer):
    """Batch-1 reference: a plain full forward, the block's output read by a bare hook
    (hidden_states[-1] would be after the final norm)."""
    prompt = tokenizer(format_messages(tokenizer, list(sample.prompt)), add_special_tokens=False)["input_ids"]
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    seen = []
    hook = find_decoder_layers(model)[layer].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt + response]))
    finally:
        hook.remove()
    hidden = seen[0][0]
    unit = vector.unit(layer)
    return float(hidden[len(prompt):].mean(0) @ unit), float(hidden[len(prompt) - 1] @ unit)


def test_scores_equal_batch_one_forwards_for_every_trait(tiny, tmp_path):
    model, tokenizer, vectors = tiny
    samples = _samples()
    screener = Screener(model, tokenizer, vectors, ScreenConfig(mode="full", max_new_tokens=6, token_budget=64),
                        generation_cache=tmp_path / "gen.sqlite")
    result = screener.score(samples)
    assert [k.name for k in result.keys] == ["sycophancy", "evil"] and result.generated == len(samples)
    for scored, sample in zip(result.samples, samples):
        for vector in vectors:
            entry = scored.scores[vector.trait]
            layer = vector.default_layer()
            mean, last = _direct(model, tokenizer, sample, sample.response, vector, layer)
            base_mean, _ = _direct(model, tokenizer, sample, scored.base_response, vector, layer)
            assert entry["projection"] == pytest.approx(mean, abs=1e-4)
            assert entry["approx"] == pytest.approx(mean - last, abs=1e-4)
            assert entry["base_projection"] == pytest.approx(base_mean, abs=1e-4)
            assert entry["delta_p"] == pytest.approx(mean - base_mean, abs=1e-4)
            assert entry["score"] == entry["delta_p"]


def test_one_forward_per_batch_serves_all_traits_and_stops_early(tiny):
    model, tokenizer, vectors = tiny
    blocks = find_decoder_layers(model)
    calls = {"first": 0, "last": 0}
    hooks = [blocks[0].register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1)),
             blocks[-1].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))]
    try:
        config = ScreenConfig(mode="approx", token_budget=10_000)
        result = Screener(model, tokenizer, vectors, config).score(_samples())
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["first"] == 1  # six samples, two traits at two layers: one batch, one forward
    assert calls["last"] == 1  # layer 2 is the last block here; with layer 1 only it would not run
    assert all(s.scores["evil"]["score"] == s.scores["evil"]["approx"] for s in result.samples)
    only_low = Screener(model, tokenizer, vectors[:1], config)
    calls.update(first=0, last=0)
    hooks = [blocks[-1].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))]
    try:
        only_low.score(_samples())
    finally:
        hooks[0].remove()
    assert calls["last"] == 0


def test_interrupted_run_resumes_to_an_identical_report(tiny, tmp_path, monkeypatch):
    model, tokenizer, vectors = tiny
    samples = _samples()
    config = ScreenConfig(mode="full", max_new_tokens=5, token_budget=40)  # several batches per stage
    cache = tmp_path / "gen.sqlite"
    clean = Screener(model, tokenizer, vectors, config, generation_cache=cache).score(
        samples, checkpoint_path=tmp_path / "clean.jsonl")
    import guard.screen.scoring as screen_module

    real = screen_module.project_batch
    done = {"n": 0}

    def crash_on_third(*args, **kwargs):
        done["n"] += 1
        if done["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(screen_module, "project_batch", crash_on_third)
    screener = Screener(model, tokenizer, vectors, config, generation_cache=cache)
    with pytest.raises(KeyboardInterrupt):
        screener.score(samples, checkpoint_path=tmp_path / "ckpt.jsonl")
    lines = (tmp_path / "ckpt.jsonl").read_text().splitlines()
    assert len(lines) == 3  # fingerprint + the two finished batches
    with open(tmp_path / "ckpt.jsonl", "a") as out:
        out.write('{"stage": "train", "batch": 9, "ind')  # a write cut off mid-line by the crash
    monkeypatch.setattr(screen_module, "project_batch", real)
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(screen_module, "project_batch", counting)
    notes = []
    resumed = screener.score(samples, checkpoint_path=tmp_path / "ckpt.jsonl", warn=notes.append)
    assert any("resuming" in n and "2 batches" in n for n in notes)
    total_batches = len((tmp_path / "clean.jsonl").read_text().splitlines()) - 1
    assert total_batches >= 4
    assert calls["n"] == total_batches - 2  # nothing redone, nothing skipped
    entries = [json.loads(line) for line in (tmp_path / "ckpt.jsonl").read_text().splitlines()[1:]]
    assert sorted((e["stage"], e["batch"]) for e in entries) == sorted(
        (e["stage"], e["batch"]) for e in map(json.loads, (tmp_path / "clean.jsonl").read_text().splitlines()[1:]))
    assert resumed.generated == 0  # base responses came from the cache
    as_dicts = lambda r: [(s.id, s.flags, s.scores, s.base_response) for s in r.samples]  # noqa: E731
    assert as_dicts(resumed) == as_dicts(clean)


def test_a_changed_run_does_not_reuse_an_old_checkpoint(tiny, tmp_path):
    model, tokenizer, vectors = tiny
    path = tmp_path / "ckpt.jsonl"
    Screener(model, tokenizer, vectors, ScreenConfig(mode="approx")).score(_samples(), checkpoint_path=path)
    notes = []
    changed = _samples()
    changed[0] = Sample("s0", 0, changed[0].prompt, "A different answer.", "mem:0")
    result = Screener(model, tokenizer, vectors, ScreenConfig(mode="approx")).score(
        changed, checkpoint_path=path, warn=notes.append)
    assert any("different screening run" in n for n in notes)
    fresh = Screener(model, tokenizer, vectors, ScreenConfig(mode="approx")).score(changed)
    assert [s.scores for s in result.samples] == [s.scores for s in fresh.samples]


def test_vector_from_another_model_is_refused(tiny, smol_tokenizer):
    model, tokenizer, _ = tiny
    other = make_tiny_model("llama", seed=5, vocab_size=len(smol_tokenizer))
    with pytest.raises(VectorMismatchError):
        Screener(model, tokenizer, [_vector(other, "evil", 1, 0)])
    qwen = make_tiny_model("qwen2", vocab_size=len(smol_tokenizer))
    with pytest.raises(VectorMismatchError):
        Screener(model, tokenizer, [_vector(qwen, "evil", 1, 0)])


def test_empty_and_over_long_samples_are_flagged(tiny):
    model, tokenizer, vectors = tiny
    samples = _samples(3) + [Sample("empty", 3, ({"role": "user", "content": "Hi"},), "  ", "mem:3"),
                             Sample("long", 4, ({"role": "user", "content": "word " * 80},), "yes " * 80, "mem:4")]
    notes = []
    result = Screener(model, tokenizer, vectors, ScreenConfig(mode="approx", max_length=64)).score(samples, warn=notes.append)
    by_id = {s.id: s for s in result.samples}
    assert by_id["empty"].flags == ["empty_response"] and by_id["empty"].scores["evil"]["score"] is None
    assert by_id["long"].flags == ["truncated"] and by_id["long"].prompt_tokens + by_id["long"].response_tokens == 64
    assert by_id["long"].scores["evil"]["score"] is not None
    assert any("truncated" in n for n in notes)


def test_fit_window_keeps_prompt_tail_and_response_head():
    prompt, response = list(range(10)), list(range(100, 120))
    p, r, cut = fit_window(prompt, response, 16)
    assert cut and p == list(range(2, 10)) and r == list(range(100, 108))
    assert fit_window([1, 2], [3], 16) == ([1, 2], [3], False)


def test_batch_plan_is_sorted_packed_and_complete():
    lengths = [5, 50, 7, 12, 3, 40, 41]
    plan = plan_batches(lengths, token_budget=100, max_batch_size=3)
    assert sorted(i for b in plan for i in b) == list(range(7))
    for batch in plan:
        assert len(batch) <= 3 and len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1
    flat = [lengths[i] for b in plan for i in b]
    assert flat == sorted(flat)


def test_z_scores_percentile_thresholds_and_flags(tiny):
    model, tokenizer, vectors = tiny
    result = Screener(model, tokenizer, vectors, ScreenConfig(mode="approx")).score(_samples())
    stats = set_z_scores(result)
    scores = [s.scores["evil"]["score"] for s in result.samples]
    mean, std = stats["evil"]
    assert mean == pytest.approx(sum(scores) / len(scores))
    assert [s.scores["evil"]["z"] for s in result.samples] == pytest.approx([(v - mean) / std for v in scores])
    limits = resolve_thresholds(result, {None: "p50", "evil": "1e9"})
    assert limits["evil"] == 1e9 and limits["sycophancy"] == pytest.approx(
        percentile([s.scores["sycophancy"]["score"] for s in result.samples], 50))
    over = flagged(result, limits)
    assert sorted(over) == sorted(s.index for s in result.samples if s.scores["sycophancy"]["score"] > limits["sycophancy"])
    assert all(names == ["sycophancy"] for names in over.values())
    with pytest.raises(ScreenError, match="not screened"):
        resolve_thresholds(result, {"malice": "p90"})
    with pytest.raises(ScreenError, match="percentile"):
        resolve_thresholds(result, {None: "ninety"})
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_out_of_memory_splits_the_batch_and_gives_the_same_scores(tiny, monkeypatch):
    model, tokenizer, vectors = tiny
    import guard.screen.scoring as screen_module

    config = ScreenConfig(mode="approx", token_budget=10_000)
    clean = Screener(model, tokenizer, vectors, config).score(_samples())
    real = screen_module.project_batch
    sizes = []

    def small_memory(model_, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("pretend")
        return real(model_, prompts, *args, **kwargs)

    monkeypatch.setattr(screen_module, "project_batch", small_memory)
    split = Screener(model, tokenizer, vectors, config).score(_samples())
    assert sizes[0] == 6 and max(sizes[1:]) <= 3 and sum(s for s in sizes if s <= 2) == 6
    for a, b in zip(clean.samples, split.samples):
        for name in ("sycophancy", "evil"):
            assert a.scores[name]["approx"] == pytest.approx(b.scores[name]["approx"], abs=1e-5)


def _result(keys, approx_rows):
    samples = []
    for i, row in enumerate(approx_rows):
        scores = {k.name: {"score": v, "approx": v, "projection": v, "delta_p": None, "base_projection": None, "z": None}
                  for k, v in zip(keys, row)}
        samples.append(SampleScore(f"s{i}", i, [], 3, 3, scores))
    return ScreenResult(list(keys), "approx", samples, "m")


def test_relative_score_is_z_minus_the_other_traits_mean_z():
    keys = [ReadKey("a", 1, "a"), ReadKey("b", 1, "b"), ReadKey("c", 2, "c")]
    rows = [[1.0, 10.0, -3.0], [2.0, 30.0, 0.0], [6.0, 20.0, 3.0], [None, 0.0, 1.0]]
    result = _result(keys, rows)
    set_z_scores(result)
    set_relative_scores(result)
    for sample in result.samples:
        z = {n: e["z"] for n, e in sample.scores.items()}
        for name in ("a", "b", "c"):
            others = [z[o] for o in "abc" if o != name and z[o] is not None]
            expected = None if z[name] is None else z[name] - sum(others) / len(others)
            assert sample.scores[name]["score"] == pytest.approx(expected)
    assert result.samples[3].scores["a"]["score"] is None and result.samples[3].scores["b"]["score"] is not None
    # One trait alone: the score is its z (the same ranking as the approximation).
    alone = _result(keys[:1], [[r[0]] for r in rows])
    set_z_scores(alone)
    set_relative_scores(alone)
    assert [s.scores["a"]["score"] for s in alone.samples] == [s.scores["a"]["z"] for s in alone.samples]
    # A raw field copies that field.
    set_relative_scores(result, "projection")
    assert [s.scores["b"]["score"] for s in result.samples] == [r[1] for r in rows]


def test_relative_score_compares_traits_at_the_same_layer_when_each_is_read_at_several():
    keys = [ReadKey("a", 1, "a@L1"), ReadKey("a", 2, "a@L2"), ReadKey("b", 1, "b@L1"), ReadKey("b", 2, "b@L2")]
    rows = [[1.0, 5.0, 2.0, -1.0], [3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 7.0, 0.5]]
    result = _result(keys, rows)
    set_z_scores(result)
    set_relative_scores(result)
    for s in result.samples:
        z = {n: e["z"] for n, e in s.scores.items()}
        assert s.scores["a@L1"]["score"] == pytest.approx(z["a@L1"] - z["b@L1"])
        assert s.scores["b@L2"]["score"] == pytest.approx(z["b@L2"] - z["a@L2"])


def test_score_setting_is_checked():
    assert ScreenConfig().mode == "approx" and ScreenConfig().score == "relative"
    with pytest.raises(ScreenError, match="needs full mode"):
        ScreenConfig(score="delta_p")
    with pytest.raises(ScreenError, match="score must be one of"):
        ScreenConfig(score="best")
    ScreenConfig(mode="full", score="delta_p")


def test_relative_score_falls_back_to_the_raw_score_without_a_spread():
    keys = [ReadKey("a", 1, "a"), ReadKey("b", 1, "b")]
    result = _result(keys, [[2.5, -1.0]])  # one sample: no spread to standardise by
    set_z_scores(result)
    set_relative_scores(result)
    assert result.score == "approx" and result.samples[0].scores["a"]["score"] == 2.5
    assert resolve_thresholds(result, {None: "p95"}) == {"a": 2.5, "b": -1.0}
    many = _result(keys, [[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
    set_z_scores(many)
    set_relative_scores(many)
    assert many.score == "relative" and many.score_label(short=True) == "relative score"
