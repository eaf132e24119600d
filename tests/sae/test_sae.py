"""SAE support on a tiny model (sae-lens): train, save/load, explain, SAEGA end to end."""

import json

import pytest
import torch

from helpers import make_tiny_model
from guard.harden.hardening import HardenConfig, harden
from guard.harden.optimize import EPOConfig
from guard.traits import load_trait
from guard.core.vectors import PersonaVector, metadata_for

pytest.importorskip("sae_lens")
from guard.sae.lens import (SAEError, SAETrainConfig, check_sae, explain, latent_objective, load_sae, read_texts,  # noqa: E402
                       save_sae, select_latents, train_sae)

TEXTS = [f"Story {i}: the {animal} walked to the {place} and met a {other}. It was {mood}."
         for i, (animal, place, other, mood) in enumerate(
             (a, p, o, m) for a in ("cat", "dog", "fox", "owl") for p in ("river", "market", "forest")
             for o in ("friend", "stranger") for m in ("sunny", "late", "quiet"))]
SMALL = SAETrainConfig(expansion=2, k=4, training_tokens=20_000, batch_tokens=128, context_size=32, max_buffer_tokens=5000,
                       lr=3e-3)


@pytest.fixture(scope="module")
def trained(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    sae, stats = train_sae(model, smol_tokenizer, TEXTS, layer=1, config=SMALL)
    return model, sae, stats


def test_train_save_load_and_metadata(trained, tmp_path, smol_tokenizer):
    model, sae, stats = trained
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    assert 0.5 < stats["variance_explained"] <= 1.0 and stats["l0"] <= 4.0 + 1e-6  # learned, and TopK holds
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert check_sae(loaded, model) == 1
    acts = torch.randn(5, 32)
    assert torch.allclose(loaded.encode(acts), sae.encode(acts), atol=1e-6)
    other = make_tiny_model("llama", seed=3, vocab_size=len(smol_tokenizer))
    with pytest.raises(SAEError, match="other weights"):
        check_sae(loaded, other)
    with pytest.raises(SAEError, match="layer 1, not layer 2"):
        check_sae(loaded, model, 2)
    with pytest.raises(SAEError, match="cfg.json"):
        load_sae(tmp_path)


def test_read_texts_formats(tmp_path, smol_tokenizer):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n")
    assert read_texts(tmp_path / "a.txt") == ["first doc\nline two", "second doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    texts = read_texts(tmp_path / "b.jsonl", smol_tokenizer)
    assert texts[0] == "hello" and "yo" in texts[1]


def test_select_latents_and_objective(trained):
    _, sae, _ = trained
    gen = torch.Generator().manual_seed(0)
    trait, normal = torch.randn(10, 32, generator=gen) + 2.0, torch.randn(10, 32, generator=gen)
    idx, weights = select_latents(sae, trait, normal, fraction=0.1)
    assert len(idx) == round(0.1 * 64)
    diff = sae.encode(trait).mean(0) - sae.encode(normal).mean(0)
    assert torch.allclose(weights, -diff[idx])
    assert diff[idx].abs().min() >= diff.abs().sort(descending=True).values[len(idx) - 1] - 1e-6
    h = torch.randn(3, 32, generator=gen)
    expected = (sae.encode(h)[:, idx] * weights).sum(-1)
    assert torch.allclose(latent_objective(sae, idx, weights)(h), expected)


def test_explain_lists_aligned_latents_with_snippets(trained, smol_tokenizer):
    model, sae, _ = trained
    direction = sae.W_dec[7].detach().clone()
    found = explain(sae, direction, model, smol_tokenizer, TEXTS, 1, top=3, snippets=2)
    assert found[0]["latent"] == 7 and found[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert [abs(f["cosine"]) for f in found] == sorted((abs(f["cosine"]) for f in found), reverse=True)
    for entry in found:
        for snippet in entry["snippets"]:
            assert "[" in snippet["text"] and snippet["activation"] > 0


def test_saega_runs_end_to_end(trained, smol_tokenizer):
    model, sae, _ = trained
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    vector = PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)), meta)
    config = HardenConfig(contexts=2, candidates=2, epo=EPOConfig(prompt_length=3, population=2, children_per_member=4,
                                                                  iterations=2, topk=16, restart_every=2))
    report = harden(model, smol_tokenizer, vector, load_trait("sycophancy"), config, sae=sae, sae_fraction=0.05)
    assert report.config["method"] == "saega" and len(report.config["latents"]) == round(0.05 * 64)
    assert [c.name for c in report.conditions][-1] == "random-latent control"
    assert all(c.target is not None for c in report.conditions)
