"""`persona-guard traits new` end to end against a scripted OpenAI-compatible server on 127.0.0.1,
its option checks (made before any request), and the `traits` group's move into cli/traits.py."""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner

from chat_server import ChatServer, flawed_trait, generated_trait
from guard.cli.main import main
from guard.cli.traits import traits
from guard.traits import load_trait

DESCRIPTION = "Stating guesses as certain facts and never admitting doubt."
SMALL = ["--pairs", "2", "--extraction-questions", "3", "--evaluation-questions", "3", "--examples", "2"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never route the test server through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("GUARD_TEST_GEN_KEY", raising=False)
    with ChatServer() as s:
        yield s


def new(server, *args):
    return ["traits", "new", "overconfidence", "--description", DESCRIPTION, "--generator-url", server.base_url,
            "--generator-model", "gen-model", "--generator-key-env", "GUARD_TEST_GEN_KEY", *SMALL, *args]


def test_traits_group_lives_in_its_own_module():
    assert main.commands["traits"] is traits
    assert set(traits.commands) == {"list", "show", "validate", "new"}


def test_new_retries_until_valid_and_writes_a_valid_file(runner, server, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARD_TEST_GEN_KEY", "sk-gen")
    first = 'Here is the trait you asked for:\n{"instruction_pairs": [{"pos": "a", "neg": "b"},], }'
    server.reply(first)
    server.reply(json.dumps(flawed_trait()))
    server.reply("```json\n" + json.dumps(generated_trait()) + "\n```")
    out = tmp_path / "overconfidence.json"
    result = runner.invoke(main, new(server, "--out", str(out), "--json"))
    assert result.exit_code == 0, result.output

    assert len(server.requests) == 3
    for req in server.requests:
        assert req["path"] == "/v1/chat/completions"
        assert req["json"]["model"] == "gen-model"
        assert req["headers"]["Authorization"] == "Bearer sk-gen"
        assert req["headers"]["Content-Type"] == "application/json"
    opening = server.messages(0)
    assert [m["role"] for m in opening] == ["system", "user"]
    assert DESCRIPTION in opening[1]["content"] and "exactly 3 distinct" in opening[1]["content"]
    assert server.messages(1)[:2] == opening and server.messages(1)[2] == {"role": "assistant", "content": first}
    assert "not valid JSON" in server.messages(1)[3]["content"]
    retry = server.messages(2)[-1]["content"]
    for problem in ("'instruction_pairs' has 1 entries; 2 were asked for", "must be disjoint",
                    "exactly the placeholders {question} and {answer}"):
        assert problem in retry, problem

    summary = json.loads(result.stdout)
    assert summary["attempts"] == 3 and summary["path"] == str(out)
    assert (summary["pairs"], summary["extraction_questions"], summary["evaluation_questions"],
            summary["examples"]) == (2, 3, 3, 2)
    trait = load_trait(out)
    assert trait.name == "overconfidence" and trait.description == DESCRIPTION
    assert summary["fingerprint"] == trait.fingerprint()
    assert runner.invoke(main, ["traits", "validate", str(out)]).exit_code == 0
    assert os.listdir(tmp_path) == ["overconfidence.json"]


def test_new_writes_name_json_in_the_current_directory_without_a_key(runner, server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.reply(json.dumps(generated_trait()))
    result = runner.invoke(main, new(server))
    assert result.exit_code == 0, result.output
    assert "Authorization" not in server.requests[0]["headers"]
    assert "GUARD_TEST_GEN_KEY is not set" in result.stderr
    assert "wrote overconfidence.json" in result.stdout
    assert load_trait(tmp_path / "overconfidence.json").name == "overconfidence"


def test_exhausted_attempts_exit_1_with_one_line_and_no_file(runner, server, tmp_path):
    server.reply("Sorry, I can only describe it in words.")
    server.reply(json.dumps(flawed_trait()))
    out = tmp_path / "overconfidence.json"
    result = runner.invoke(main, new(server, "--out", str(out), "--max-attempts", "2", "--quiet"))
    assert result.exit_code == 1
    assert len(server.requests) == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    assert "in 2 attempt(s)" in lines[0] and "must be disjoint" in lines[0] and "--max-attempts" in lines[0]
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary one


def test_endpoint_errors_are_one_line(runner, server, tmp_path):
    server.error(401, '{"error": "invalid api key"}')
    result = runner.invoke(main, new(server, "--out", str(tmp_path / "t.json")))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "401" in lines[-1] and "$GUARD_TEST_GEN_KEY" in lines[-1]
    assert "Traceback" not in result.output and os.listdir(tmp_path) == []


def test_overwrite_replaces_an_existing_file(runner, server, tmp_path):
    out = tmp_path / "t.json"
    out.write_text("old")
    server.reply(json.dumps(generated_trait()))
    result = runner.invoke(main, new(server, "--out", str(out), "--overwrite", "--quiet"))
    assert result.exit_code == 0, result.output
    assert load_trait(out).name == "overconfidence"


def without(argv, option):
    """``argv`` minus ``option`` and its value."""
    i = argv.index(option)
    return argv[:i] + argv[i + 2:]


@pytest.mark.parametrize("case, match", [
    ("url without model", "--generator-url needs --generator-model"),
    ("no generator", "no generator: pass --generator-url"),
    ("missing directory", "directory .*missing does not exist"),
    ("not .json", "must end in .json"),
    ("existing file", "already exists; pass --overwrite"),
    ("bad name", "Invalid value for NAME"),
    ("empty description", "description is empty"),
    ("zero pairs", "Invalid value for '--pairs'"),
    ("zero attempts", "Invalid value for '--max-attempts'"),
])
def test_options_are_checked_before_any_request(runner, server, tmp_path, case, match):
    (tmp_path / "exists.json").write_text("keep")
    argv = new(server)
    argv = {
        "url without model": without(argv, "--generator-model"),
        "no generator": without(without(argv, "--generator-model"), "--generator-url"),
        "missing directory": argv + ["--out", str(tmp_path / "missing" / "t.json")],
        "not .json": argv + ["--out", str(tmp_path / "t.txt")],
        "existing file": argv + ["--out", str(tmp_path / "exists.json")],
        "bad name": ["traits", "new", "../evil", *argv[3:]],
        "empty description": [*argv[:3], "--description", " ", *argv[5:]],
        "zero pairs": argv + ["--pairs", "0"],
        "zero attempts": argv + ["--max-attempts", "0"],
    }[case]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "t.json")]
    result = runner.invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert re.search(match, result.output), result.output
    assert server.requests == []
    assert sorted(os.listdir(tmp_path)) == ["exists.json"] and (tmp_path / "exists.json").read_text() == "keep"


def test_an_unwritable_directory_is_refused(runner, server, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # os.access, not chmod: chmod does not stop root, and the tests may run as root
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    result = runner.invoke(main, new(server, "--out", str(locked / "t.json")))
    assert result.exit_code == 2 and "not writable" in result.output
    assert server.requests == [] and os.listdir(locked) == []
