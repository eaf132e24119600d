"""guard.traits.generate: prompt, reply parsing, validation with retries, atomic writing, and both
generators (an OpenAI-compatible endpoint on 127.0.0.1, a local model's chat prompt)."""

from __future__ import annotations

import json
import os

import pytest

from chat_server import ChatServer, flawed_trait, generated_trait
from guard.core.chat import format_messages
from guard.errors import TraitError
from guard.traits import load_trait
from guard.traits.generate import (SYSTEM_PROMPT, LocalChatGenerator, OpenAIChatGenerator, TraitWriter,
                                   build_prompt, extract_json, write_trait)

NAME, DESCRIPTION = "overconfidence", "Stating guesses as certain facts and never admitting doubt."
SMALL = dict(pairs=2, extraction_questions=3, evaluation_questions=3, examples=2)


class ScriptedChat:
    """A chat callable answering from a list, recording the messages of every call."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls: list[list[dict]] = []

    def __call__(self, messages):
        self.calls.append([dict(m) for m in messages])
        return self.replies.pop(0)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never route the test server through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with ChatServer() as s:
        yield s


def test_prompt_asks_for_json_with_counts_and_rules():
    system, user = build_prompt(NAME, DESCRIPTION, pairs=4, extraction_questions=7, evaluation_questions=9,
                                examples=11)
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    text = user["content"]
    assert DESCRIPTION in text and f'"{NAME}"' in text
    for phrase in ("JSON only", "exactly 4 objects", "exactly 7 distinct", "exactly 9 distinct", "exactly 11 objects",
                   "disjoint", "{question}", "{answer}", "no other curly braces", '"non_trait"'):
        assert phrase in text, phrase
    assert "an empty list" in build_prompt(NAME, DESCRIPTION, pairs=1, extraction_questions=1,
                                           evaluation_questions=1, examples=0)[1]["content"]


@pytest.mark.parametrize("reply", [
    '{"judge_rubric": "x"}',
    'Here is the trait:\n```json\n{"judge_rubric": "x"}\n```\nHope it helps!',
    '```\n{"judge_rubric": "x"}\n```',
    'Sure {thing}. Note {"aside": 1} then {"judge_rubric": "x"} and done.',
])
def test_extract_json_skips_fences_and_prose(reply):
    assert extract_json(reply) == ({"judge_rubric": "x"}, None)


def test_extract_json_falls_back_to_an_object_with_other_keys():
    # the paper's own keys: validation, not the parser, should say what is wrong with them
    paper = {"instruction": [], "questions": [], "eval_prompt": "x"}
    assert extract_json("Here:\n" + json.dumps(paper)) == (paper, None)
    # but never to an inner object of a broken one
    assert extract_json('{"instruction_pairs": [{"pos": "a", "neg": "b"}],,}')[0] is None


@pytest.mark.parametrize("reply, why", [
    ("", "empty"),
    ("I cannot help with that.", "no JSON object"),
    ('Here: {"judge_rubric": "x",}', "not valid JSON (line 1"),
    ("[1, 2]", "no JSON object"),
])
def test_extract_json_says_what_is_wrong(reply, why):
    data, problem = extract_json(reply)
    assert data is None and why in problem


def test_retries_with_the_problems_listed_then_writes(tmp_path):
    valid = generated_trait(pairs=3, extraction=5, evaluation=3, examples=2)  # more than asked: trimmed
    valid["name"] = "Overconfidence!"  # the generator's rewording is dropped
    chat = ScriptedChat("Sure! Here is your trait: {not json at all",
                        json.dumps(flawed_trait()),
                        "```json\n" + json.dumps(valid) + "\n```")
    logs = []
    out = tmp_path / "overconfidence.json"
    written = write_trait(NAME, DESCRIPTION, chat, out_path=out, log=logs.append, **SMALL)

    assert written.attempts == 3 and written.path == out
    assert len(chat.calls) == 3
    assert [m["role"] for m in chat.calls[1]] == ["system", "user", "assistant", "user"]
    assert chat.calls[1][2]["content"] == "Sure! Here is your trait: {not json at all"
    assert "not valid JSON" in chat.calls[1][3]["content"]
    retry = chat.calls[2][-1]["content"]
    assert chat.calls[2][:4] == chat.calls[1]  # the whole conversation goes back
    for problem in ("'instruction_pairs' has 1 entries; 2 were asked for", "must be disjoint",
                    "exactly the placeholders {question} and {answer}"):
        assert problem in retry, problem

    trait = load_trait(out)
    assert trait.name == NAME and trait.description == DESCRIPTION
    assert (len(trait.instruction_pairs), len(trait.extraction_questions), len(trait.evaluation_questions),
            len(trait.examples)) == (2, 3, 3, 2)
    assert written.trait == trait
    assert list(json.loads(out.read_text())) == ["name", "description", "instruction_pairs", "extraction_questions",
                                                 "evaluation_questions", "judge_rubric", "examples"]
    assert any("kept the first 2 of 3" in line for line in logs)
    assert os.listdir(tmp_path) == ["overconfidence.json"]  # no temporary file left beside it


def test_an_object_with_the_wrong_keys_is_sent_back_with_them_named(tmp_path):
    chat = ScriptedChat(json.dumps({"instruction": [], "questions": [], "eval_prompt": "x"}),
                        json.dumps(generated_trait()))
    written = write_trait(NAME, DESCRIPTION, chat, out_path=tmp_path / "t.json", **SMALL)
    assert written.attempts == 2
    retry = chat.calls[1][-1]["content"]
    assert "unknown key 'instruction'" in retry and "missing key 'judge_rubric'" in retry


def test_exhausted_attempts_raise_one_line_and_write_nothing(tmp_path):
    chat = ScriptedChat(json.dumps(flawed_trait()), "no json here")
    with pytest.raises(TraitError) as err:
        write_trait(NAME, DESCRIPTION, chat, out_path=tmp_path / "t.json", max_attempts=2, **SMALL)
    message = str(err.value)
    assert "\n" not in message
    assert "in 2 attempt(s)" in message and "no JSON object" in message and "--max-attempts" in message
    assert len(chat.calls) == 2
    assert os.listdir(tmp_path) == []


def test_existing_file_is_refused_before_asking_and_replaced_with_overwrite(tmp_path):
    out = tmp_path / "t.json"
    out.write_text("keep me")
    chat = ScriptedChat(json.dumps(generated_trait()))
    with pytest.raises(TraitError, match="already exists; pass --overwrite"):
        write_trait(NAME, DESCRIPTION, chat, out_path=out, **SMALL)
    assert chat.calls == [] and out.read_text() == "keep me"
    write_trait(NAME, DESCRIPTION, chat, out_path=out, overwrite=True, **SMALL)
    assert load_trait(out).name == NAME


def test_a_file_appearing_during_generation_is_not_clobbered(tmp_path):
    out = tmp_path / "t.json"

    def chat(messages):
        out.write_text("written meanwhile")
        return json.dumps(generated_trait())

    with pytest.raises(TraitError, match="already exists"):
        write_trait(NAME, DESCRIPTION, chat, out_path=out, **SMALL)
    assert out.read_text() == "written meanwhile"
    assert os.listdir(tmp_path) == ["t.json"]


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", fail)
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_trait(NAME, DESCRIPTION, ScriptedChat(json.dumps(generated_trait())), out_path=tmp_path / "t.json",
                    **SMALL)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="a/b"), "must start with a letter or digit"),
    (dict(description="  "), "description is empty"),
    (dict(out="t.txt"), "must end in .json"),
    (dict(out="missing/t.json"), "does not exist"),
    (dict(pairs=0), "at least 1"),
    (dict(max_attempts=0), "at least 1"),
])
def test_bad_arguments_fail_before_asking(tmp_path, kwargs, match):
    chat = ScriptedChat()
    counts = {**SMALL, **{k: v for k, v in kwargs.items() if k in ("pairs", "max_attempts")}}
    with pytest.raises(TraitError, match=match):
        write_trait(kwargs.get("name", NAME), kwargs.get("description", DESCRIPTION), chat,
                    out_path=tmp_path / kwargs.get("out", "t.json"), **counts)
    assert chat.calls == []


def test_writer_accepts_an_object_with_chat():
    class Generator:
        name = "fake"

        def chat(self, messages):
            return json.dumps(generated_trait())

    data, attempts = TraitWriter(Generator(), **SMALL).generate(NAME, DESCRIPTION)
    assert attempts == 1 and data["name"] == NAME and len(data["examples"]) == 2


def test_openai_generator_request_shape_and_reply(server, monkeypatch):
    monkeypatch.setenv("GUARD_TEST_GEN_KEY", "sk-gen")
    server.reply("hello")
    server.reply(None)  # a refusal: null content
    gen = OpenAIChatGenerator(server.base_url + "/", "gen-model", api_key_env="GUARD_TEST_GEN_KEY",
                              temperature=0.5, max_tokens=100)
    messages = [{"role": "user", "content": "hi"}]
    assert gen.chat(messages) == "hello"
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["json"] == {"model": "gen-model", "messages": messages, "temperature": 0.5, "max_tokens": 100}
    assert req["headers"]["Authorization"] == "Bearer sk-gen"
    monkeypatch.delenv("GUARD_TEST_GEN_KEY")  # read at call time: no key, no header
    plain = OpenAIChatGenerator(server.base_url, "gen-model", api_key_env="GUARD_TEST_GEN_KEY")
    assert plain.chat(messages) == ""
    assert "Authorization" not in server.requests[1]["headers"]
    assert server.requests[1]["json"] == {"model": "gen-model", "messages": messages}  # unset options not sent


def test_openai_generator_errors(server):
    sleeps = []
    gen = OpenAIChatGenerator(server.base_url, "gen-model", api_key_env="GUARD_TEST_GEN_KEY", backoff=0.5,
                              sleep=sleeps.append)
    server.error(503, "busy")
    server.reply("ok")
    assert gen.chat([{"role": "user", "content": "x"}]) == "ok"  # transient: retried by the shared helper
    assert sleeps == [0.5]
    server.error(401, '{"error": "bad key"}')
    with pytest.raises(TraitError, match=r"401 \(check the API key in \$GUARD_TEST_GEN_KEY\)"):
        gen.chat([{"role": "user", "content": "x"}])
    server.script.append((200, {"object": "error"}))
    with pytest.raises(TraitError, match="malformed reply.*choices"):
        gen.chat([{"role": "user", "content": "x"}])
    with pytest.raises(TraitError, match="needs a scheme"):
        OpenAIChatGenerator("127.0.0.1:8000/v1", "m")


def test_write_trait_through_the_endpoint(server, tmp_path):
    server.reply("Here you go:\n" + json.dumps(flawed_trait()))
    server.reply(json.dumps(generated_trait()))
    gen = OpenAIChatGenerator(server.base_url, "gen-model", api_key_env="GUARD_TEST_GEN_KEY")
    written = write_trait(NAME, DESCRIPTION, gen, out_path=tmp_path / "t.json", **SMALL)
    assert written.attempts == 2 and len(server.requests) == 2
    assert "must be disjoint" in server.messages(1)[-1]["content"]
    assert server.messages(1)[2] == {"role": "assistant", "content": "Here you go:\n" + json.dumps(flawed_trait())}


def test_local_generator_uses_the_chat_template(smol_tokenizer):
    messages = build_prompt(NAME, DESCRIPTION, pairs=1, extraction_questions=1, evaluation_questions=1, examples=0)
    prompt = LocalChatGenerator(None, smol_tokenizer).prompt(messages)
    assert prompt == format_messages(smol_tokenizer, messages)
    assert prompt.startswith("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_local_generator_chat_decodes_a_greedy_reply(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    gen = LocalChatGenerator(model, tokenizer, max_new_tokens=3)
    first = gen.chat([{"role": "user", "content": "Hello"}])
    assert isinstance(first, str) and first == gen.chat([{"role": "user", "content": "Hello"}])  # greedy
