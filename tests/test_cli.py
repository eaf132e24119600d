import json

import pytest
from click.testing import CliRunner

from conftest import make_tiny_model
from guard.cli.main import main


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def tiny_model_dir(tmp_path, smol_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


SMALL = ["--questions", "2", "--pairs", "2", "--max-new-tokens", "4", "--quiet"]


def test_help_teaches(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for verb in ("extract", "inspect", "traits"):
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
