"""The core install (no ``train`` extra) runs the core commands: ``persona-guard screen`` with
``datasets`` and ``matplotlib`` unimportable completes and says in one line that it skipped the
plots. A fresh venv would be the real check; making the two packages fail to import (a shim
directory first on PYTHONPATH) is the same for every ``import`` the command does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO, make_tiny_model
from guard.core.vectors import PersonaVector, metadata_for

SHIM = {"datasets.py": "raise ImportError('datasets is not installed (test shim)')\n",
        "matplotlib/__init__.py": "raise ImportError('matplotlib is not installed (test shim)')\n"}


def test_screen_runs_without_datasets_and_matplotlib(tmp_path, smol_tokenizer):
    shim = tmp_path / "shim"
    for name, text in SHIM.items():
        (shim / name).parent.mkdir(parents=True, exist_ok=True)
        (shim / name).write_text(text)
    model_dir = tmp_path / "model"
    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    vector = tmp_path / "v.safetensors"
    PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)),
                  meta).save(vector)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Is idea {i} good?"},
                                                     {"role": "assistant", "content": "Yes!" if i % 2 else "No."}]})
                            + "\n" for i in range(6)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, text=True)
    assert "test shim" in probe.stderr  # the shim is what an import finds
    command = [sys.executable, "-m", "guard.cli.main", "screen", str(data), "--vector", str(vector), "--mode", "approx",
               "--model", str(model_dir), "--out", str(tmp_path / "report"), "--explain-top", "0"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    notes = [line for line in run.stderr.splitlines() if "matplotlib is not installed" in line]
    assert len(notes) == 1, run.stderr[-3000:]
    report = tmp_path / "report"
    assert (report / "report.jsonl").is_file() and json.loads((report / "summary.json").read_text())
    assert not list(report.glob("*.png"))

    # A datasets source says which extra it needs, in one line.
    command[command.index(str(data))] = "someone/some-dataset"
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1
    error = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "persona-guard[train]" in error[0], run.stderr[-2000:]
