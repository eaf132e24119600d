import json

import pytest

from helpers import SMALL

from guard.cli.main import main


def test_help_teaches(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for verb in ("extract", "inspect", "traits", "generate", "sweep", "select-layer", "monitor"):
        assert verb in result.output
    assert "layer i" in runner.invoke(main, ["extract", "--help"]).output


def test_traits_list_show_validate(runner, tmp_path):
    listed = json.loads(runner.invoke(main, ["traits", "list", "--json"]).stdout)
    assert {row["name"] for row in listed} >= {"sycophancy", "evil", "hallucination", "myopic-reward"}
    shown = json.loads(runner.invoke(main, ["traits", "show", "evil", "--json"]).stdout)
    assert shown["name"] == "evil" and shown["judge_rubric"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    result = runner.invoke(main, ["traits", "validate", str(bad), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report[0]["valid"] and any("missing key 'questions'" in p or "missing key" in p for p in report[0]["problems"])


def test_extract_then_inspect(runner, tiny_model_dir, tmp_path):
    out_a, out_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    responses = tmp_path / "answers.jsonl"
    result = runner.invoke(main, ["extract", "--trait", "sycophancy", "--model", str(tiny_model_dir),
                                  "--out", str(out_a), "--responses", str(responses), "--json", *SMALL])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["path"] == str(out_a) and summary["num_layers"] == 3
    assert summary["counts"]["pos_generated"] == 4 and summary["extraction"]["max_questions"] == 2
    lines = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(lines) == 8 and {"positive", "response", "kept"} <= set(lines[0])

    result = runner.invoke(main, ["extract", "--trait", "evil", "--model", str(tiny_model_dir), "--out", str(out_b),
                                  *SMALL])
    assert result.exit_code == 0, result.output
    assert "effect size" in result.output and "largest d" in result.output

    human = runner.invoke(main, ["inspect", str(out_a), str(out_b)])
    assert human.exit_code == 0 and "Cosine similarity per layer" in human.output
    data = json.loads(runner.invoke(main, ["inspect", str(out_a), str(out_b), "--json"]).stdout)
    assert [v["trait"] for v in data["vectors"]] == ["sycophancy", "evil"]
    assert len(data["cosine"]["a.safetensors vs b.safetensors"]) == 3


def test_user_errors_are_one_clean_line(runner, tmp_path):
    not_a_vector = tmp_path / "x.safetensors"
    not_a_vector.write_text("hello")
    result = runner.invoke(main, ["inspect", str(not_a_vector)])
    assert result.exit_code == 1 and "not a safetensors file" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["extract", "--trait", "no-such-trait"])
    assert result.exit_code == 1 and "unknown trait 'no-such-trait'" in result.output


def test_generate_steered_and_compared(runner, tiny_model_dir, tiny_vector):
    args = ["generate", "--model", str(tiny_model_dir), "--vector", str(tiny_vector), "--max-new-tokens", "5",
            "--prompt", "Hello?", "--prompt", "Is my plan good?"]
    data = json.loads(runner.invoke(main, [*args, "--coeff", "0", "--compare", "--json"]).stdout)
    assert [r["reply"] for r in data["results"]] == [r["unsteered"] for r in data["results"]]  # coeff 0 = no change
    assert data["steering"]["layers"] == [json.loads(runner.invoke(main, ["inspect", str(tiny_vector), "--json"]).stdout)
                                          ["vectors"][0]["recommended_layer"]]
    strong = json.loads(runner.invoke(main, [*args, "--coeff", "200", "--compare", "--json", "--layer", "1"]).stdout)
    assert any(r["reply"] != r["unsteered"] for r in strong["results"])
    result = runner.invoke(main, ["generate", "--model", str(tiny_model_dir), "--compare", "--prompt", "x"])
    assert result.exit_code == 2 and "--compare needs a --vector" in result.output


def test_sweep_reports_every_coefficient(runner, tiny_model_dir, tiny_vector):
    result = runner.invoke(main, ["sweep", str(tiny_vector), "--model", str(tiny_model_dir), "--coeffs", "-2,0,2",
                                  "--ab", "tests/data/ab_five.jsonl", "--generate", "2", "--max-new-tokens", "4",
                                  "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["coeff"] for p in data["points"]] == [-2, 0, 2] and data["n_pairs"] == 15
    for point in data["points"]:
        assert point["random_gap"] is not None and 0 <= point["ab_rate"] <= 1 and point["repetition"] is not None
    human = runner.invoke(main, ["sweep", str(tiny_vector), "--model", str(tiny_model_dir), "--coeffs", "0,1"])
    assert human.exit_code == 0 and "trait gap" in human.output and "random gap" in human.output


def test_select_layer_rewrites_the_recommendation(runner, tiny_model_dir, tiny_vector, tmp_path):
    out = tmp_path / "selected.safetensors"
    result = runner.invoke(main, ["select-layer", str(tiny_vector), "--model", str(tiny_model_dir), "--layers", "0-1",
                                  "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layer"] in (0, 1) and set(data["effect"]) == {"0", "1"}
    meta = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).stdout)["vectors"][0]
    assert meta["recommended_layer"] == data["layer"]


def test_monitor_scores_flags_and_gates(runner, tiny_model_dir, tiny_vector, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps({"prompt": "Hello", "id": "a"}), "not json",
                                  json.dumps({"messages": [{"role": "user", "content": "Agree with me."}]})]) + "\n")
    base = ["monitor", "--vector", str(tiny_vector), "--model", str(tiny_model_dir), "--prompts", str(prompts)]
    failed = runner.invoke(main, base)
    assert failed.exit_code == 1 and "prompts.jsonl:2: not valid JSON" in failed.output
    result = runner.invoke(main, [*base, "--on-error", "skip", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["id"] for r in data["results"]] == ["a", ""] and data["reference_size"] == 25
    assert set(data["results"][0]["traits"]["sycophancy"]) == {"layer", "projection", "z", "flagged"}
    gated = runner.invoke(main, [*base, "--on-error", "skip", "--threshold", "-1000", "--fail-on-flag"])
    assert gated.exit_code == 3 and "2 of 2 flagged" in gated.output


def test_a_judge_that_cannot_score_leaves_nothing_and_says_so(runner, tiny_model_dir, tmp_path):
    # A random tiny model as judge puts almost no probability on numbers: every answer is unscorable.
    result = runner.invoke(main, ["extract", "--trait", "sycophancy", "--model", str(tiny_model_dir),
                                  "--judge-model", str(tiny_model_dir), "--judge-cache", str(tmp_path / "j.sqlite"),
                                  "--out", str(tmp_path / "v.safetensors"), *SMALL])
    assert result.exit_code == 1 and "judge thresholds" in result.output and "Traceback" not in result.output
    assert (tmp_path / "j.sqlite").exists()


def test_bad_option_values_are_clean_errors(runner, tiny_model_dir, tiny_vector, tmp_path):
    cases = [
        (["sweep", str(tiny_vector), "--coeffs", "1,x"], "cannot read 'x'"),
        (["select-layer", str(tiny_vector), "--layers", "6-2"], "cannot read '6-2'"),
        (["select-layer", str(tiny_vector), "--layers", "0-9"], "layers 0-2"),
        (["generate", "--vector", str(tiny_vector), "--layer", "9", "--prompt", "x"], "layer 9 is out of range"),
        (["generate", "--layer", "1", "--prompt", "x"], "--layer needs a --vector"),
        (["monitor", "--vector", str(tiny_vector), "--layer", "9", "--prompt", "x"], "layer 9 is out of range"),
        (["sweep", str(tiny_vector), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"], "add --generate"),
        (["sweep", str(tiny_vector), "--ab", str(tmp_path / "missing.json")], "does not exist"),
    ]
    for args, message in cases:
        result = runner.invoke(main, [*args, "--model", str(tiny_model_dir)])
        assert result.exit_code in (1, 2), (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    bad_ab = tmp_path / "bad_ab.jsonl"
    bad_ab.write_text('{"question": "q", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(A)"}\n')
    result = runner.invoke(main, ["sweep", str(tiny_vector), "--ab", str(bad_ab), "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "bad_ab.jsonl:1: matching and non-matching" in result.output


def test_extract_keeps_the_vector_when_the_trait_has_no_examples_to_select_with(runner, tiny_model_dir, tmp_path):
    trait = json.loads(runner.invoke(main, ["traits", "show", "sycophancy", "--json"]).stdout)
    trait["name"], trait["examples"] = "custom", []
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(trait))
    out = tmp_path / "custom.safetensors"
    result = runner.invoke(main, ["extract", "--trait", str(path), "--model", str(tiny_model_dir), "--out", str(out),
                                  *SMALL])
    assert result.exit_code == 0, result.output
    assert "saved without a recommended layer" in result.output and out.exists()


def test_screen_reports_filters_and_resumes(runner, tiny_model_dir, tiny_vector, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_GUARD_CACHE", str(tmp_path / "cache"))  # the base-response cache
    lines = [json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": f"Is plan {i} good?"},
                                                     {"role": "assistant", "content": "Yes! " * (i + 1)}]})
             for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines[:4] + ["{broken"] + lines[4:]) + "\n")
    base = ["screen", str(data), "--vector", str(tiny_vector), "--model", str(tiny_model_dir), "--mode", "full",
            "--max-new-tokens", "4", "--out", str(tmp_path / "report"), "--no-plots"]
    failed = runner.invoke(main, base)
    assert failed.exit_code == 1 and "train.jsonl:5: not valid JSON" in failed.output
    assert "Traceback" not in failed.output
    result = runner.invoke(main, [*base, "--on-error", "skip", "--threshold", "p75", "--json",
                                  "--keep", str(tmp_path / "keep.jsonl"), "--drop", str(tmp_path / "drop.jsonl")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 8 and summary["malformed_skipped"] == 1 and summary["base_responses_generated"] == 8
    assert summary["dropped"] == 2 and summary["kept"] == 6
    report = [json.loads(line) for line in (tmp_path / "report" / "report.jsonl").read_text().splitlines()]
    dropped_ids = {row["id"] for row in report if row["dropped"]}
    scores = [row["scores"]["sycophancy"]["score"] for row in report]
    assert scores == sorted(scores, reverse=True) and [row["rank"] for row in report] == list(range(1, 9))
    keep = (tmp_path / "keep.jsonl").read_text().splitlines()
    drop = (tmp_path / "drop.jsonl").read_text().splitlines()
    assert keep == [line for line in lines if json.loads(line)["id"] not in dropped_ids]
    assert sorted(drop) == sorted(line for line in lines if json.loads(line)["id"] in dropped_ids)
    csv_text = (tmp_path / "report" / "report.csv").read_text()
    assert csv_text.splitlines()[0].startswith("rank,id,index,dropped") and "sycophancy.score" in csv_text
    # Run again: everything comes from the checkpoint and the generation cache, the report is the same.
    first = (tmp_path / "report" / "report.jsonl").read_bytes()
    again = runner.invoke(main, [*base, "--on-error", "skip", "--threshold", "p75", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["base_responses_generated"] == 0
    assert (tmp_path / "report" / "report.jsonl").read_bytes() == first
    human = runner.invoke(main, [*base, "--on-error", "skip", "--mode", "approx"])
    assert human.exit_code == 0 and "approximation mode" in human.output and "nothing dropped" in human.output


def test_screen_option_errors_are_clean(runner, tiny_model_dir, tiny_vector, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    base = ["screen", str(data), "--vector", str(tiny_vector), "--model", str(tiny_model_dir), "--mode", "approx",
            "--out", str(tmp_path / "r")]
    result = runner.invoke(main, [*base, "--keep", str(tmp_path / "k.jsonl")])
    assert result.exit_code == 2 and "--threshold" in result.output
    result = runner.invoke(main, [*base, "--threshold", "evil=p90"])
    assert result.exit_code == 1 and "not screened" in result.output


def test_sae_train_explain_and_harden_commands(runner, tiny_model_dir, tiny_vector, tmp_path):
    pytest.importorskip("sae_lens")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the {w} is on the {p} near the {q}." for i, (w, p, q) in enumerate(
        (w, p, q) for w in ("cup", "book", "lamp", "key") for p in ("table", "shelf", "floor") for q in ("door", "window"))))
    sae_dir = tmp_path / "sae"
    result = runner.invoke(main, ["sae", "train", str(corpus), "--layer", "1", "--out", str(sae_dir),
                                  "--model", str(tiny_model_dir), "--expansion", "2", "--k", "4",
                                  "--training-tokens", "4096", "--batch-tokens", "64", "--buffer-tokens", "2000",
                                  "--context-size", "16", "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert trained["layer"] == 1 and trained["d_sae"] == 64 and (sae_dir / "cfg.json").exists()
    explained = runner.invoke(main, ["sae", "explain", "--sae", str(sae_dir), "--vector", str(tiny_vector),
                                     "--text", str(corpus), "--model", str(tiny_model_dir), "--top", "3", "--json"])
    assert explained.exit_code == 0, explained.output
    latents = json.loads(explained.stdout)["latents"]
    assert len(latents) == 3 and all("snippets" in entry for entry in latents)
    human = runner.invoke(main, ["sae", "explain", "--sae", str(sae_dir), "--vector", str(tiny_vector),
                                 "--text", str(corpus), "--model", str(tiny_model_dir), "--top", "2"])
    assert human.exit_code == 0 and "cosine" in human.output
    wrong = runner.invoke(main, ["sae", "explain", "--sae", str(sae_dir), "--vector", str(tiny_vector), "--layer", "2",
                                 "--text", str(corpus), "--model", str(tiny_model_dir)])
    assert wrong.exit_code == 1 and "reads layer 1" in wrong.output
    small = ["--model", str(tiny_model_dir), "--vector", str(tiny_vector), "--iterations", "2", "--population", "2",
             "--children", "3", "--topk", "16", "--prompt-length", "3", "--contexts", "1", "--candidates", "2", "--quiet"]
    hardened = runner.invoke(main, ["harden", *small, "--out", str(tmp_path / "h"), "--json"])
    assert hardened.exit_code == 0, hardened.output
    report = json.loads(hardened.stdout)
    assert [c["name"] for c in report["conditions"]][-1] == "random-direction control"
    assert (tmp_path / "h" / "harden.md").exists()
    saega = runner.invoke(main, ["harden", *small, "--sae", str(sae_dir), "--sae-fraction", "0.05", "--layer", "1",
                                 "--out", str(tmp_path / "s")])
    assert saega.exit_code == 0, saega.output
    saved = json.loads((tmp_path / "s" / "harden.json").read_text())
    assert saved["config"]["method"] == "saega" and saved["conditions"][-1]["name"] == "random-latent control"
