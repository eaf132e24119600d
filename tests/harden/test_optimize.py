"""EPO on tiny models: gradients against finite differences, candidate scores against direct
forwards (with and without a cached prefix, Gemma's scaled embeddings included), token filters,
the Pareto frontier."""

import pytest
import torch

from helpers import make_tiny_model
from guard.core.layers import find_decoder_layers
from guard.harden.optimize import (EPO, Candidate, EPOConfig, PromptSlot, allowed_tokens, pareto_frontier, retokenizes)

ARCHS = ["llama", "gemma2", "gemma3", "gpt2", "qwen2"]


def _direction(model, seed=0):
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


def _objective(direction):
    return lambda h: h @ direction.to(h)


def _slot(tokenizer, read_at="end"):
    prefixes = (tuple(tokenizer("<|im_start|>system\n", add_special_tokens=False)["input_ids"]),) * 2
    suffixes = tuple(tuple(tokenizer(f"<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)["input_ids"]) for q in ("Is my plan good?", "Hi"))
    return PromptSlot(prefixes, suffixes, read_at=read_at)


def _direct(model, slot, ids, layer, direction):
    """Plain full forwards of prefix + prompt + suffix, one context at a time."""
    targets, xents = [], []
    block = find_decoder_layers(model)[layer]
    for prefix, suffix in zip(slot.prefixes, slot.suffixes):
        full = torch.tensor([list(prefix) + ids + list(suffix)])
        seen = []
        hook = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad():
                logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].double()
        finally:
            hook.remove()
        read = full.shape[1] - 1 if slot.read_at == "end" else len(prefix) + len(ids) - 1
        targets.append(float(seen[0][0, read].double() @ direction.double()))
        logp = torch.log_softmax(logits, -1)
        start = len(prefix)
        scored = [float(logp[start + k - 1, ids[k]]) for k in range(0 if prefix else 1, len(ids))]
        xents.append(-sum(scored) / len(scored))
    return sum(targets) / len(targets), sum(xents) / len(xents)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("read_at", ["end", "prompt"])
def test_candidate_scores_equal_direct_forwards(arch, read_at, smol_tokenizer):
    model = make_tiny_model(arch, vocab_size=len(smol_tokenizer))
    direction = _direction(model)
    slot = _slot(smol_tokenizer, read_at)
    epo = EPO(model, smol_tokenizer, _objective(direction), layer=1, slot=slot, config=EPOConfig(prompt_length=5))
    ids = epo._random_prompts(3, torch.Generator().manual_seed(0))
    targets, xents = epo.evaluate(ids)
    _, grad_targets, grad_xents = epo.token_gradients(ids, torch.ones(3))
    for row in range(3):
        target, xent = _direct(model, slot, ids[row].tolist(), 1, direction)
        assert targets[row].item() == pytest.approx(target, rel=1e-4, abs=1e-4)
        assert xents[row].item() == pytest.approx(xent, rel=1e-4, abs=1e-4)
        # The gradient pass (one-hot @ embedding matrix, scaled like the model scales it) agrees.
        assert grad_targets[row].item() == pytest.approx(target, rel=1e-4, abs=1e-4)
        assert grad_xents[row].item() == pytest.approx(xent, rel=1e-4, abs=1e-4)


def test_bare_prompt_scores_equal_a_direct_forward(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    direction = _direction(model, 1)
    epo = EPO(model, smol_tokenizer, _objective(direction), layer=2, slot=PromptSlot.bare(),
              config=EPOConfig(prompt_length=4))
    ids = epo._random_prompts(2, torch.Generator().manual_seed(1))
    targets, xents = epo.evaluate(ids)
    for row in range(2):
        target, xent = _direct(model, PromptSlot.bare(), ids[row].tolist(), 2, direction)
        assert targets[row].item() == pytest.approx(target, rel=1e-4, abs=1e-4)
        assert xents[row].item() == pytest.approx(xent, rel=1e-4, abs=1e-4)


# Gemma 3 runs four float32 norms per block even in double, too noisy for a difference quotient;
# its gradient pass is checked against direct forwards above (the embedding-scale bug).
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_token_gradients_match_finite_differences(arch, smol_tokenizer):
    model = make_tiny_model(arch, vocab_size=len(smol_tokenizer)).double()
    direction = _direction(model, 2).double()
    slot = _slot(smol_tokenizer)
    epo = EPO(model, smol_tokenizer, _objective(direction), layer=1, slot=slot, config=EPOConfig(prompt_length=4))
    ids = epo._random_prompts(1, torch.Generator().manual_seed(3))
    lam = torch.tensor([0.7], dtype=torch.float64)
    grads, _, _ = epo.token_gradients(ids, lam)
    forward = epo._forward()

    def loss(one_hot):
        with torch.no_grad():
            target, xent = epo._score(forward, ids, grad=True, one_hot=one_hot)
        return float(-target + lam * xent)

    # Directional derivatives along random directions of the relaxed one-hot. (The norms of
    # Llama and Gemma compute in float32 even in a double model, so single coordinates with a
    # tiny step drown in rounding; a central difference along a dense direction does not.)
    base = torch.nn.functional.one_hot(ids, epo.vocab_rows).double()
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        direction_x = torch.randn(base.shape, generator=gen, dtype=torch.float64) / base.shape[-1] ** 0.5
        eps = 1e-3
        numeric = (loss(base + eps * direction_x) - loss(base - eps * direction_x)) / (2 * eps)
        analytic = float((grads.double() * direction_x).sum())
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-7)


def test_filters_hold_and_a_short_run_improves_the_target(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    direction = _direction(model, 5)
    config = EPOConfig(prompt_length=4, population=4, children_per_member=8, iterations=6, topk=64,
                       restart_every=3, seed=0)
    epo = EPO(model, smol_tokenizer, _objective(direction), layer=1, slot=_slot(smol_tokenizer), config=config)
    mask = allowed_tokens(smol_tokenizer, epo.vocab_rows, ascii_only=True)
    assert not mask[smol_tokenizer.all_special_ids].any()
    assert not mask[len(smol_tokenizer):].any()
    start_targets, _ = epo.evaluate(epo._random_prompts(4, torch.Generator().manual_seed(0)))
    result = epo.run()
    everyone = result.frontier + result.population
    for cand in everyone:
        assert all(mask[t] for t in cand.ids)
        assert retokenizes(smol_tokenizer, cand.ids)
        assert cand.text.isascii()
    assert result.best().target > start_targets.max().item()
    assert result.evaluated > 4 and len(result.history) == 6
    again = EPO(model, smol_tokenizer, _objective(direction), layer=1, slot=_slot(smol_tokenizer), config=config).run()
    assert [c.ids for c in again.frontier] == [c.ids for c in result.frontier]  # seeded


def test_frontier_is_non_dominated_and_complete():
    gen = torch.Generator().manual_seed(0)
    cands = [Candidate((i,), float(t), float(x)) for i, (t, x) in enumerate(torch.rand(200, 2, generator=gen).tolist())]
    frontier = pareto_frontier(cands)
    for a in frontier:
        assert not any(b.target >= a.target and b.xent <= a.xent and (b.target, b.xent) != (a.target, a.xent)
                       for b in cands)
    for c in cands:
        if c not in frontier:
            assert any(f.target >= c.target and f.xent <= c.xent for f in frontier)
    assert [f.xent for f in frontier] == sorted(f.xent for f in frontier)
