"""The README's Python section is a tested contract: its blocks run top to bottom, as written."""

import re

import pytest

from helpers import REPO

pytestmark = pytest.mark.integration


def readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_python_section_runs_as_written(tmp_path, monkeypatch):
    blocks = readme_blocks()
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)  # the examples write files next to them
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "vectors" / "sycophancy.safetensors").exists()
    assert (tmp_path / "train.clean.jsonl").exists() and (tmp_path / "hardened" / "harden.md").exists()
    assert (tmp_path / "runs" / "readme" / "persona_drift.json").exists()
    assert namespace["report"].condition("steered") is not None
