"""``persona-guard autosteer``: one run end to end on a tiny saved model, and every bad input a
one-line error with the fix that leaves no --out behind."""

import json

import pytest
from click.testing import CliRunner
from conftest import DESCRIPTION, make_sae, tiny_model
from guard.cli.main import main

from guard.core.steering import Steering
from guard.sae.lens import save_sae

FAST = ["--latents", "2", "--candidates", "6", "--budget", "2", "--dev", "3", "--test", "3", "--max-new-tokens", "4",
        "--bootstrap", "100", "--min-output-score", "-1e6", "--control", "equal-norm", "--no-diffmean"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, word_tokenizer):
    root = tmp_path_factory.mktemp("autosteer_cli")
    model = tiny_model("llama", word_tokenizer)
    model.save_pretrained(root / "model")
    word_tokenizer.save_pretrained(root / "model")
    save_sae(make_sae(model), root / "sae")
    other = tiny_model("llama", word_tokenizer, seed=3)
    save_sae(make_sae(other), root / "sae_other_model")
    other.save_pretrained(root / "other_model")
    word_tokenizer.save_pretrained(root / "other_model")
    return root


def invoke(args):
    return CliRunner().invoke(main, ["autosteer", *args])


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.exception is not None, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_autosteer_cli_end_to_end(saved, tmp_path):
    out = tmp_path / "run"
    result = invoke([DESCRIPTION, "--sae", str(saved / "sae"), "--out", str(out), "--model", str(saved / "model"),
                     *FAST, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["spec"] == str(out / "steering.safetensors") and len(summary["latents"]) <= 2
    assert set(summary["conditions"]) == {"none", "prompt", "autosteer", "prompt + autosteer", "random latents"}
    assert "report" in summary["timings"]
    assert sorted(p.name for p in out.iterdir()) == ["random_latents.safetensors", "report.json", "report.md",
                                                      "steering.safetensors"]
    assert Steering.load(out / "steering.safetensors").description["concept"] == DESCRIPTION
    table = invoke([DESCRIPTION, "--sae", str(saved / "sae"), "--out", str(tmp_path / "run2"), "--model",
                    str(saved / "model"), *FAST, "--quiet"])
    assert table.exit_code == 0, table.output
    assert "held-out test prompts" in table.output and "capability cost" in table.output
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"question": q, "trait": "arr arr pirate", "non_trait": "walk in the park"}) + "\n"
                             for q in ("How are you today ?", "Why is the sky blue ?")))
    evaluated = CliRunner().invoke(main, ["evaluate", "--steer", str(out / "steering.safetensors"), "--pairs", str(pairs),
                                          "--model", str(saved / "model"), "--bootstrap", "100", "--json", "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output
    assert [c["name"] for c in json.loads(evaluated.stdout)["conditions"]] == ["none", "spec steering",
                                                                               "spec steering random"]
    spec = str(out / "steering.safetensors")
    generated = CliRunner().invoke(main, ["generate", "--steer", spec, "--compare", "--prompt", "How are you today ?",
                                          "--max-new-tokens", "3", "--model", str(saved / "model"), "--json"])
    assert generated.exit_code == 0, generated.output
    row = json.loads(generated.stdout)["results"][0]
    assert set(row) == {"prompt", "reply", "unsteered"}
    # A spec written on one model is refused on another, naming the difference (as vector files are).
    refused = CliRunner().invoke(main, ["generate", "--steer", spec, "--prompt", "How are you today ?",
                                        "--model", str(saved / "other_model"), "--quiet"])
    one_line_error(refused, "steering spec", "different weights")
    both = CliRunner().invoke(main, ["generate", "--steer", spec, "--layer", "1", "--prompt", "hi"])
    assert both.exit_code == 2 and "--layer needs a --vector" in both.output


def test_pairs_and_proposer_options_are_checked_before_the_model_loads(saved, tmp_path):
    base = [DESCRIPTION, "--sae", str(saved / "sae"), "--out", str(tmp_path / "o"), "--model", str(saved / "model")]
    one_line_error(invoke([*base, "--prompt-field", "q"]), "--prompt-field", "add --pairs FILE")
    one_line_error(invoke([*base, "--proposer-model", "m"]), "--proposer-model", "--proposer-url")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "hi"}\n')
    one_line_error(invoke([*base, "--pairs", str(bad)]), "bad.jsonl:1", "missing")
    assert not (tmp_path / "o").exists()


def test_empty_description(saved, tmp_path):
    one_line_error(invoke(["  ", "--sae", str(saved / "sae"), "--out", str(tmp_path / "o")]), "DESCRIPTION is empty")
    assert not (tmp_path / "o").exists()


def test_missing_sae_directory(tmp_path):
    one_line_error(invoke([DESCRIPTION, "--sae", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]),
                   "does not exist", "sae train")
    (tmp_path / "empty").mkdir()
    one_line_error(invoke([DESCRIPTION, "--sae", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]), "cfg.json")
    assert not (tmp_path / "o").exists()


def test_sae_of_another_model_or_layer_leaves_no_out(saved, tmp_path):
    model = ["--model", str(saved / "model"), *FAST, "--quiet"]
    one_line_error(invoke([DESCRIPTION, "--sae", str(saved / "sae_other_model"), "--out", str(tmp_path / "o"), *model]),
                   "other weights", "--allow-other-weights")
    one_line_error(invoke([DESCRIPTION, "--sae", str(saved / "sae"), "--out", str(tmp_path / "o"), "--layer", "2",
                           *model]), "not layer 2")
    assert list(tmp_path.iterdir()) == []  # no --out, no temporary directory


def test_non_empty_out_is_refused(saved, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    one_line_error(invoke([DESCRIPTION, "--sae", str(saved / "sae"), "--out", str(tmp_path / "o")]), "not empty")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]
