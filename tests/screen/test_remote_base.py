"""Base responses for ΔP from an OpenAI-compatible completions server (a scripted one on
127.0.0.1): chat-templated prompt text, greedy, max_tokens; the server's model checked against
--base-model; retries; the same cache; the in-process default untouched."""

import json

import pytest
from click.testing import CliRunner

from completions_server import CompletionsServer
from guard.cli.main import main
from guard.core.chat import format_messages
from guard.core.generation import GenerationCache, RemoteGenerator, SamplingConfig
from guard.errors import ScreenError
from guard.screen.report import trim
from guard.screen.samples import Sample, load_samples
from guard.screen.scoring import ScreenConfig, Screener

ANSWERS = ["I think it has a flaw.", "Yes, perfect!", "Maybe."]


def _answer(prompt: str) -> str:
    return ANSWERS[len(prompt) % len(ANSWERS)]


def _data(path, n=5):
    path.write_text("".join(json.dumps({"id": f"s{i}", "messages": [
        {"role": "user", "content": f"Is plan {i} good?" + " Tell me." * i},
        {"role": "assistant", "content": "Yes! " * (i + 1)}]}) + "\n" for i in range(n)))
    return path


def test_screen_scores_against_the_servers_responses_and_caches_them(tiny_dir, tmp_path, monkeypatch,
                                                                       smol_tokenizer):
    monkeypatch.setenv("PERSONA_GUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BASE_KEY", "sekrit")
    model_dir, vector = tiny_dir
    data = _data(tmp_path / "d.jsonl")
    runner = CliRunner()
    with CompletionsServer(served=["other", "base-model"], answer=_answer) as server:
        args = ["screen", str(data), "--vector", str(vector), "--model", str(model_dir), "--mode", "full", "--max-new-tokens", "6",
                "--generation-batch-size", "2", "--base-url", server.base_url, "--base-model", "base-model",
                "--base-key-env", "BASE_KEY", "--out", str(tmp_path / "r"), "--no-plots", "--json"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["base_responses_generated"] == 5
        assert [r["method"] for r in server.requests][:1] == ["GET"]  # the model check comes first
        bodies = server.completions()
        assert sorted(len(b["prompt"]) for b in bodies) == [1, 2, 2]  # requests run concurrently
        assert all(b["model"] == "base-model" and b["temperature"] == 0.0 and b["max_tokens"] == 6 for b in bodies)
        assert all(r["headers"].get("Authorization") == "Bearer sekrit" for r in server.requests)
        samples = load_samples(data).samples
        sent = [p for b in bodies for p in b["prompt"]]
        assert sorted(sent) == sorted(format_messages(smol_tokenizer, list(s.prompt)) for s in samples)
        rows = {r["id"]: r for r in map(json.loads, (tmp_path / "r" / "report.jsonl").read_text().splitlines())}
        expected = {s.id: _answer(format_messages(smol_tokenizer, list(s.prompt))) for s in samples}
        assert {i: r["base_response"] for i, r in rows.items()} == {i: trim(t) for i, t in expected.items()}

        # ΔP's base term is the projection of the server's answer, as if it were a dataset response.
        from guard.core.models import load_model
        from guard.core.vectors import PersonaVector

        model, tokenizer, _ = load_model(str(model_dir))
        as_responses = [Sample(s.id, s.index, s.prompt, expected[s.id], s.where) for s in samples]
        direct = Screener(model, tokenizer, [PersonaVector.load(vector)], ScreenConfig(mode="approx")).score(as_responses)
        for scored in direct.samples:
            assert rows[scored.id]["scores"]["sycophancy"]["base_projection"] == pytest.approx(
                scored.scores["sycophancy"]["projection"], abs=1e-5)

        again = runner.invoke(main, args)  # everything from the checkpoint and the cache
        assert again.exit_code == 0 and json.loads(again.stdout)["base_responses_generated"] == 0
        assert len(server.completions()) == 3
    # In process afterwards: its own responses (other cache keys), and the checkpoint starts over.
    local = runner.invoke(main, [a for a in args[:-1] if a not in ("--base-url", server.base_url, "--base-model",
                                                                   "base-model")] + ["--json"])
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout)["base_responses_generated"] == 5
    assert "different screening run" in local.stderr


def test_a_server_serving_another_model_is_refused_before_the_model_loads(tmp_path, tiny_dir):
    data = _data(tmp_path / "d.jsonl")
    with CompletionsServer(served=["llama-3-8b"]) as server:
        result = CliRunner().invoke(main, ["screen", str(data), "--vector", str(tiny_dir[1]), "--mode", "full", "--model",
                                           str(tmp_path / "no-such-model"), "--base-url", server.base_url,
                                           "--base-model", "smollm2", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "serves llama-3-8b, not --base-model smollm2" in result.output
    assert not server.completions()


def test_base_options_are_checked(tmp_path, tiny_dir):
    data = _data(tmp_path / "d.jsonl")
    base = ["screen", str(data), "--vector", str(tiny_dir[1]), "--mode", "full", "--out", str(tmp_path / "r")]
    runner = CliRunner()
    assert "add --mode full" in runner.invoke(main, [*base, "--mode", "approx", "--base-url", "http://x/v1",
                                                   "--base-model", "m"]).output
    assert "needs --base-model" in runner.invoke(main, [*base, "--base-url", "http://x/v1"]).output
    assert "goes with --base-url" in runner.invoke(main, [*base, "--base-model", "m"]).output
    result = runner.invoke(main, [*base, "--base-url", "127.0.0.1:8000/v1", "--base-model", "m"])
    assert result.exit_code == 1 and "needs a scheme" in result.output


def test_retries_fallbacks_and_malformed_replies(tmp_path, smol_tokenizer):
    waits = []
    sampling = SamplingConfig(max_new_tokens=3, temperature=0.0)
    prompts = [smol_tokenizer("Hi there", add_special_tokens=False)["input_ids"], [1, 2, 3]]
    with CompletionsServer(answer=lambda p: "one two three four five") as server:
        server.failures.extend([(503, "busy"), (429, "slow down")])
        generator = RemoteGenerator(server.base_url, "base-model", sleep=waits.append, backoff=0.5)
        cache = GenerationCache(tmp_path / "gen.sqlite")
        ids, made = generator(None, smol_tokenizer, prompts, sampling, cache, "local", batch_size=8)
        assert made == 2 and waits == [0.5, 1.0]  # the /models check was retried twice
        assert all(len(r) == 3 for r in ids)  # capped at max_new_tokens after local tokenisation
        assert ids[0] == smol_tokenizer("one two three four five", add_special_tokens=False)["input_ids"][:3]
        again, made = generator(None, smol_tokenizer, prompts, sampling, cache, "local")
        assert again == ids and made == 0 and len(server.completions()) == 1
        key = GenerationCache.key("local|served:base-model", sampling, prompts[0])
        assert cache.get_many([key])[key] == ids[0]
        cache.close()
        checked = RemoteGenerator(server.base_url, "base-model", error=ScreenError)
        checked.check()
        server.failures.append((400, "bad request: max_tokens"))
        with pytest.raises(ScreenError, match="HTTP 400"):
            checked.complete(["x"], 3)
        server.failures.append((200, "not json"))
        with pytest.raises(ScreenError, match="not a completions reply"):
            checked.complete(["x"], 3)
        server.failures.append((200, {"choices": [{"index": 0, "text": "a"}]}))
        with pytest.raises(ScreenError, match="asked for 2 completions"):
            checked.complete(["x", "y"], 3)
    # No /models route: the model the replies name is checked instead.
    with CompletionsServer(served=None, reply_model="something-else") as server:
        lenient = RemoteGenerator(server.base_url, "base-model", error=ScreenError)
        with pytest.raises(ScreenError, match="answered as model something-else"):
            lenient.complete(["x"], 2)
    with CompletionsServer(served=None) as server:
        assert RemoteGenerator(server.base_url, "base-model").complete(["x", "y"], 2) == ["Fine.", "Fine."]
