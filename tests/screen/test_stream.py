"""Screening in chunks (guard.screen.stream through screen()): the streamed report is the one
report.write_report writes, chunk scores are one-pass scores, an interrupted chunked run resumes
to the same bytes, a changed chunk alone is scored again, and score_dataset."""

import json

import pytest
import torch

from helpers import make_tiny_model
from guard.core.vectors import PersonaVector, metadata_for
from guard.errors import ScreenError
from guard.screen.pipeline import score_columns, score_dataset, screen
from guard.screen.report import trim, write_report
from guard.screen.samples import load_samples, open_samples
from guard.screen.scoring import ScreenConfig, Screener

REPORT = ("report.jsonl", "report.csv")


def _vector(model, trait, layer, seed):
    meta = metadata_for(model, trait, recommended_layer=layer)
    return PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(seed)), meta)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    return model, smol_tokenizer, [_vector(model, "sycophancy", 1, 0), _vector(model, "evil", 2, 1)]


def _records(n=13, changed=None):
    out = []
    for i in range(n):
        answer = "Yes! Brilliant. " * (i % 4 + 1) if i != changed else "A different answer entirely."
        if i == 5:
            answer = "   "  # flagged empty_response
        out.append({"id": f"s{i}", "messages": [{"role": "user", "content": f"Is plan {i} good?" + " Please." * (i % 3)},
                                                {"role": "assistant", "content": answer}]})
    return out


def _data(path, n=13, changed=None):
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(n, changed)))
    return path


def _report(out):
    return {name: (out / name).read_bytes() for name in REPORT}


def test_chunked_screen_writes_the_report_write_report_would(tiny, tmp_path):
    model, tokenizer, vectors = tiny
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "chunked"
    run = screen(open_samples(data), model, tokenizer, vectors, ScreenConfig(mode="approx", token_budget=64),
                 thresholds={None: "p60"}, out_dir=out, keep_path=tmp_path / "keep.jsonl",
                 drop_path=tmp_path / "drop.jsonl", plots=False, explain_top=2, chunk_size=4)
    loaded = load_samples(data)
    assert [s.index for s in run.result.samples] == list(range(13)) and run.dropped and run.kept
    write_report(tmp_path / "direct", run.result, loaded.samples, run.thresholds, run.over, run.summary, plots=False)
    assert _report(out) == _report(tmp_path / "direct")
    loaded.write(tmp_path / "keep2.jsonl", run.kept)
    assert (tmp_path / "keep.jsonl").read_bytes() == (tmp_path / "keep2.jsonl").read_bytes()
    assert sorted(map(json.loads, (tmp_path / "drop.jsonl").read_text().splitlines()), key=lambda r: r["id"]) == \
        sorted((r for i, r in enumerate(_records()) if i in run.over), key=lambda r: r["id"])
    assert sorted(p.name for p in out.glob("checkpoint-data-*.jsonl")) == [f"checkpoint-data-0000{n}.jsonl" for n in range(4)]
    assert not (out / ".screen-parts").exists() and not list(tmp_path.rglob("*.tmp"))
    assert "report.html" in {p.name for p in out.iterdir()} and run.summary["samples"] == 13
    assert run.summary["flags"]["empty_response"] == 1


def test_chunk_scores_are_one_pass_scores(tiny, tmp_path, monkeypatch):
    model, tokenizer, vectors = tiny
    monkeypatch.setenv("PERSONA_GUARD_CACHE", str(tmp_path / "cache"))
    data = _data(tmp_path / "d.jsonl", n=9)
    config = ScreenConfig(mode="full", max_new_tokens=4, token_budget=48)
    whole = Screener(model, tokenizer, vectors, config).score(load_samples(data).samples)
    run = screen(open_samples(data), model, tokenizer, vectors, config, out_dir=tmp_path / "r", plots=False,
                 explain_top=0, chunk_size=3)
    for a, b in zip(whole.samples, run.result.samples):
        assert (a.id, a.index, a.flags) == (b.id, b.index, b.flags)
        for name in ("sycophancy", "evil"):
            for field in ("delta_p", "approx", "projection", "base_projection"):
                assert a.scores[name][field] == pytest.approx(b.scores[name][field], abs=1e-5)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "r" / "report.jsonl").read_text().splitlines())}
    assert all(rows[s.id]["base_response"] == trim(s.base_response) for s in whole.samples)
    assert run.result.generated == 0  # the one-pass run above cached every base response


def test_interrupted_chunked_run_resumes_to_the_same_report(tiny, tmp_path, monkeypatch):
    import guard.screen.scoring as scoring

    model, tokenizer, vectors = tiny
    data = _data(tmp_path / "d.jsonl")
    config = ScreenConfig(mode="approx", token_budget=40)  # several batches per chunk
    options = dict(thresholds={None: "p70"}, plots=False, explain_top=0, chunk_size=4)
    screen(open_samples(data), model, tokenizer, vectors, config, out_dir=tmp_path / "clean", **options)
    total = sum(len(p.read_text().splitlines()) - 1 for p in (tmp_path / "clean").glob("checkpoint-data-*.jsonl"))
    assert total >= 6
    real, calls = scoring.project_batch, []

    def crash_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == total // 2 + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "project_batch", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        screen(open_samples(data), model, tokenizer, vectors, config, out_dir=tmp_path / "resumed", **options)
    assert not (tmp_path / "resumed" / "report.jsonl").exists()
    calls.clear()
    monkeypatch.setattr(scoring, "project_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    notes = []
    screen(open_samples(data), model, tokenizer, vectors, config, out_dir=tmp_path / "resumed", warn=notes.append,
           **options)
    assert len(calls) == total - total // 2  # nothing redone, nothing skipped
    assert _report(tmp_path / "resumed") == _report(tmp_path / "clean")
    assert sum(n.startswith("resuming from") for n in notes) == 1
    assert not (tmp_path / "resumed" / ".screen-parts").exists()

    # Change one sample of chunk 2: only that chunk is scored again, and the report is a fresh run's.
    changed = _data(tmp_path / "d.jsonl", changed=9)
    calls.clear()
    notes.clear()
    screen(open_samples(changed), model, tokenizer, vectors, config, out_dir=tmp_path / "resumed", warn=notes.append,
           **options)
    chunk2 = len((tmp_path / "resumed" / "checkpoint-data-00002.jsonl").read_text().splitlines()) - 1
    assert len(calls) == chunk2 and sum("different screening run" in n for n in notes) == 1
    screen(open_samples(changed), model, tokenizer, vectors, config, out_dir=tmp_path / "fresh", **options)
    assert _report(tmp_path / "resumed") == _report(tmp_path / "fresh")

    # A smaller chunk size is another run: every chunk starts over, and stale checkpoints go.
    screen(open_samples(changed), model, tokenizer, vectors, config, out_dir=tmp_path / "resumed",
           **{**options, "chunk_size": 7})
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-data-*")) == \
        ["checkpoint-data-00000.jsonl", "checkpoint-data-00001.jsonl"]


def test_a_reference_and_an_in_memory_source_stream_too(tiny, tmp_path):
    model, tokenizer, vectors = tiny
    data, ref = _data(tmp_path / "d.jsonl"), _data(tmp_path / "ref.jsonl", n=6)
    config = ScreenConfig(mode="approx")
    streamed = screen(open_samples(data), model, tokenizer, vectors, config, reference=open_samples(ref),
                      thresholds={None: "p90"}, out_dir=tmp_path / "a", plots=False, explain_top=0, chunk_size=5)
    loaded = screen(load_samples(data), model, tokenizer, vectors, config, reference=load_samples(ref),
                    thresholds={None: "p90"}, out_dir=tmp_path / "b", plots=False, explain_top=0, chunk_size=5)
    assert _report(tmp_path / "a") == _report(tmp_path / "b")
    assert streamed.summary["traits"] == loaded.summary["traits"] and len(streamed.reference.samples) == 6
    assert streamed.summary["traits"]["evil"]["reference_mean"] == pytest.approx(
        sum(s.scores["evil"]["approx"] for s in streamed.reference.samples if s.scores["evil"]["approx"] is not None) / 5)
    nowhere = screen(open_samples(data), model, tokenizer, vectors, config, chunk_size=5)  # no files at all
    assert nowhere.report == {}  # its z-scores are against the data itself; the raw scores agree
    assert [s.scores["evil"]["approx"] for s in nowhere.result.samples] == \
        [s.scores["evil"]["approx"] for s in streamed.result.samples]
    with pytest.raises(ScreenError, match="chunk_size"):
        screen(open_samples(data), model, tokenizer, vectors, config, chunk_size=0)


def test_score_dataset_adds_filterable_score_columns(tiny, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("PERSONA_GUARD_CACHE", str(tmp_path / "cache"))
    model, tokenizer, vectors = tiny
    rows = _records(8)
    rows[3] = {"id": "bad", "messages": [{"role": "user", "content": "no reply"}]}
    ds = datasets.Dataset.from_list(rows)
    config = ScreenConfig(mode="approx")
    with pytest.raises(Exception, match="row 3"):
        score_dataset(ds, model, tokenizer, vectors, config)
    scored = score_dataset(ds, model, tokenizer, vectors, config, on_error="skip", chunk_size=3, warn=lambda m: None)
    columns = [c for c, _, _ in score_columns(Screener(model, tokenizer, vectors, config).keys, "approx")]
    assert columns == ["sycophancy_score", "sycophancy_z", "sycophancy_approx", "sycophancy_projection",
                       "evil_score", "evil_z", "evil_approx", "evil_projection"]
    assert scored.column_names == ds.column_names + columns + ["screen_flags"] and scored.num_rows == 8
    good = [r for i, r in enumerate(rows) if i != 3]
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    run = screen(open_samples(path), model, tokenizer, vectors, config, chunk_size=3)
    expected = [s.scores["evil"] for s in run.result.samples]
    got = [r for i, r in enumerate(scored) if i != 3]
    assert [r["evil_score"] for r in got] == [e["score"] for e in expected]
    assert [r["evil_z"] for r in got] == pytest.approx([e["z"] if e["z"] is not None else None for e in expected])
    assert scored[3]["evil_score"] is None and scored[3]["screen_flags"] == ["malformed"]
    assert scored[5]["screen_flags"] == ["empty_response"] and scored[5]["evil_score"] is None
    limit = sorted(r["evil_z"] for r in got if r["evil_z"] is not None)[-2]
    kept = scored.filter(lambda r: r["evil_z"] is not None and r["evil_z"] < limit)
    assert kept.num_rows == sum(1 for r in got if r["evil_z"] is not None and r["evil_z"] < limit)
    full = score_dataset(datasets.Dataset.from_list(good[:3]), model, tokenizer, vectors[:1],
                         ScreenConfig(mode="full", score="delta_p", max_new_tokens=3), reference=datasets.Dataset.from_list(good[3:]))
    assert {"sycophancy_delta_p", "sycophancy_base_projection"} <= set(full.column_names)
    assert all(r["sycophancy_score"] == r["sycophancy_delta_p"] for r in full)
    with pytest.raises(ScreenError, match="already has column"):
        score_dataset(scored, model, tokenizer, vectors, config)
    with pytest.raises(ScreenError, match="one split"):
        score_dataset(datasets.DatasetDict({"train": ds}), model, tokenizer, vectors, config)
