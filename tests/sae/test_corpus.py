"""The broad SAE corpus: shipped text plus the model's own answers under several system prompts,
written atomically, and `persona-guard sae corpus` with its checks."""

import json

import pytest
from click.testing import CliRunner

from guard.autosteer import load_prompt_bank
from guard.cli.main import main
from guard.sae.corpus import STYLE_SYSTEMS, build_corpus, corpus_prompts, shipped_texts, write_corpus


def test_default_prompts_hold_no_test_prompt_and_honour_exclude():
    prompts = corpus_prompts()
    bank = load_prompt_bank()
    assert not set(prompts) & set(bank.test)
    assert set(bank.dev) <= set(prompts) and len(prompts) == len(set(prompts))
    assert bank.dev[0] not in corpus_prompts(exclude=[bank.dev[0]])
    assert len(STYLE_SYSTEMS) >= 5


def test_corpus_is_shipped_text_plus_an_answer_per_prompt_and_system(tiny_chat_model, tmp_path):
    model, tokenizer = tiny_chat_model
    systems = ["You are a helpful assistant.", "Answer like a pirate."]
    texts = build_corpus(model, tokenizer, prompts=["How are you?", "What is rain?"], systems=systems,
                         max_new_tokens=3)
    shipped = shipped_texts(tokenizer)
    assert texts[:len(shipped)] == shipped
    answers = texts[len(shipped):]
    assert 0 < len(answers) <= 4
    assert any("Answer like a pirate." in t and "What is rain?" in t for t in answers)
    path = write_corpus(texts, tmp_path / "c.jsonl")
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == texts
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # no temporary file left


def test_sae_corpus_cli(tiny_chat_model, tmp_path):
    model, tokenizer = tiny_chat_model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("How are you?\nWhat is rain?\nName a fruit.\n")
    (tmp_path / "held_out.txt").write_text("Name a fruit.\n")
    out = tmp_path / "corpus.jsonl"
    result = CliRunner().invoke(main, ["sae", "corpus", str(out), "--prompts", str(tmp_path / "prompts.txt"),
                                       "--exclude", str(tmp_path / "held_out.txt"), "--system", "Be brief.",
                                       "--no-shipped", "--max-new-tokens", "3", "--model", str(tmp_path / "model"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["prompts"] == 2 and summary["systems"] == ["Be brief."]
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(texts) == summary["texts"] <= 2 and not any("Name a fruit." in t for t in texts)
    bad = CliRunner().invoke(main, ["sae", "corpus", str(tmp_path / "corpus.txt")])
    assert bad.exit_code == 1 and "JSONL" in bad.output and not (tmp_path / "corpus.txt").exists()
