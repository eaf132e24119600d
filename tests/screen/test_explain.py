"""Per-token readings and the HTML report on a tiny Llama with SmolLM2's tokenizer: values equal a
hand computation, average to the screen's approx score, and every token is shown (escaped) in
one shaded span; the CLI writes report.html and links it from summary.json."""

import html
import json
import re

import pytest
import torch

from helpers import make_tiny_model
from guard.cli.main import main
from guard.core.chat import format_messages
from guard.core.layers import find_decoder_layers
from guard.core.vectors import PersonaVector, metadata_for
from guard.errors import ScreenError
from guard.screen.explain import (ExplainedSample, Section, response_pieces, token_readings, write_html)
from guard.screen.samples import Sample
from guard.screen.scoring import ScreenConfig, Screener

RESPONSES = ["Yes! Brilliant, you are a <b>genius</b> & always right.",
             "It has a flaw:\n  the budget — ünïcode 🎉 too.",
             "No.",
             "Sure; \"quotes\" and 'apostrophes' < > survive."]


def _samples():
    out = []
    for i, response in enumerate(RESPONSES):
        prompt = [{"role": "user", "content": f"Is my plan number {i} good?" + " Please." * i}]
        if i == 2:  # one multi-turn conversation
            prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] + prompt
        out.append(Sample(f"s{i}", i, tuple(prompt), response, f"mem:{i}"))
    return out


def _vector(model, trait, layer, seed):
    meta = metadata_for(model, trait, recommended_layer=layer)
    gen = torch.Generator().manual_seed(seed)
    return PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=gen), meta)


@pytest.fixture
def tiny(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    return model, tokenizer, _vector(model, "sycophancy", 1, 0)


def _by_hand(model, tokenizer, sample, unit, layer):
    """Batch-1: capture block ``layer``'s output with a bare hook, project every position."""
    prompt = tokenizer(format_messages(tokenizer, list(sample.prompt)), add_special_tokens=False)["input_ids"]
    response = tokenizer(sample.response, add_special_tokens=False)["input_ids"]
    seen = []
    hook = find_decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt + response]))
    finally:
        hook.remove()
    projections = seen[0][0].float() @ unit
    return projections[len(prompt):], projections[len(prompt) - 1]


def test_token_values_equal_a_hand_computation_and_average_to_the_approx_score(tiny):
    model, tokenizer, vector = tiny
    samples = _samples()
    readings = token_readings(model, tokenizer, samples, vector, 1, batch_size=3)  # two batches, padded
    screened = Screener(model, tokenizer, [vector], ScreenConfig(mode="approx")).score(samples)
    for sample, reading, scored in zip(samples, readings, screened.samples):
        tokens, last = _by_hand(model, tokenizer, sample, vector.unit(1), 1)
        assert reading.reference_kind == "last_prompt" and reading.reference == pytest.approx(float(last), abs=1e-4)
        assert reading.values == pytest.approx((tokens - last).tolist(), abs=1e-4)
        assert "".join(reading.tokens) == sample.response  # the real text, token by token
        assert reading.mean == pytest.approx(scored.scores["sycophancy"]["approx"], abs=1e-4)
    # Other references: raw projections, and a given base projection per sample.
    raw = token_readings(model, tokenizer, samples[:2], vector, 1, reference="none")
    base = token_readings(model, tokenizer, samples[:2], vector.layer(1) * 3.0, 1, reference="base",
                          base_projections=[0.5, -1.0])  # a plain tensor direction is normalised
    for i in range(2):
        tokens, _ = _by_hand(model, tokenizer, samples[i], vector.unit(1), 1)
        assert raw[i].values == pytest.approx(tokens.tolist(), abs=1e-4)
        assert base[i].values == pytest.approx((tokens - [0.5, -1.0][i]).tolist(), abs=1e-4)


def test_full_mode_readings_average_to_delta_p(tiny, tmp_path):
    model, tokenizer, vector = tiny
    samples = _samples()[:2]
    screened = Screener(model, tokenizer, [vector], ScreenConfig(mode="full", max_new_tokens=4),
                        generation_cache=tmp_path / "gen.sqlite").score(samples)
    entries = [s.scores["sycophancy"] for s in screened.samples]
    readings = token_readings(model, tokenizer, samples, vector, 1, reference="base",
                              base_projections=[e["base_projection"] for e in entries])
    for reading, entry in zip(readings, entries):
        assert reading.mean == pytest.approx(entry["delta_p"], abs=1e-4)


def test_bad_requests_are_screen_errors(tiny):
    model, tokenizer, vector = tiny
    empty = Sample("e", 0, ({"role": "user", "content": "Hi"},), "", "mem:0")
    with pytest.raises(ScreenError, match="empty response"):
        token_readings(model, tokenizer, [empty], vector, 1)
    with pytest.raises(ScreenError, match="reference must be one of"):
        token_readings(model, tokenizer, _samples()[:1], vector, 1, reference="mean")
    with pytest.raises(ScreenError, match="base-response projection"):
        token_readings(model, tokenizer, _samples()[:1], vector, 1, reference="base")


def test_pieces_join_to_the_text_even_inside_multibyte_characters(smol_tokenizer):
    text = "a 🎉 ü — <tag> &amp;"
    ids, pieces = response_pieces(smol_tokenizer, text)
    assert ids == smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(pieces) == len(ids) and "".join(pieces) == text


def test_html_shows_every_token_escaped_in_one_shaded_span(tiny, tmp_path):
    model, tokenizer, vector = tiny
    samples = _samples()
    readings = token_readings(model, tokenizer, samples, vector, 1)
    items = [ExplainedSample(r, rank, r.mean, None, rank == 1, s.last_user)
             for rank, (r, s) in enumerate(zip(readings, samples), start=1)]
    (tmp_path / "hist_sycophancy.png").write_bytes(b"png")
    page = write_html(tmp_path / "report.html", [Section("sycophancy", 1, "approx ΔP", items)],
                      images=[("histogram", tmp_path / "hist_sycophancy.png")]).read_text(encoding="utf-8")
    span = r'<span class="tok" style="background:rgba\((\d+),\d+,\d+,([\d.]+)\)" title="([^"]+)">(.*?)</span>'
    spans = re.findall(span, page, re.S)
    tokens = [(t, v) for r in readings for t, v in zip(r.tokens, r.values)]
    assert len(spans) == len(tokens) == page.count('class="tok"')
    for (red, alpha, title, text), (token, value) in zip(spans, tokens):
        assert text == html.escape(token)
        assert float(title) == pytest.approx(value, abs=1e-3)
        assert red == ("220" if value >= 0 else "37") and 0 <= float(alpha) <= 0.85
    shown = re.findall(r'<div class="resp">(.*?)</div>', page, re.S)
    assert [html.unescape(re.sub(r"<[^>]+>", "", text)) for text in shown] == RESPONSES  # the real text
    assert "<b>" not in "".join(shown) and "&lt;" in "".join(shown)
    assert '<img src="hist_sycophancy.png"' in page and "last prompt token" in page  # the reference, stated
    assert "along the vector" in page and "against the vector" in page  # the legend
    assert "http" not in page.replace("http-equiv", "")  # self-contained: no external assets


def test_cli_writes_report_html_linked_from_the_summary(runner, tmp_path, smol_tokenizer):
    from guard.core.models import load_model

    make_tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path / "tiny")
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    model, _, _ = load_model(str(tmp_path / "tiny"))
    paths = []
    for trait, layer, seed in (("sycophancy", 1, 0), ("evil", 2, 1)):
        paths += ["--vector", str(_vector(model, trait, layer, seed).save(tmp_path / f"{trait}.safetensors"))]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Is plan {i} good?", "response": "Yes! " * (i + 1)})
                            + "\n" for i in range(6)))
    out = tmp_path / "report"
    base = ["screen", str(data), *paths, "--model", str(tmp_path / "tiny"), "--mode", "approx", "--json"]
    result = runner.invoke(main, [*base, "--out", str(out), "--explain-top", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report"]["html"] == str(out / "report.html") == json.loads(result.stdout)["report"]["html"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('class="sample"') == 6  # 3 per trait
    for image in ("hist_sycophancy.png", "hist_evil.png", "scatter_sycophancy_evil.png"):
        assert (out / image).exists() and f'src="{image}"' in page
    none = runner.invoke(main, [*base, "--explain-top", "0", "--out", str(tmp_path / "plain")])
    assert none.exit_code == 0, none.output
    assert not (tmp_path / "plain" / "report.html").exists()
    assert "html" not in json.loads((tmp_path / "plain" / "summary.json").read_text())["report"]


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()
