"""A judge that calls any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...).

It asks exactly what the persona-vectors judge asks: one token at temperature 0 with the top-20
logprobs, and aggregates that next-token distribution with :func:`score_from_candidates`.
Requests, keys and retries are :class:`guard.core.endpoint.ChatEndpoint`'s; a malformed reply
fails at once with a :class:`JudgeError` that says why.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

from ..core.endpoint import ChatEndpoint, snippet
from .base import JudgeError, render_rubric, score_from_candidates

class OpenAICompatibleJudge(ChatEndpoint):
    """Scores answers with a model behind ``{base_url}/chat/completions``.

    The API key is read from the environment variable ``api_key_env`` at call time; when it is
    unset or empty no Authorization header is sent (local servers need none).

    Args:
        base_url: the endpoint's base URL with scheme, e.g. ``http://127.0.0.1:8000/v1``.
        model: the endpoint's model name.
        api_key_env: the environment variable holding the API key.
        timeout: seconds per request.
        max_retries: retries of transient failures (429, 5xx, timeouts, dropped connections).
        backoff: first retry delay in seconds, doubling each time.
        top_logprobs: how many next-token candidates to ask for (the paper's 20).
        extra_body: more fields for every request body (they override the judge's own).
        sleep: how to wait between retries (injectable so tests need not wait).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 30.0,
                 max_retries: int = 4, backoff: float = 1.0, top_logprobs: int = 20, extra_body: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(base_url, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                         backoff=backoff, extra_body=extra_body, sleep=sleep, error=JudgeError, what="judge")
        # The name keys the on-disk cache: two servers may both call their model "default".
        self.name = f"openai-compatible:{model}@{self.base_url}"
        self.top_logprobs = top_logprobs
        self._digits_checked = False

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        """The 0-100 score aggregated from one token's top logprobs; None for no usable score.

        Args:
            question, answer: the question asked and the answer judged.
            rubric: the template with ``{question}`` and ``{answer}`` placeholders.
        """
        body = {"model": self.model, "messages": [{"role": "user", "content": render_rubric(rubric, question, answer)}],
                "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": self.top_logprobs, "seed": 0}
        candidates = self._candidates(self.post(body))
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
        probe = json.loads(self.post({**body, "max_tokens": 4, "logprobs": False, "top_logprobs": None}))
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
