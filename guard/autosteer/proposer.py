"""An LLM that proposes latent strengths from past trials: the hackathon's loop, offline-capable.

Ghilardi, Nobili and Xing's scorer model reads the latents' labels and, each round, the weights
tried so far with the steered model's outputs and the judge's critique, and proposes new
weights. Here the model sits behind any OpenAI-compatible chat endpoint (a local llama.cpp or
vLLM server will do); what it reads per past trial is the strengths, the objective and its
components (concept, fluency, relevance: the scores are the critique) and two greedy answers.
Its reply must hold a JSON list of one strength per latent; anything else is sent back with
the problem named, a few times, before :class:`~guard.autosteer.search.ProposalError` hands the
step to a random move. The search keeps the best judged strengths, never the last proposed
(:func:`~guard.autosteer.search.search_with_proposer`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence

from ..core.endpoint import ChatEndpoint, snippet
from .data import AutosteerError
from .search import ProposalError, Trial

SYSTEM = ("You tune a steering intervention on a language model. Each latent below is a feature of the model's "
          "activations; adding it with some strength pushes the model's answers toward what its snippets and "
          "tokens suggest. Strengths run from 0 (off) to {max_strength} (strongest). Your goal: answers that show "
          "the target behaviour while staying fluent and relevant to the question. Rules of thumb: all strengths 0 "
          "gives the unsteered model; broken or repetitive answers (low fluency) mean some strength is too high; do "
          "not repeat a combination already tried. Reply with only a JSON list of {n} numbers, one per latent in "
          "the order given, e.g. {example}.")
HISTORY_SHOWN = 8  # past trials shown besides the best one: the prompt stays short for small models


def parse_strengths(reply: str, n: int) -> list[float]:
    """The ``n`` strengths in a proposer's reply: the last bracketed list in it, as JSON (or, failing
    that, the numbers between its brackets).

    Args:
        reply: the model's reply text.
        n: how many strengths are expected.
    """
    lists = re.findall(r"\[[^\[\]]*\]", reply or "")
    if not lists:
        raise ProposalError(f"the reply holds no list of strengths: {snippet(reply or '', 120)!r}")
    text = lists[-1]
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ProposalError(f"the list {text!r} holds something that is not a number") from None
    if len(numbers) != n:
        raise ProposalError(f"the list {text!r} has {len(numbers)} strengths, expected {n} (one per latent)")
    if not all(math.isfinite(v) for v in numbers):
        raise ProposalError(f"the list {text!r} holds a non-finite strength")
    return numbers


def _describe(latents) -> str:
    lines = []
    for i, record in enumerate(latents):
        tokens = ", ".join(repr(t) for t in list(record.top_tokens)[:8]) or "(none)"
        snippets = " / ".join(list(record.snippets)[:2]) or "(none)"
        lines.append(f"{i + 1}. latent {record.latent}: promotes tokens {tokens}; fires on: {snippets}")
    return "\n".join(lines)


def _trial_text(trial: Trial) -> str:
    scores = ", ".join(f"{k} {v:.3f}" for k, v in trial.components.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool))
    answers = "".join(f"\n  Q: {p}\n  A: {a}" for p, a in trial.components.get("samples", []))
    return f"strengths {list(trial.strengths)} -> score {trial.score:.3f} ({scores}){answers}"


def build_messages(description: str, latents, max_strength: float, history: Sequence[Trial]) -> list[dict]:
    """The chat messages asking for the next strengths.

    Args:
        description: the target behaviour.
        latents: the chosen latents' records (snippets and top tokens are shown).
        max_strength: the strengths' upper end.
        history: the trials so far (the best and the last :data:`HISTORY_SHOWN` are shown).
    """
    n = len(latents)
    example = json.dumps([round(max_strength * f, 2) for f in ([0.5, 0.2, 0.8, 0.0] * n)[:n]])
    system = SYSTEM.format(max_strength=max_strength, n=n, example=example)
    user = f"Target behaviour: {description}\n\nLatents:\n{_describe(latents)}\n\n"
    if not history:
        user += "No trial yet: make an initial guess from the latents alone."
    else:
        best = max(history, key=lambda t: t.score)
        shown = list(history[-HISTORY_SHOWN:])
        if best not in shown:
            shown.insert(0, best)
        user += ("Trials so far (score: higher is better, the harmonic mean of concept, fluency and relevance, "
                 "each 0-1):\n" + "\n".join(_trial_text(t) for t in shown) +
                 f"\n\nBest so far: {list(best.strengths)} (score {best.score:.3f}). Propose the next strengths.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class ChatProposer(ChatEndpoint):
    """Proposes latent strengths through ``{base_url}/chat/completions``.

    Args:
        base_url: the endpoint's base URL with scheme, e.g. ``http://127.0.0.1:8080/v1``.
        model: the endpoint's model name.
        api_key_env: environment variable holding the API key (unset: no Authorization header).
        timeout: seconds per request.
        max_retries: retries of transient HTTP failures.
        backoff: first retry delay in seconds.
        attempts: replies asked for per proposal when a reply holds no usable list (the problem is
            sent back each time), before the step falls back to a random move.
        temperature: sampling temperature of the proposer.
        max_tokens: reply length cap.
        extra_body: more fields for every request body.
        sleep: how to wait between HTTP retries (injectable for tests).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, attempts: int = 3, temperature: float = 0.7,
                 max_tokens: int = 256, extra_body: dict | None = None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(base_url, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                         backoff=backoff, extra_body=extra_body, sleep=sleep, error=AutosteerError, what="proposer")
        if attempts < 1:
            raise AutosteerError(f"the proposer needs at least 1 attempt per proposal, got {attempts}")
        self.name = f"openai-compatible:{model}@{self.base_url}"
        self.attempts = attempts
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.failures: list[str] = []  # why each failed proposal failed, for the report

    def _content(self, body: str) -> str:
        content = self.message_content(body, ProposalError)
        if not isinstance(content, str):
            raise ProposalError(f"the proposer's message content is not text: {snippet(body)}")
        return content

    def propose(self, description: str, latents, max_strength: float, history: Sequence[Trial]) -> list[float]:
        """The next strengths, one per latent (a :class:`ProposalError` after :attr:`attempts` unusable replies).

        Args:
            description: the target behaviour.
            latents: the chosen latents' records.
            max_strength: the strengths' upper end.
            history: the trials so far.
        """
        messages = build_messages(description, latents, max_strength, history)
        problem = "no attempt made"
        for _ in range(self.attempts):
            body = self.post({"model": self.model, "messages": messages, "temperature": self.temperature,
                              "max_tokens": self.max_tokens})
            try:
                reply = self._content(body)
            except ProposalError as error:  # a broken body: ask again, nothing to send back
                problem = str(error)
                continue
            try:
                return parse_strengths(reply, len(latents))
            except ProposalError as error:
                problem = str(error)
                messages = messages + [{"role": "assistant", "content": reply},
                                       {"role": "user", "content": f"{problem}. Reply with only a JSON list of "
                                                                   f"{len(latents)} numbers between 0 and "
                                                                   f"{max_strength}."}]
        self.failures.append(problem)
        raise ProposalError(f"no usable strengths in {self.attempts} replies; last problem: {problem}")

    def for_latents(self, description: str, latents, max_strength: float) -> Callable[[list[Trial]], list[float]]:
        """:meth:`propose` bound to one search: the trials so far -> the next strengths.

        Args:
            description, latents, max_strength: as in :meth:`propose`.
        """
        latents = list(latents)
        if not latents:
            raise AutosteerError("the proposer needs at least one latent")
        return lambda history: self.propose(description, latents, max_strength, history)
