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
