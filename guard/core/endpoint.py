"""OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, TGI, llama.cpp, ...), with the
standard library only (``urllib``): the request, the key, retries with backoff, and one base
class that the judge and the trait writer share.

Transient failures (429, 5xx, timeouts, dropped connections) are retried with exponential
backoff; anything else fails at once with the caller's error type, saying why.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from ..errors import PersonaGuardError

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
    """Seconds to wait before the next try: a server's Retry-After in seconds when given, else
    ``backoff * 2**attempt``; both capped at :data:`MAX_DELAY`.

    Args:
        attempt: the 0-based number of the attempt that just failed.
        retry_after: the server's Retry-After header, if any.
        backoff: the first delay in seconds.
    """
    try:  # Retry-After in seconds wins; an HTTP-date or garbage falls back to backoff
        if retry_after is not None:
            return min(max(float(retry_after), 0.0), MAX_DELAY)
    except ValueError:
        pass
    return min(backoff * 2 ** attempt, MAX_DELAY)


def post_json(url: str, body: dict, *, api_key_env: str, timeout: float, max_retries: int, backoff: float,
              sleep: Callable[[float], None] = time.sleep, error: type[Exception] = PersonaGuardError) -> str:
    """POST ``body`` as JSON to ``url`` and return the reply body as text.

    Args:
        url, body: where to post and what.
        api_key_env: the environment variable holding the bearer key (see :func:`auth_headers`).
        timeout: seconds per attempt.
        max_retries: how many times a transient failure (429, 5xx, timeouts, dropped connections)
            is retried.
        backoff: the first retry delay in seconds (see :func:`retry_delay`).
        sleep: how to wait between attempts.
        error: the :class:`~guard.errors.PersonaGuardError` subclass raised, at once for any other
            HTTP error (401/403 name the key variable) and after the last attempt for transient ones.
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


class ChatEndpoint:
    """A model behind ``{base_url}/chat/completions``.

    Args:
        base_url: the endpoint's base URL with scheme, e.g. ``http://127.0.0.1:8000/v1``.
        model: the endpoint's model name.
        api_key_env: environment variable holding the API key, read at call time; unset or empty
            means no Authorization header (local servers need none).
        timeout: seconds per request.
        max_retries: retries of transient failures.
        backoff: first retry delay in seconds, doubling each time (capped at :data:`MAX_DELAY`).
        extra_body: more fields for every request body.
        sleep: how to wait between retries (injectable so tests need not wait).
        error: the :class:`~guard.errors.PersonaGuardError` subclass raised on failure.
        what: how messages name the endpoint ("judge", "generator").
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 30.0,
                 max_retries: int = 4, backoff: float = 1.0, extra_body: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep, error: type[Exception] = PersonaGuardError,
                 what: str = "endpoint"):
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise error(f"{what} URL {base_url!r} needs a scheme, e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.extra_body = dict(extra_body or {})
        self.sleep = sleep
        self.error = error

    def post(self, body: dict) -> str:
        """POST ``body`` (with :attr:`extra_body` merged in) and return the reply text.

        Args:
            body: the request body.
        """
        # self.sleep is read per call so tests can swap it after construction
        return post_json(self.url, {**body, **self.extra_body}, api_key_env=self.api_key_env, timeout=self.timeout,
                         max_retries=self.max_retries, backoff=self.backoff, sleep=self.sleep, error=self.error)

    def message_content(self, text: str, error: type[Exception] | None = None):
        """``choices[0].message.content`` of a chat-completion reply body (whatever its type: a
        refusal may be null), or ``error`` (default :attr:`error`) naming what was expected.

        Args:
            text: the reply body.
            error: the exception type raised for a body that is not a chat completion.
        """
        try:
            return json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise (error or self.error)(f"malformed reply from {self.url} (expected choices[0].message.content): "
                                        f"{snippet(text)!r}") from None
