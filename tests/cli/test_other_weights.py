"""Vectors (and SAEs) of a model used with a finetuned copy of it: refused by default, accepted
with --allow-other-weights, by every command that loads them."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from guard.cli.main import main


@pytest.fixture
def finetuned_dir(tiny_model_dir, tmp_path):
    """The tiny model with every weight moved by 1e-3 (as a full finetune would), embeddings included."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-3)
    out = tmp_path / "finetuned"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            (out / name).write_bytes((tiny_model_dir / name).read_bytes())
    return out


def _refused_then_accepted(runner, args):
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1, refused.output
    assert ("different weights" in refused.output or "other weights" in refused.output)
    assert "--allow-other-weights" in refused.output
    assert "Traceback" not in refused.output
    accepted = runner.invoke(main, [*args, "--allow-other-weights"])
    assert accepted.exit_code == 0, accepted.output
    return accepted


def test_screen_and_monitor_on_a_finetuned_model(runner, tiny_vector, finetuned_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Is plan {i} good?", "response": "Yes! " * (i + 1)}) + "\n"
                            for i in range(4)))
    screened = _refused_then_accepted(runner, ["screen", str(data), "--vector", str(tiny_vector), "--model",
                                               str(finetuned_dir), "--mode", "approx", "--out", str(tmp_path / "r"),
                                               "--no-plots", "--json"])
    assert json.loads(screened.stdout)["samples"] == 4
    monitored = _refused_then_accepted(runner, ["monitor", "--vector", str(tiny_vector), "--model", str(finetuned_dir),
                                                "--prompt", "Agree with me?", "--json"])
    assert len(json.loads(monitored.stdout)["results"]) == 1


def test_harden_and_sae_explain_on_a_finetuned_model(runner, tiny_model_dir, tiny_vector, finetuned_dir, tmp_path):
    pytest.importorskip("sae_lens")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the cup is on the table near door {i}." for i in range(24)))
    sae_dir = tmp_path / "sae"
    trained = runner.invoke(main, ["sae", "train", str(corpus), "--layer", "1", "--out", str(sae_dir), "--model",
                                   str(tiny_model_dir), "--expansion", "2", "--k", "4", "--training-tokens", "2048",
                                   "--batch-tokens", "64", "--buffer-tokens", "1000", "--context-size", "16", "--json"])
    assert trained.exit_code == 0, trained.output
    explained = _refused_then_accepted(runner, ["sae", "explain", "--sae", str(sae_dir), "--vector", str(tiny_vector),
                                                "--text", str(corpus), "--model", str(finetuned_dir), "--top", "2",
                                                "--json"])
    assert len(json.loads(explained.stdout)["latents"]) == 2
    small = ["harden", "--model", str(finetuned_dir), "--vector", str(tiny_vector), "--iterations", "1",
             "--population", "2", "--children", "2", "--topk", "8", "--prompt-length", "2", "--contexts", "1",
             "--candidates", "1", "--quiet", "--out", str(tmp_path / "h"), "--json"]
    hardened = _refused_then_accepted(runner, small)
    assert json.loads(hardened.stdout)["conditions"][0]["name"] == "none"
    saega = _refused_then_accepted(runner, [*small[:-3], "--sae", str(sae_dir), "--layer", "1", "--out",
                                            str(tmp_path / "s"), "--json"])
    assert json.loads(saega.stdout)["config"]["method"] == "saega"
