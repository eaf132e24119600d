"""A judge that calls any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...).

It asks exactly what the persona-vectors judge asks: one token at temperature 0 with the top-20
logprobs, and aggregates that next-token distribution with :func:`score_from_candidates`.
Standard library only (``urllib``), so judging needs no extra dependency. Transient failures
(429, 5xx, timeouts, dropped connections) are retried with exponential backoff; anything else,
including a malformed reply, fails at once with a :class:`JudgeError` that says why.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from .base import JudgeError, render_rubric, score_from_candidates

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_DELAY = 30.0  # seconds; caps both the exponential backoff and a server's Retry-After


def snippet(body: bytes | str, limit: int = 200) -> str:
    """The first ``limit`` characters of a reply body (bytes are decoded leniently), for error messages."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    return text[:limit] + ("..." if len(text) > limit else "")


def auth_headers(api_key_env: str) -> dict[str, str]:
    """JSON request headers, with ``Authorization: Bearer <key>`` when the environment variable
    ``api_key_env`` is set and non-empty (read now, at call time; local servers need no key)."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def retry_delay(attempt: int, retry_after: str | None, backoff: float) -> float:
    """Seconds to wait before retry ``attempt`` + 1 (0-based ``attempt``): a server's Retry-After in
    seconds when given, else ``backoff * 2**attempt``; both capped at :data:`MAX_DELAY`."""
    try:  # Retry-After in seconds wins; an HTTP-date or garbage falls back to backoff
        if retry_after is not None:
            return min(max(float(retry_after), 0.0), MAX_DELAY)
    except ValueError:
        pass
    return min(backoff * 2 ** attempt, MAX_DELAY)


def post_json(url: str, body: dict, *, api_key_env: str, timeout: float, max_retries: int, backoff: float,
              sleep: Callable[[float], None] = time.sleep, error: type[Exception] = JudgeError) -> str:
    """POST ``body`` as JSON to ``url`` and return the reply body as text.

    Arguments: ``api_key_env`` names the environment variable holding the bearer key (see
    :func:`auth_headers`); ``timeout`` is seconds per attempt; ``max_retries`` is how many times a
    transient failure (429, 5xx, timeouts, dropped connections) is retried, waiting
    :func:`retry_delay` seconds via ``sleep`` in between; ``error`` is the
    :class:`~guard.errors.PersonaGuardError` subclass raised, at once for any other HTTP error
    (401/403 name the key variable) and after the last attempt for transient ones.
    """
    data = json.dumps(body).encode()
    attempts = max_retries + 1
    last = "no attempt made"
    for attempt in range(attempts):
        retry_after = None
        request = urllib.request.Request(url, data=data, headers=auth_headers(api_key_env), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:  # before URLError: HTTPError is a subclass
            text = snippet(e.read() or b"")
            if e.code not in RETRY_STATUSES:
                hint = f" (check the API key in ${api_key_env})" if e.code in (401, 403) else ""
                raise error(f"{url} answered HTTP {e.code}{hint}: {text}") from e
            last = f"HTTP {e.code}: {text}"
            retry_after = e.headers.get("Retry-After") if e.headers else None
        except TimeoutError:  # socket.timeout is an alias; raised while reading the reply
            last = f"timeout: no reply within {timeout} s"
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                last = f"timeout: no reply within {timeout} s"
            else:
                last = f"connection error: {e.reason}"
        except (ConnectionError, http.client.HTTPException) as e:  # e.g. dropped mid-reply
            last = f"connection error: {e!r}"
        if attempt < max_retries:
            sleep(retry_delay(attempt, retry_after, backoff))
    raise error(f"{url}: gave up after {attempts} attempts; last error: {last}")


class OpenAICompatibleJudge:
    """Scores answers with a model behind ``{base_url}/chat/completions``.

    The API key is read from the environment variable ``api_key_env`` at call time; when it is
    unset or empty no Authorization header is sent (local servers need none).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 30.0,
                 max_retries: int = 4, backoff: float = 1.0, top_logprobs: int = 20, extra_body: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise JudgeError(f"judge URL {base_url!r} needs a scheme, e.g. http://127.0.0.1:8000/v1")
        self.url = f"{base_url.rstrip('/')}/chat/completions"
        self.model = model
        # The name keys the on-disk cache: two servers may both call their model "default".
        self.name = f"openai-compatible:{model}@{base_url.rstrip('/')}"
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs
        self.extra_body = dict(extra_body or {})
        self.sleep = sleep  # injectable so tests need not wait
        self._digits_checked = False

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        body = {"model": self.model, "messages": [{"role": "user", "content": render_rubric(rubric, question, answer)}],
                "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": self.top_logprobs, "seed": 0,
                **self.extra_body}
        candidates = self._candidates(self._post(body))
        self._check_whole_numbers(candidates, body)
        return score_from_candidates(candidates)

    def _check_whole_numbers(self, candidates: list[tuple[str, float]], body: dict) -> None:
        """One-token scoring needs a tokenizer that writes 0-100 as single tokens. When a reply
        offers only single digits, ask once for a few tokens: if the answer goes on with more
        digits (85 written as "8", "5"), every score would be read as 0-9, so refuse clearly."""
        if self._digits_checked:
            return
        numeric = [token.strip() for token, p in candidates if token.strip().isdigit() and p > 0.01]
        if not numeric or any(len(token) > 1 for token in numeric):
            self._digits_checked = numeric != []
            return
        probe = json.loads(self._post({**body, "max_tokens": 4, "logprobs": False, "top_logprobs": None}))
        try:
            text = (probe["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            text = ""
        self._digits_checked = True
        digits = len(text) - len(text.lstrip("0123456789"))
        if digits > 1:
            raise JudgeError(
                f"{self.model!r} at {self.url} writes numbers digit by digit (it answered {text[:12]!r} but its "
                "first token is a single digit), so a one-token score would read 85 as 8. Serve a model whose "
                "tokenizer has whole numbers as tokens, or judge locally (--judge-model), which reads multi-token numbers")

    def _post(self, body: dict) -> str:
        # self.sleep is read per call so tests can swap it after construction
        return post_json(self.url, body, api_key_env=self.api_key_env, timeout=self.timeout,
                         max_retries=self.max_retries, backoff=self.backoff, sleep=self.sleep, error=JudgeError)

    def _candidates(self, text: str) -> list[tuple[str, float]]:
        def malformed(why: str) -> JudgeError:
            return JudgeError(f"malformed reply from {self.url} ({why}): {snippet(text)!r}")

        try:
            reply = json.loads(text)
        except ValueError:
            raise malformed("not JSON") from None
        try:
            logprobs = reply["choices"][0].get("logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise malformed("no choices[0]") from None
        if not logprobs:
            raise JudgeError(f"{self.url} returned no logprobs for model {self.model!r}; this judge needs an "
                             f"endpoint supporting `logprobs`/`top_logprobs`")
        try:
            top = logprobs["content"][0]["top_logprobs"]
            candidates = []
            for entry in top:
                token, logprob = entry["token"], entry["logprob"]
                if not isinstance(token, str) or isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
                    raise TypeError
                candidates.append((token, math.exp(logprob)))
        except (KeyError, IndexError, TypeError, AttributeError, OverflowError):
            raise malformed("expected choices[0].logprobs.content[0].top_logprobs as [{token, logprob}, ...]") from None
        if not candidates:  # an endpoint ignoring top_logprobs would otherwise turn every answer into None
            raise JudgeError(f"{self.url} returned an empty top_logprobs list; this judge needs an endpoint "
                             f"supporting `logprobs`/`top_logprobs`")
        return candidates
