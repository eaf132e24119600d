"""Fixtures of the CLI tests: a runner, a tiny model saved as a directory, a vector extracted from it."""

import json

import pytest
from click.testing import CliRunner

from helpers import SMALL, make_tiny_model

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



@pytest.fixture
def tiny_vector(runner, tiny_model_dir, tmp_path):
    out = tmp_path / "syc.safetensors"
    result = runner.invoke(main, ["extract", "--trait", "sycophancy", "--model", str(tiny_model_dir), "--out", str(out),
                                  "--json", *SMALL])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["recommended_layer"] in (1, 2)  # candidates of a 3-layer model
    assert set(summary["layer_stats"]["selection"]["effect"]) == {"1", "2"}
    return out


