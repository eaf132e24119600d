"""Batched generation: length-sorted batches, left padding, KV cache, reproducible sampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .forward import encode, pad_batch, plan_batches  # noqa: F401  (encode, pad_batch: re-exported)
from .models import eval_mode


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 96
    # The paper samples 7B models at T=1; a 135M model at T=1 rambles into noise, so we default
    # lower. Pass temperature=1.0 for the paper's setting. 0 means greedy.
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def stop_token_ids(model, tokenizer) -> set[int]:
    """The end-of-sequence token ids of the model's generation config and of the tokenizer, together.

    Args:
        model, tokenizer: the model (its ``generation_config``, if any) and its tokenizer.
    """
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[int]]:
    """Generate a response for every prompt; returns response token ids, stop token excluded.

    Prompts are sorted by length so each batch pads little; the results come back in input
    order. Batch ``i`` (in sorted order) samples with seed ``sampling.seed + i``, so a run is
    reproducible whatever else happened in the process.

    Args:
        model, tokenizer: the model to generate with and its tokenizer (pad and stop tokens).
        prompt_ids: the prompts' token ids.
        sampling: the sampling settings (``temperature <= 0``: greedy).
        batch_size: prompts per generation batch at most.
        progress: show a progress bar, advanced after every batch.
        desc: the progress bar's label.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    results: list[list[int] | None] = [None] * len(prompt_ids)
    greedy = sampling.temperature <= 0
    options = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy, pad_token_id=pad_id,
                   eos_token_id=sorted(stops) or None, use_cache=True)
    if not greedy:
        # top_k=0 turns off transformers' default top-k of 50 so sampling is plain temperature/top-p.
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    batches = plan_batches([len(ids) for ids in prompt_ids], batch_size)
    with eval_mode(model):
        for number, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
            ids, mask = pad_batch([prompt_ids[i] for i in batch], pad_id, device, side="left")
            torch.manual_seed(sampling.seed + number)
            out = model.generate(input_ids=ids, attention_mask=mask, **options)
            for row, index in enumerate(batch):
                tokens = out[row, ids.shape[1]:].tolist()
                cut = next((k for k, tok in enumerate(tokens) if tok in stops), len(tokens))
                results[index] = tokens[:cut]
    return results  # type: ignore[return-value]


class GenerationCache:
    """Generated responses on disk (SQLite), keyed by model, sampling settings and prompt tokens.

    Screening a dataset twice, or resuming an interrupted screen, generates nothing it already
    generated: every batch is stored as soon as it finishes.
    """

    def __init__(self, path):
        """Open (or create) the cache.

        Args:
            path: the SQLite database file; missing parent folders are created.
        """
        import sqlite3
        from pathlib import Path

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, ids TEXT)")
        self._db.commit()

    @staticmethod
    def key(model_id: str, sampling: SamplingConfig, prompt_ids: list[int]) -> str:
        """The cache key of one prompt: a SHA-256 hex digest of the model, settings and tokens.

        Args:
            model_id: identifies the model and its weights.
            sampling: the sampling settings.
            prompt_ids: the prompt's token ids.
        """
        import hashlib
        import json

        blob = json.dumps([model_id, sampling.to_dict(), list(prompt_ids)])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, list[int]]:
        """The stored response ids of those keys the cache holds (keys it lacks are left out).

        Args:
            keys: cache keys from :meth:`key`.
        """
        import json

        found = {}
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start:start + 500]
            rows = self._db.execute(f"SELECT key, ids FROM responses WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            found.update((key, json.loads(ids)) for key, ids in rows)
        return found

    def put_many(self, items: dict[str, list[int]]) -> None:
        """Store responses (replacing any under the same key) and commit.

        Args:
            items: response token ids by cache key.
        """
        import json

        self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                             [(key, json.dumps(ids)) for key, ids in items.items()])
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def cached_generate(model, tokenizer, prompt_ids: list[list[int]], sampling: SamplingConfig, cache: GenerationCache,
                    model_id: str, *, batch_size: int = 32, progress: bool = False,
                    desc: str = "generating") -> tuple[list[list[int]], int]:
    """:func:`generate` for the prompts the cache lacks, each batch stored in the cache as soon as
    it finishes (an interruption loses at most the batch in progress; a rerun generates only
    what is missing). The batches are those :func:`generate` would plan for the missing prompts,
    with the same seeds, so the responses do not depend on this batch-by-batch bookkeeping.

    Args:
        model, tokenizer: the model to generate with.
        prompt_ids: the prompts' token ids.
        sampling: the sampling settings (part of the cache key).
        cache: where responses are looked up and stored.
        model_id: identifies the model and its weights in the cache key.
        batch_size: prompts per generation batch.
        progress: show a progress bar, advanced after every batch.
        desc: the progress bar's label.

    Returns every prompt's response ids (in input order) and how many were generated now.
    """
    from dataclasses import replace

    keys = [GenerationCache.key(model_id, sampling, ids) for ids in prompt_ids]
    found = cache.get_many(sorted(set(keys)))
    missing = sorted({key: i for i, key in reversed(list(enumerate(keys))) if key not in found}.values(),
                     key=lambda i: len(prompt_ids[i]))
    batches = [[missing[j] for j in batch] for batch in plan_batches([len(prompt_ids[i]) for i in missing], batch_size)]
    bar = tqdm(total=len(missing), desc=desc, disable=not progress or not missing, unit="prompt")
    try:
        for number, part in enumerate(batches):
            # One batch per call, seeded as generate() seeds batch `number` of the whole list.
            seeded = replace(sampling, seed=sampling.seed + number)
            out = generate(model, tokenizer, [prompt_ids[i] for i in part], seeded, batch_size=len(part))
            made = {keys[i]: ids for i, ids in zip(part, out)}
            cache.put_many(made)
            found.update(made)
            bar.update(len(part))
    finally:
        bar.close()
    return [found[key] for key in keys], len(missing)


# -- base responses from a server ------------------------------------------------------------------

def get_json(url: str, *, api_key_env: str, timeout: float, max_retries: int, backoff: float,
             sleep=None, error: type[Exception] | None = None):
    """GET ``url`` and return the parsed JSON reply, retrying transient failures as
    :func:`guard.core.endpoint.post_json` does (429, 5xx, timeouts, dropped connections, with its
    backoff); any other HTTP error raises ``error`` at once, with the status in the message.

    Args:
        url: what to get.
        api_key_env: the environment variable holding the bearer key (unset: no key sent).
        timeout: seconds per attempt.
        max_retries: retries of transient failures.
        backoff: the first retry delay in seconds.
        sleep: how to wait between attempts (default ``time.sleep``).
        error: the :class:`~guard.errors.PersonaGuardError` subclass raised.
    """
    import http.client
    import json
    import time
    import urllib.error
    import urllib.request

    from ..errors import PersonaGuardError
    from .endpoint import RETRY_STATUSES, auth_headers, retry_delay, snippet

    error = error or PersonaGuardError
    sleep = sleep or time.sleep
    last = "no attempt made"
    for attempt in range(max_retries + 1):
        retry_after = None
        request = urllib.request.Request(url, headers=auth_headers(api_key_env), method="GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode("utf-8", errors="replace")
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise error(f"{url} answered with something that is not JSON: {snippet(text)}") from None
        except urllib.error.HTTPError as e:
            body = snippet(e.read() or b"")
            if e.code not in RETRY_STATUSES:
                hint = f" (check the API key in ${api_key_env})" if e.code in (401, 403) else ""
                failure = error(f"{url} answered HTTP {e.code}{hint}: {body}")
                failure.status = e.code
                raise failure from e
            last = f"HTTP {e.code}: {body}"
            retry_after = e.headers.get("Retry-After") if e.headers else None
        except TimeoutError:
            last = f"timeout: no reply within {timeout} s"
        except urllib.error.URLError as e:
            last = f"timeout: no reply within {timeout} s" if isinstance(e.reason, TimeoutError) else \
                f"connection error: {e.reason}"
        except (ConnectionError, http.client.HTTPException) as e:
            last = f"connection error: {e!r}"
        if attempt < max_retries:
            sleep(retry_delay(attempt, retry_after, backoff))
    raise error(f"{url}: gave up after {max_retries + 1} attempts; last error: {last}")


class RemoteGenerator:
    """Base responses from an OpenAI-compatible completions server (vLLM, TGI, llama.cpp, ...)
    serving the same model, in place of in-process generation; a drop-in for
    :func:`cached_generate` (the screener calls it the same way).

    Each prompt is sent as the chat-templated prompt text (its token ids decoded, special tokens
    kept) to ``{base_url}/completions``, ``batch_size`` prompts per request and ``concurrency``
    requests in flight, greedy (``temperature`` 0) with ``max_tokens`` from the sampling settings.
    The reply text is tokenised locally (capped at ``max_new_tokens`` tokens), so what is scored
    is what a dataset response would be. Responses go into the same :class:`GenerationCache`, keyed
    by the local model, the served model's name, the settings and the prompt, each request's
    responses stored as soon as it returns; a rerun asks only for what is missing.

    The server's model is checked once before the first request (:meth:`check`): ``GET
    {base_url}/models`` must list ``model``; a server without that route must name ``model`` in
    its replies, when it names one.

    Args:
        base_url: the server's base URL with scheme, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model's name (``--base-model``).
        api_key_env: environment variable holding the API key, read at call time (unset: none sent).
        timeout: seconds per request.
        max_retries: retries of transient failures (429, 5xx, timeouts, dropped connections).
        backoff: the first retry delay in seconds, doubling each time.
        concurrency: requests in flight at once.
        sleep: how to wait between retries (injectable for tests).
        error: the :class:`~guard.errors.PersonaGuardError` subclass raised on failure.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 300.0,
                 max_retries: int = 4, backoff: float = 1.0, concurrency: int = 4, sleep=None,
                 error: type[Exception] | None = None):
        import time
        import urllib.parse

        from ..errors import PersonaGuardError

        self.error = error or PersonaGuardError
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise self.error(f"base-response server URL {base_url!r} needs a scheme, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise self.error("a base-response server needs the name of the model it serves (--base-model)")
        if concurrency < 1:
            raise self.error(f"concurrency must be at least 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.concurrency = concurrency
        self.sleep = sleep or time.sleep
        self._checked = False
        self._check_replies = False  # the server has no /models: check the model named in replies instead

    @property
    def identity(self) -> str:
        """What distinguishes its responses from in-process ones (in cache keys and checkpoints)."""
        return f"served:{self.model}"

    def check(self) -> None:
        """Refuse a server that does not serve :attr:`model` (once; later calls return at once)."""
        if self._checked:
            return
        url = f"{self.base_url}/models"
        try:
            listing = get_json(url, api_key_env=self.api_key_env, timeout=min(self.timeout, 30.0),
                               max_retries=self.max_retries, backoff=self.backoff, sleep=self.sleep, error=self.error)
        except self.error as failure:
            if getattr(failure, "status", None) not in (404, 405, 501):
                raise
            self._check_replies, self._checked = True, True
            return
        served = [entry.get("id") for entry in listing.get("data", []) if isinstance(entry, dict)] \
            if isinstance(listing, dict) else None
        if served is None or not all(isinstance(name, str) for name in served):
            raise self.error(f"{url} did not answer with a model list ({{\"data\": [{{\"id\": ...}}]}})")
        if self.model not in served:
            raise self.error(f"the server at {self.base_url} serves {', '.join(served) or 'no model'}, not "
                             f"--base-model {self.model}; give the name it serves the same model under")
        self._checked = True

    def complete(self, prompts: list[str], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> list[str]:
        """One ``/completions`` request for ``prompts``; their completion texts, in order.

        Args:
            prompts: the prompt texts.
            max_tokens: the length cap.
            temperature: 0 for greedy.
            top_p: nucleus mass (sent only when sampling).
            seed: the sampling seed (sent only when sampling).
        """
        import json

        from .endpoint import post_json, snippet

        self.check()
        body = {"model": self.model, "prompt": prompts, "max_tokens": max_tokens, "temperature": temperature, "n": 1}
        if temperature > 0:
            body.update(top_p=top_p, seed=seed)
        url = f"{self.base_url}/completions"
        text = post_json(url, body, api_key_env=self.api_key_env, timeout=self.timeout, max_retries=self.max_retries,
                         backoff=self.backoff, sleep=self.sleep, error=self.error)
        try:
            reply = json.loads(text)
            choices = reply["choices"]
            by_index = {int(choice.get("index", n)): choice["text"] for n, choice in enumerate(choices)}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise self.error(f"{url}: not a completions reply (expected choices with text): {snippet(text)}") from None
        if self._check_replies and isinstance(reply.get("model"), str) and reply["model"] != self.model:
            raise self.error(f"the server at {self.base_url} answered as model {reply['model']}, not --base-model "
                             f"{self.model}; give the name it serves the same model under")
        if sorted(by_index) != list(range(len(prompts))) or not all(isinstance(t, str) for t in by_index.values()):
            raise self.error(f"{url}: asked for {len(prompts)} completions, the reply has choices "
                             f"{sorted(by_index)}: {snippet(text)}")
        return [by_index[n] for n in range(len(prompts))]

    def __call__(self, model, tokenizer, prompt_ids: list[list[int]], sampling: SamplingConfig, cache: GenerationCache,
                 model_id: str, *, batch_size: int = 32, progress: bool = False,
                 desc: str = "generating") -> tuple[list[list[int]], int]:
        """:func:`cached_generate`, answered by the server: every prompt's response ids (in input
        order) and how many were generated now.

        Args:
            model: unused (the server generates); kept so the call matches :func:`cached_generate`.
            tokenizer: decodes the prompts and tokenises the replies.
            prompt_ids: the prompts' token ids.
            sampling: the settings (``max_new_tokens``, ``temperature``; part of the cache key).
            cache: where responses are looked up and stored.
            model_id: identifies the local model in the cache key.
            batch_size: prompts per request.
            progress: show a progress bar.
            desc: the progress bar's label.
        """
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        owner = f"{model_id}|{self.identity}"
        keys = [GenerationCache.key(owner, sampling, ids) for ids in prompt_ids]
        found = cache.get_many(sorted(set(keys)))
        missing = sorted({key: i for i, key in reversed(list(enumerate(keys))) if key not in found}.values())
        if missing:
            self.check()
        batches = [missing[start:start + batch_size] for start in range(0, len(missing), max(1, batch_size))]
        texts = {i: tokenizer.decode(prompt_ids[i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                 for i in missing}

        def ask(part: list[int]) -> list[str]:
            return self.complete([texts[i] for i in part], sampling.max_new_tokens, sampling.temperature,
                                 sampling.top_p, sampling.seed)

        bar = tqdm(total=len(missing), desc=desc, disable=not progress or not missing, unit="prompt")
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            queue, running = list(reversed(batches)), {}
            while queue or running:
                while queue and len(running) < self.concurrency:
                    part = queue.pop()
                    running[pool.submit(ask, part)] = part
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    part = running.pop(future)
                    # Tokenised and stored here, in the calling thread: tokenizers and SQLite
                    # connections are not shared across threads.
                    encoded = tokenizer(future.result(), add_special_tokens=False)["input_ids"]
                    made = {keys[i]: list(ids[:sampling.max_new_tokens]) for i, ids in zip(part, encoded)}
                    cache.put_many(made)
                    found.update(made)
                    bar.update(len(part))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()
        return [found[key] for key in keys], len(missing)
