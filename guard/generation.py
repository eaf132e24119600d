"""Batched generation: length-sorted batches, left padding, KV cache, reproducible sampling."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

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


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of already-templated texts (the chat template carries its own special tokens)."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids


def pad_batch(sequences: list[list[int]], pad_id: int, device, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded to one width: left for generation
    (every row ends where its continuation starts), right for plain forwards (real tokens keep
    the positions they have when run alone)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
    return ids.to(device), mask.to(device)


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
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[int] | None] = [None] * len(prompt_ids)
    greedy = sampling.temperature <= 0
    options = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy, pad_token_id=pad_id,
                   eos_token_id=sorted(stops) or None, use_cache=True)
    if not greedy:
        # top_k=0 turns off transformers' default top-k of 50 so sampling is plain temperature/top-p.
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
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
