"""Library warnings reach Python users through stdlib logging when no warn= callable is given."""

import logging

from guard.core.data import load_prompts
from guard.screen.samples import load_samples


def test_skipped_records_are_logged(tmp_path, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{broken\n')
    with caplog.at_level(logging.WARNING):
        source = load_samples(data, on_error="skip")
    assert len(source.samples) == 1
    assert any("d.jsonl:2" in r.getMessage() and r.name == "guard.screen.samples" for r in caplog.records)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{broken\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(load_prompts(prompts, on_error="skip")) == 1
    assert any("p.jsonl:2" in r.getMessage() for r in caplog.records)
