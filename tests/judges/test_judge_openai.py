"""OpenAICompatibleJudge against a scripted local HTTP server: request shape, logprob parsing,
retries, timeouts, malformed replies, auth errors and caching."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from guard.judges.base import COHERENCE_RUBRIC, CachedJudge, JudgeError, render_rubric
from guard.judges.openai import OpenAICompatibleJudge

Q, A = "What is 2+2?", "4."


def reply(top: list[tuple[str, float]] | None, *, logprobs=True) -> dict:
    """A chat-completions reply whose first token has the given (token, probability) alternatives."""
    content = [{"token": top[0][0], "logprob": math.log(top[0][1]),
                "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}] if top else []
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0] if top else ""},
                         "logprobs": {"content": content} if logprobs else None, "finish_reason": "length"}]}


GOOD = reply([("80", 0.5), ("90", 0.3), ("Hello", 0.2)])
GOOD_SCORE = (80 * 0.5 + 90 * 0.3) / 0.8


class Server:
    """Answers POSTs from a queue of scripted responses and records every request."""

    def __init__(self):
        self.script: deque = deque()
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(raw)})
                status, headers, body, delay = server.script.popleft() if server.script else (418, {}, "unscripted", 0)
                time.sleep(delay)
                body = body if isinstance(body, (str, bytes)) else json.dumps(body)
                body = body.encode() if isinstance(body, str) else body
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout tests)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def add(self, body=GOOD, status=200, headers=None, delay=0.0):
        self.script.append((status, headers or {}, body, delay))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never route the test server through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def judge(server, **kw) -> OpenAICompatibleJudge:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("api_key_env", "GUARD_TEST_JUDGE_KEY")
    return OpenAICompatibleJudge(server.base_url, "judge-model", **kw)


def test_request_shape_and_auth(server, monkeypatch):
    monkeypatch.setenv("GUARD_TEST_JUDGE_KEY", "sk-test")
    server.add()
    server.add()
    j = judge(server)
    assert j.name == f"openai-compatible:judge-model@{server.base_url.rstrip('/')}"  # the URL keys the cache too
    j.score(Q, A, COHERENCE_RUBRIC)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["json"] == {"model": "judge-model",
                           "messages": [{"role": "user", "content": render_rubric(COHERENCE_RUBRIC, Q, A)}],
                           "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20, "seed": 0}
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Authorization"] == "Bearer sk-test"

    monkeypatch.delenv("GUARD_TEST_JUDGE_KEY")  # read at call time: no key, no header
    j.score(Q, A, COHERENCE_RUBRIC)
    assert "Authorization" not in server.requests[1]["headers"]


def test_empty_key_and_extra_body(server, monkeypatch):
    monkeypatch.setenv("GUARD_TEST_JUDGE_KEY", "")
    server.add()
    judge(server, extra_body={"top_k": 1, "seed": 7}).score(Q, A, "{question} {answer}")
    req = server.requests[0]
    assert "Authorization" not in req["headers"]
    assert req["json"]["top_k"] == 1 and req["json"]["seed"] == 7
    assert req["json"]["messages"][0]["content"] == f"{Q} {A}"


def test_logprob_parsing(server):
    server.add(GOOD)
    server.add(reply([("REFUSAL", 0.8), ("50", 0.1), ("I", 0.1)]))
    j = judge(server)
    assert j.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(GOOD_SCORE)
    assert j.score(Q, A, COHERENCE_RUBRIC) is None


def test_retries_on_503_with_growing_backoff(server):
    server.add(status=503, body="busy")
    server.add(status=503, body="busy")
    server.add()
    j = judge(server, backoff=0.5)
    assert j.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(GOOD_SCORE)
    assert len(server.requests) == 3
    assert j.sleep == [0.5, 1.0]


def test_retry_after_is_honoured_and_capped(server):
    server.add(status=429, headers={"Retry-After": "7"}, body="slow down")
    server.add(status=429, headers={"Retry-After": "3600"}, body="slow down")
    server.add()
    j = judge(server)
    assert j.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(GOOD_SCORE)
    assert j.sleep == [7.0, 30.0]


def test_persistent_429_gives_up(server):
    for _ in range(5):
        server.add(status=429, body="rate limited")
    j = judge(server, max_retries=3, backoff=1.0)
    with pytest.raises(JudgeError, match="after 4 attempts") as err:
        j.score(Q, A, COHERENCE_RUBRIC)
    assert "429" in str(err.value) and server.base_url.rstrip("/") in str(err.value)
    assert len(server.requests) == 4
    assert j.sleep == [1.0, 2.0, 4.0]


def test_timeout_then_success(server):
    server.add(delay=1.0)
    server.add()
    j = judge(server, timeout=0.2, max_retries=1)
    assert j.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(GOOD_SCORE)
    assert len(server.requests) == 2


def test_timeout_exhausts_retries(server):
    server.add(delay=1.0)
    server.add(delay=1.0)
    j = judge(server, timeout=0.2, max_retries=1)
    with pytest.raises(JudgeError, match="timeout") as err:
        j.score(Q, A, COHERENCE_RUBRIC)
    assert "2 attempts" in str(err.value)


def test_connection_refused_is_retried(server):
    port = server.httpd.server_address[1]
    server.httpd.shutdown()
    server.httpd.server_close()
    j = OpenAICompatibleJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, sleep=Sleeps())
    with pytest.raises(JudgeError, match="3 attempts.*connection error"):
        j.score(Q, A, COHERENCE_RUBRIC)
    assert len(j.sleep) == 2


@pytest.mark.parametrize("body, match", [
    ("<html>Bad gateway</html>", "not JSON.*Bad gateway"),
    ({"object": "error"}, "no choices"),
    (reply([("80", 1.0)], logprobs=False), "no logprobs.*logprobs`/`top_logprobs"),
    ({"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": 80, "logprob": "x"}]}]}}]}, "top_logprobs"),
])
def test_malformed_replies_are_not_retried(server, body, match):
    server.add(body=body)
    server.add()
    with pytest.raises(JudgeError, match=match) as err:
        judge(server).score(Q, A, COHERENCE_RUBRIC)
    assert "/v1/chat/completions" in str(err.value)
    assert len(server.requests) == 1


def test_401_fails_immediately_naming_the_key_variable(server):
    server.add(status=401, body='{"error": "invalid api key"}')
    server.add()
    with pytest.raises(JudgeError, match=r"401.*GUARD_TEST_JUDGE_KEY.*invalid api key"):
        judge(server).score(Q, A, COHERENCE_RUBRIC)
    assert len(server.requests) == 1


def test_404_fails_immediately(server):
    server.add(status=404, body="model not found")
    with pytest.raises(JudgeError, match="404.*model not found"):
        judge(server).score(Q, A, COHERENCE_RUBRIC)
    assert len(server.requests) == 1


def test_works_with_cached_judge(server, tmp_path):
    server.add()
    path = tmp_path / "judge.sqlite"
    cached = CachedJudge(judge(server), path)
    assert cached.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(GOOD_SCORE)
    assert cached.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(GOOD_SCORE)
    cached.close()
    again = CachedJudge(judge(server), path)
    assert again.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(GOOD_SCORE)
    again.close()
    assert len(server.requests) == 1


def test_a_model_that_writes_numbers_digit_by_digit_is_refused(server):
    digits = reply([("8", 0.6), ("9", 0.3), ("7", 0.1)])
    server.add(digits)
    server.add({"choices": [{"message": {"role": "assistant", "content": "85"}}]})  # the probe: 85 = "8" + "5"
    with pytest.raises(JudgeError, match="digit by digit.*--judge-model"):
        judge(server).score(Q, A, COHERENCE_RUBRIC)
    assert server.requests[1]["json"]["max_tokens"] == 4


def test_single_digit_answers_from_a_whole_number_tokenizer_pass_after_one_probe(server):
    j = judge(server)
    server.add(reply([("7", 0.9), ("Hello", 0.1)]))
    server.add({"choices": [{"message": {"role": "assistant", "content": "7"}}]})
    server.add(reply([("5", 0.9), ("Hello", 0.1)]))
    assert j.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(7)
    assert j.score(Q, A, COHERENCE_RUBRIC) == pytest.approx(5)
    assert len(server.requests) == 3  # probed once, not per call


def test_a_url_without_scheme_fails_at_once():
    with pytest.raises(JudgeError, match="needs a scheme"):
        OpenAICompatibleJudge("localhost:8000/v1", "m")
