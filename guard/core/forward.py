"""The forward plumbing every feature shares: tokenising chat inputs, planning length-sorted
batches under a token budget, padding, running the model only up to the deepest layer needed,
reducing positions, and backing off on out-of-memory.

Plain forwards are right-padded (real tokens keep the positions they have when run alone,
which absolute-position models need); generation pads on the left. Batches are planned from
token lengths alone, so a plan, and every number computed from it, does not depend on where a
run was interrupted; results come back in input order.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

from .chat import format_messages
from .layers import StopForward, capture, resolve_layers, stop_after
from .models import eval_mode

T = TypeVar("T")


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of already-templated texts (the chat template carries its own special tokens).

    Args:
        tokenizer: the tokenizer. texts: the templated texts.
    """
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def encode_chat(tokenizer, conversations: Sequence[Sequence[dict]]) -> list[list[int]]:
    """Token ids of conversations through the chat template, ending where the reply begins.

    Args:
        tokenizer: the tokenizer. conversations: lists of ``{"role", "content"}`` messages.
    """
    return encode(tokenizer, [format_messages(tokenizer, list(messages)) for messages in conversations])


def pad_batch(sequences: list[list[int]], pad_id: int, device, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded to one width: left for generation
    (every row ends where its continuation starts), right for plain forwards (real tokens keep
    the positions they have when run alone).

    Args:
        sequences: token id lists, one per row.
        pad_id: the id written at padded positions (masked out of attention).
        device: where the returned tensors go.
        side: ``"left"`` or ``"right"``, where the padding goes.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def plan_batches(lengths: Sequence[int], max_batch_size: int, token_budget: int | None = None) -> list[list[int]]:
    """Indices grouped into batches: sorted by length (ties by index), each batch at most
    ``max_batch_size`` rows and, with a ``token_budget``, ``rows x longest <= token_budget``.
    Deterministic in the lengths alone.

    Args:
        lengths: token count of each item.
        max_batch_size: rows per batch at most.
        token_budget: padded tokens per batch at most (None: no limit).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, current = [], []
    for i in order:
        full = len(current) >= max_batch_size
        over = token_budget is not None and (len(current) + 1) * lengths[i] > token_budget
        if current and (full or over):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def forward_until(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, deepest: int | None,
                  layer_path: str | None = None):
    """Run ``model`` on a batch, stopped right after decoder block ``deepest`` (reading
    activations never needs the blocks above it nor the LM head); ``deepest=None`` runs the
    whole model and returns its output. Capture hooks registered before the call still run.

    Args:
        model: the model. input_ids, attention_mask: ``(batch, seq)``.
        deepest: the last block to run, or None for a full forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    if deepest is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    with stop_after(model, deepest, layer_path):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return None


def halve_on_oom(run: Callable[[Sequence], T], items: Sequence, join: Callable[[T, T], T]) -> T:
    """``run(items)``; on out-of-memory, run each half (recursively) and ``join`` the results,
    so a caller's bookkeeping (batch numbers, checkpoints) stays that of the planned batch.

    Args:
        run: computes the result for a list of items.
        items: the planned batch.
        join: combines the results of two halves, in order.
    """
    try:
        return run(items)
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        return join(halve_on_oom(run, items[:half], join), halve_on_oom(run, items[half:], join))


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

    Args:
        model: the model.
        prompt_ids: token ids of each prompt.
        response_ids: token ids of each prompt's response, appended to it (None: prompts only).
        layers: the layers to read (None: all; negative indices count from the end).
        position: how positions are reduced (see :func:`guard.core.layers.reduce_positions`).
        batch_size: sequences per forward at most.
        layer_path: the decoder-block list, when auto-discovery needs help.
        progress, desc: show a progress bar, and its label.
    """
    if position == "all":
        raise ValueError("sequence_activations reduces positions; use guard.core.layers.capture for 'all'")
    layer_ids = resolve_layers(model, layers, layer_path)
    device = next(model.parameters()).device
    n = len(prompt_ids)
    if response_ids is not None and len(response_ids) != n:
        raise ValueError(f"{n} prompts but {len(response_ids)} responses")
    full = [list(p) + (list(response_ids[i]) if response_ids is not None else []) for i, p in enumerate(prompt_ids)]
    out = None
    with eval_mode(model):
        for batch in tqdm(plan_batches([len(s) for s in full], batch_size), desc=desc, disable=not progress,
                          unit="batch"):
            # Pads are masked out of attention and of every reduction, so their id does not matter.
            ids, attn = pad_batch([full[i] for i in batch], 0, device, side="right")
            resp = None
            if response_ids is not None:
                resp = torch.zeros_like(attn)
                for row, i in enumerate(batch):
                    resp[row, len(prompt_ids[i]):len(full[i])] = 1
            with capture(model, layer_ids, position=position, attention_mask=attn, response_mask=resp,
                         layer_path=layer_path) as acts:
                forward_until(model, ids, attn, max(layer_ids), layer_path)
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

    Args:
        model, tokenizer: the model and its tokenizer.
        prompts: chat-templated prompt texts, ending where the reply begins.
        kwargs: passed on to :func:`sequence_activations` (``layers``, ``batch_size``, ``layer_path``,
            ``progress``, ``desc``; ``position`` is always ``"last"``).
    """
    return sequence_activations(model, encode(tokenizer, list(prompts)), position="last", **kwargs)
