"""Decoder-block discovery and residual-stream hooks: the one place every feature touches layers.

Layer convention (stored in every vector file as ``LAYER_CONVENTION``): **layer i is the output of
decoder block i**, counting from 0. For i < n_layers - 1 that equals ``hidden_states[i + 1]`` from
``output_hidden_states=True``; transformers applies the final norm to the last entry of
``hidden_states``, so for the last block we (deliberately) keep the raw block output.

Hooks are ``register_forward_hook`` on the existing block modules (never wrappers, so state-dict
keys and checkpoints stay untouched), always removed when their context exits, on exceptions too.
Steering hooks are built on :func:`forward_hooks` in :mod:`guard.core.steering`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import LayerError

LAYER_CONVENTION = "block_output"  # layer i = output of decoder block i = hidden_states[i + 1]

# Known homes of the decoder-block list, tried before the structural search.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1/2/3 text, Phi-3, OLMo
    "model.language_model.layers",  # multimodal wrappers (Gemma 3 ForConditionalGeneration, ...)
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)

READ_POSITIONS = ("all", "last", "last_prompt", "prompt_mean", "response_mean")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP-style ``.module`` wrappers and PEFT's ``PeftModel`` to the causal LM.

    Args:
        model: the model, wrapped or not (returned as is when it is not).
    """
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            model = model.module
        else:
            return model


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module, layer_path: str | None = None) -> nn.ModuleList:
    """Return the ``ModuleList`` of decoder blocks.

    ``layer_path`` overrides discovery with a dotted attribute path from the unwrapped model
    (e.g. ``"model.layers"``). Otherwise known paths are tried, then a structural search for the
    largest ``ModuleList`` of identical blocks whose length equals ``config.num_hidden_layers``.
    """
    core = unwrap_model(model)
    if layer_path:
        found = _get_path(core, layer_path)
        if not isinstance(found, nn.ModuleList):
            raise LayerError(f"layer path {layer_path!r} does not name a ModuleList on {type(core).__name__}")
        return found
    for path in KNOWN_BLOCK_PATHS:
        found = _get_path(core, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    expected = num_hidden_layers(core, default=None)
    candidates = [
        m for _, m in core.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
        and (expected is None or len(m) == expected)
    ]
    if not candidates:
        raise LayerError(
            f"Could not find the decoder blocks of {type(core).__name__}. Pass layer_path= "
            "(CLI: --layer-path) with the dotted path of the block ModuleList, e.g. 'model.layers'.")
    return max(candidates, key=len)


def _text_config(model: nn.Module):
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "text_config", None) or config


def num_hidden_layers(model: nn.Module, default=...) -> int | None:
    """The number of decoder blocks, from the (text) config's ``num_hidden_layers``, ``n_layer`` or ``num_layers``.

    Args:
        model: the model (wrappers are looked through).
        default: returned when the config names no layer count; left out, the discovered decoder
            blocks are counted instead.
    """
    config = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    if default is ...:
        return len(find_decoder_layers(model))
    return default


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width, from the (text) config, else from the input embeddings.

    Args:
        model: the model (wrappers are looked through).
    """
    config = _text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return unwrap_model(model).get_input_embeddings().weight.shape[1]


def resolve_layers(model: nn.Module, layers: Iterable[int] | int | None, layer_path: str | None = None) -> list[int]:
    """Normalise a layer selection (None = all, negative indices count from the end).

    Args:
        model: the model whose decoder blocks are counted.
        layers: one layer, several, or None for all; out-of-range ones raise :class:`LayerError`.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    n = len(find_decoder_layers(model, layer_path))
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise LayerError(f"layer {layer} is out of range: the model has {n} decoder blocks (0..{n - 1})")
        out.append(idx)
    return out


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden: torch.Tensor):
    """Put ``hidden`` back in the same shape the block returned (tensor or tuple)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[int, Callable], layer_path: str | None = None) -> Iterator[None]:
    """Register ``hooks[layer](module, args, output)`` on decoder blocks; always removed on exit.

    Args:
        model: the model.
        hooks: a forward hook per layer (negative keys count from the end; two keys naming one
            block raise :class:`LayerError`).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    blocks = find_decoder_layers(model, layer_path)
    keys = list(hooks)
    indices = resolve_layers(model, keys, layer_path)  # negative keys count from the end
    if len(set(indices)) != len(indices):
        raise LayerError(f"layers {keys} name the same block twice")
    handles = []
    try:
        for key, index in zip(keys, indices):
            handles.append(blocks[index].register_forward_hook(hooks[key]))
        yield
    finally:
        for handle in handles:
            handle.remove()


def reduce_positions(
    hidden: torch.Tensor,
    position: str,
    attention_mask: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce ``(batch, seq, d)`` activations over positions.

    ``all``: unchanged. ``last``: the last attended token. ``last_prompt``: the token right before
    the first response token (without a response mask: the last attended token, i.e. the
    position that predicts the first response token). ``prompt_mean`` / ``response_mean``: mean
    over attended prompt / response tokens. Works with left or right padding.

    Args:
        hidden: ``(batch, seq, d)`` activations.
        position: one of :data:`READ_POSITIONS`.
        attention_mask: ``(batch, seq)``, 1 on real tokens (None: every position is real).
        response_mask: ``(batch, seq)``, 1 on response tokens; needed by ``prompt_mean``,
            ``response_mean`` and (for its exact meaning) ``last_prompt``.
    """
    if position not in READ_POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose from {', '.join(READ_POSITIONS)}")
    if position == "all":
        return hidden
    hidden = hidden.float()  # a mean over hundreds of fp16 positions overflows; bf16 loses the count
    batch, seq, _ = hidden.shape
    attn = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device) if attention_mask is None \
        else attention_mask.to(hidden.device).bool()
    if attn.shape != (batch, seq):
        raise ValueError(
            f"mask shape {tuple(attn.shape)} does not match activations {(batch, seq)}; "
            "capture works on full forward passes, not on cached decoding steps")
    resp = None
    if response_mask is not None:
        resp = response_mask.to(hidden.device).bool() & attn
    rows = torch.arange(batch, device=hidden.device)
    positions = torch.arange(seq, device=hidden.device)
    if position == "last" or (position == "last_prompt" and resp is None):
        index = torch.where(attn, positions, -1).max(dim=1).values
        return hidden[rows, index]
    if resp is None:
        raise ValueError(f"position {position!r} needs a response_mask")
    if position == "last_prompt":
        first = torch.where(resp, positions, seq).min(dim=1).values
        if (first == seq).any() or (first == 0).any():
            raise ValueError("last_prompt needs at least one prompt token and one response token per row")
        return hidden[rows, first - 1]
    select = resp if position == "response_mean" else attn & ~resp
    counts = select.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        raise ValueError(f"{position}: some rows have no {position.split('_')[0]} tokens")
    weights = select.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / counts.to(hidden.dtype)


class Captured(dict):
    """``{layer: activations}`` filled by :func:`capture`; one entry per layer, batches concatenated."""


@contextmanager
def capture(
    model: nn.Module,
    layers: Iterable[int] | int | None = None,
    *,
    position: str = "all",
    attention_mask: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    detach: bool = True,
    dtype: torch.dtype | None = torch.float32,
    layer_path: str | None = None,
) -> Iterator[Captured]:
    """Capture residual activations (decoder block outputs) at ``layers`` during forward passes.

    Activations are reduced inside the hook (so 30 layers of a long batch never sit in memory)
    with :func:`reduce_positions` and the masks given here, which must match the forward's
    ``(batch, seq)``. Several forwards in one context are concatenated on the batch axis.
    ``detach=False`` keeps the graph (for gradient-based prompt search). The yielded dict is
    filled when the context exits.

    Args:
        model: the model.
        layers: the layers to capture (None: all; negative indices count from the end).
        position: how positions are reduced (see :func:`reduce_positions`).
        attention_mask, response_mask: ``(batch, seq)`` masks of the forward, as in :func:`reduce_positions`.
        detach: detach the captured activations from the autograd graph.
        dtype: what the captured activations are cast to (None: keep the model's dtype).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    layer_ids = resolve_layers(model, layers, layer_path)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layer_ids}
    result = Captured()

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = reduce_positions(_hidden(output), position, attention_mask, response_mask)
            if detach:
                hidden = hidden.detach()
            if dtype is not None:
                hidden = hidden.to(dtype)
            parts[layer].append(hidden)
        return hook

    try:
        with forward_hooks(model, {layer: make_hook(layer) for layer in layer_ids}, layer_path):
            yield result
    finally:
        for layer, chunks in parts.items():
            if chunks:
                result[layer] = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)


class StopForward(Exception):
    """Raised by :func:`stop_after` to end a forward pass once the last needed layer has run."""


@contextmanager
def stop_after(model: nn.Module, layer: int, layer_path: str | None = None) -> Iterator[None]:
    """End every forward pass right after decoder block ``layer`` by raising :class:`StopForward`.

    Reading activations never needs the blocks above the deepest requested layer nor the
    LM head (a fifth of a small model's compute), so callers catch the exception and skip them.
    Register it after any capture hooks on the same block so they run first.

    Args:
        model: the model.
        layer: the last decoder block to run (negative indices count from the end).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    def hook(module, args, output):
        raise StopForward

    with forward_hooks(model, {layer: hook}, layer_path):
        yield


def active_hook_count(model: nn.Module, layer_path: str | None = None) -> int:
    """Number of forward hooks on the decoder blocks (for leak checks in tests and callbacks).

    Args:
        model: the model.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    return sum(len(block._forward_hooks) for block in find_decoder_layers(model, layer_path))
