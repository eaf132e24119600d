"""Batched residual activations of token sequences at every requested layer.

Sequences are right-padded (real tokens keep the positions they have when run alone) and
sorted by length so batches pad little; results come back in input order.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .generation import encode, pad_batch
from .layers import StopForward, capture, resolve_layers, stop_after
from .models import eval_mode


@torch.inference_mode()
def sequence_activations(
    model,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]] | None = None,
    *,
    layers: Iterable[int] | int | None = None,
    position: str = "response_mean",
    batch_size: int = 16,
    layer_path: str | None = None,
    progress: bool = False,
    desc: str = "activations",
) -> torch.Tensor:
    """Activations of ``prompt + response`` reduced by ``position``: ``(n, n_layers, hidden)`` float32.

    Without responses only the prompts are run (use ``position="last"`` for the last prompt
    token). ``position`` is one of :data:`guard.core.layers.READ_POSITIONS` except ``"all"``.
    """
    if position == "all":
        raise ValueError("sequence_activations reduces positions; use guard.core.layers.capture for 'all'")
    layer_ids = resolve_layers(model, layers, layer_path)
    device = next(model.parameters()).device
    n = len(prompt_ids)
    if response_ids is not None and len(response_ids) != n:
        raise ValueError(f"{n} prompts but {len(response_ids)} responses")
    full = [list(p) + (list(response_ids[i]) if response_ids is not None else []) for i, p in enumerate(prompt_ids)]
    order = sorted(range(n), key=lambda i: len(full[i]))
    out = None
    with eval_mode(model):
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = order[start:start + batch_size]
            # Pads are masked out of attention and of every reduction, so their id does not matter.
            ids, attn = pad_batch([full[i] for i in batch], 0, device, side="right")
            resp = None
            if response_ids is not None:
                resp = torch.zeros_like(attn)
                for row, i in enumerate(batch):
                    resp[row, len(prompt_ids[i]):len(full[i])] = 1
            with capture(model, layer_ids, position=position, attention_mask=attn, response_mask=resp,
                         layer_path=layer_path) as acts, stop_after(model, max(layer_ids), layer_path):
                try:
                    model(input_ids=ids, attention_mask=attn, use_cache=False)
                except StopForward:
                    pass
            stacked = torch.stack([acts[layer] for layer in layer_ids], dim=1).cpu()
            if out is None:
                out = torch.empty((n, *stacked.shape[1:]), dtype=stacked.dtype)
            out[torch.tensor(batch)] = stacked
    if out is None:
        raise ValueError("no sequences given")
    return out


def prompt_activations(model, tokenizer, prompts: Sequence[str], **kwargs) -> torch.Tensor:
    """Last-prompt-token activations of templated prompt texts: ``(n, n_layers, hidden)``.

    This is the pre-generation monitoring statistic: the state right before the reply starts.
    """
    return sequence_activations(model, encode(tokenizer, list(prompts)), position="last", **kwargs)
