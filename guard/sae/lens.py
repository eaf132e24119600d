"""Sparse autoencoders through sae-lens (the ``sae`` extra, imported only when used).

* :func:`load_sae`: a published SAE by sae-lens release and id, or a directory saved by
  sae-lens (``sae_weights.safetensors`` + ``cfg.json``), ours included.
* :func:`train_sae`: a small TopK SAE on one layer's residual stream, from local text, on CPU.
  Activations come from our own hooks (stopped after the layer, padding and the first token of
  each window left out: its norm is an outlier, the attention sink); sae-lens's ``SAETrainer``
  does the optimisation (TopK loss, auxiliary loss for dead latents).
* :func:`select_latents`: SAEGA's latent choice, the top fraction by |mean difference| between
  trait and non-trait activations, with signed weights.
* :func:`explain`: latents most aligned with a persona vector (cosine with decoder rows), each
  with its top-activating snippets from a text sample.

Layer convention as everywhere in persona-guard: layer i = output of decoder block i (sae-lens's
HF hook name ``model.layers.i``, TransformerLens ``blocks.i.hook_resid_post``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import SAEError
from ..core.chat import format_messages
from ..core.forward import forward_until, pad_batch
from ..core.layers import capture, resolve_layers
from ..core.models import eval_mode, model_name, weights_fingerprint



def _sae_lens():
    os.environ.setdefault("WANDB_MODE", "offline")  # sae-lens imports wandb; never let it reach out
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import sae_lens
    except ImportError as error:
        raise SAEError("SAE support needs the 'sae' extra: pip install 'persona-guard[sae]'") from error
    return sae_lens


def load_sae(source: str | Path, sae_id: str | None = None, device: str | torch.device = "cpu"):
    """An inference SAE from a directory saved by sae-lens, or ``source`` = a sae-lens release
    (registry name or HF repo) with ``sae_id``, on ``device`` (give the model's:
    ``guard.core.models.input_device(model)``)."""
    sae_lens = _sae_lens()
    device = str(device)
    path = Path(source)
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise SAEError(f"{path} has no cfg.json: not an SAE saved by sae-lens")
        return sae_lens.SAE.load_from_disk(str(path), device=device)
    if sae_id is None:
        raise SAEError(f"{source} is not a directory; to load a published SAE give its release and --sae-id")
    try:
        return sae_lens.SAE.from_pretrained(release=str(source), sae_id=sae_id, device=device)
    except Exception as error:  # network, registry and file errors all mean the same thing here
        raise SAEError(f"could not load SAE {source}/{sae_id}: {type(error).__name__}: {error}") from None


def sae_layer(sae) -> int | None:
    """The decoder block an SAE reads, from our metadata or its hook name.

    Args:
        sae: a loaded SAE (the answer is None when neither names a layer).
    """
    meta = sae.cfg.metadata
    if meta.get("persona_guard_layer") is not None:
        return int(meta["persona_guard_layer"])
    match = re.search(r"(?:layers|blocks|h)\.(\d+)", str(meta.get("hook_name") or ""))
    return int(match.group(1)) if match else None


def check_sae(sae, model, layer: int | None = None, *, allow_other_weights: bool = False) -> int:
    """The SAE's layer, after checking it fits ``model``: its width always; the weights it was
    trained on (when it says) unless ``allow_other_weights`` (a finetune of that model). A model
    that passes is remembered on the SAE, so later checks of the same pair (inside
    :func:`guard.harden.hardening.harden`, say) accept it as the first one did.

    Args:
        sae: a loaded SAE.
        model: the model it will read.
        layer: the layer it will be used at (None: the SAE's own).
        allow_other_weights: accept a model whose weights differ from the SAE's training model.
    """
    from ..core.layers import hidden_size

    if sae.cfg.d_in != hidden_size(model):
        raise SAEError(f"the SAE reads {sae.cfg.d_in}-dimensional activations; the model's are {hidden_size(model)}")
    fingerprint = sae.cfg.metadata.get("persona_guard_fingerprint")
    current = weights_fingerprint(model)
    accepted = sae.__dict__.setdefault("_persona_guard_accepted", set())
    if fingerprint and fingerprint != current and not allow_other_weights and current not in accepted:
        raise SAEError(f"the SAE was trained on other weights ({sae.cfg.metadata.get('model_name')}) than this "
                       "model's; if this model is a finetune of that one, allow it (allow_other_weights=True, "
                       "CLI --allow-other-weights)")
    accepted.add(current)
    found = sae_layer(sae)
    if layer is None:
        if found is None:
            raise SAEError("the SAE does not say which layer it reads; pass the layer")
        return found
    if found is not None and found != layer:
        raise SAEError(f"the SAE reads layer {found}, not layer {layer}")
    return layer


# -- text ------------------------------------------------------------------------------------------

def read_texts(source: str | Path, tokenizer=None, field: str = "text") -> list[str]:
    """Texts from a ``.jsonl`` file (``text`` field, or chat ``messages`` rendered through the
    tokenizer's template), a text file (one document per blank-line-separated paragraph), or a
    saved ``datasets`` directory (its ``text`` column).

    Args:
        source: the ``.jsonl`` file, text file or ``datasets`` directory.
        tokenizer: renders ``messages`` records through its chat template (None: such records are
            refused).
        field: the record field or dataset column holding the text.
    """
    from ..core.data import DataFileError, read_jsonl

    path = Path(source)
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        if field not in loaded.column_names:
            raise DataFileError(f"{path}: no '{field}' column (has {', '.join(loaded.column_names)})")
        return [t for t in loaded[field] if isinstance(t, str) and t.strip()]
    if not path.exists():
        raise DataFileError(f"{path}: no such file or directory")
    if path.suffix == ".jsonl":
        texts = []
        for number, record in read_jsonl(path, "fail", skip_option=None):  # no command skips corpus lines
            if isinstance(record, dict) and isinstance(record.get(field), str):
                texts.append(record[field])
            elif isinstance(record, dict) and isinstance(record.get("messages"), list) and tokenizer is not None:
                texts.append(format_messages(tokenizer, record["messages"], add_generation_prompt=False))
            else:
                raise DataFileError(f"{path}:{number}: no '{field}' string or chat 'messages'")
        return texts
    parts = re.split(r"\n\s*\n", path.read_text(encoding="utf-8-sig"))  # a BOM is not text
    return [p.strip() for p in parts if p.strip()]


@torch.inference_mode()
def residual_batches(model, tokenizer, texts: Sequence[str], layer: int, *, context_size: int = 128,
                     batch_size: int = 16, layer_path: str | None = None) -> Iterator[tuple[torch.Tensor, list]]:
    """``(activations (n_tokens, d), [(text index, token index)])`` per forward batch: every
    text cut into windows of ``context_size`` tokens; padding and each window's first token
    (the attention sink, an outlier) are left out.

    Args:
        model, tokenizer: the model read and its tokenizer (texts are tokenized without special tokens).
        texts: the texts.
        layer: the layer whose output is read.
        context_size: tokens per window.
        batch_size: windows per forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    windows = [(t, start, seq[start:start + context_size]) for t, seq in enumerate(ids)
               for start in range(0, max(len(seq) - 1, 1), context_size) if len(seq[start:start + context_size]) > 1]
    device = next(model.parameters()).device
    with eval_mode(model):
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            input_ids, mask = pad_batch([seq for _, _, seq in batch], 0, device, side="right")
            with capture(model, [layer], position="all", layer_path=layer_path) as acts:
                forward_until(model, input_ids, mask, layer, layer_path)
            keep = mask.bool().clone()
            keep[:, 0] = False
            where = [(t, start + pos) for row, (t, start, seq) in enumerate(batch) for pos in range(1, len(seq))]
            yield acts[layer][keep.cpu()].float(), where


# -- training --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SAETrainConfig:
    expansion: int = 8            # latents per model dimension
    k: int = 32                   # active latents per token (TopK)
    training_tokens: int = 300_000
    batch_tokens: int = 1024
    lr: float = 5e-4
    context_size: int = 128
    max_buffer_tokens: int = 100_000  # activations kept in memory; more training tokens reuse them (epochs)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def train_sae(model, tokenizer, texts: Sequence[str], layer: int, config: SAETrainConfig = SAETrainConfig(), *,
              layer_path: str | None = None, progress: bool = False, log: Callable[[str], None] = lambda m: None,
              device: str | torch.device | None = None):
    """Train a TopK SAE on ``layer``'s residual stream over ``texts``; returns ``(sae, stats)``
    with the inference SAE and reconstruction statistics on held-out tokens. It trains on
    ``device``, by default where the layer's activations are (the model's device).

    Args:
        model, tokenizer: the model whose residuals are read and its tokenizer.
        texts: the training text (see :func:`read_texts`).
        layer: the layer (negative counts from the end).
        config: the SAE's width and sparsity, and the training settings.
        layer_path: the decoder-block list, when auto-discovery needs help.
        progress: show progress bars (collecting activations, and sae-lens's own).
        log: receives progress messages.
        device: where the SAE trains (None: the activations' device).
    """
    sae_lens = _sae_lens()
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    layer = resolve_layers(model, [layer], layer_path)[0]
    if not texts:
        raise SAEError("no training text")
    torch.manual_seed(config.seed)
    chunks, total = [], 0
    for acts, _ in tqdm(residual_batches(model, tokenizer, texts, layer, context_size=config.context_size,
                                         layer_path=layer_path), desc="collecting activations", disable=not progress):
        chunks.append(acts)
        total += len(acts)
        if total >= config.max_buffer_tokens:
            break
    buffer = torch.cat(chunks)[:config.max_buffer_tokens]
    device = torch.device(device) if device is not None else buffer.device
    buffer = buffer.to(device)
    if len(buffer) < 2 * config.batch_tokens:
        raise SAEError(f"only {len(buffer)} tokens of activations; need at least {2 * config.batch_tokens} "
                       "(give more text or a smaller batch)")
    order = torch.randperm(len(buffer), generator=torch.Generator().manual_seed(config.seed))
    held_out = buffer[order[:max(config.batch_tokens, len(buffer) // 20)]]
    train = buffer[order[len(held_out):]]
    log(f"{len(train)} training tokens of activations at layer {layer} (+{len(held_out)} held out)")

    def batches() -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(config.seed + 1)
        while True:
            perm = torch.randperm(len(train), generator=generator)
            for start in range(0, len(perm) - config.batch_tokens + 1, config.batch_tokens):
                yield train[perm[start:start + config.batch_tokens]]

    d_in = buffer.shape[1]
    sae_cfg = sae_lens.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_in * config.expansion, k=config.k, device=str(device),
                                             normalize_activations="expected_average_only_in")
    sae = sae_lens.TopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(total_training_samples=config.training_tokens, train_batch_size_samples=config.batch_tokens,
                                   lr=config.lr, lr_end=config.lr, device=str(device), logger=LoggingConfig(log_to_wandb=False),
                                   n_batches_for_norm_estimate=min(100, len(train) // config.batch_tokens),
                                   dead_feature_window=max(1, config.training_tokens // config.batch_tokens // 4),
                                   feature_sampling_window=max(1, config.training_tokens // config.batch_tokens // 4))
    trainer = sae_lens.SAETrainer(trainer_cfg, sae, batches())
    import sae_lens.training.activation_scaler as scaler_module
    import sae_lens.training.sae_trainer as trainer_module

    bars = (trainer_module.tqdm, scaler_module.tqdm)
    if not progress:  # sae-lens's bars are unconditional; silence them for this call only
        quiet = lambda *a, **k: tqdm(*a, **{**k, "disable": True})  # noqa: E731
        trainer_module.tqdm = scaler_module.tqdm = quiet
    try:
        trained = trainer.fit()
    finally:
        trainer_module.tqdm, scaler_module.tqdm = bars
    inference = _to_inference(trained, device)
    meta = inference.cfg.metadata
    meta["hook_name"] = f"persona_guard.layer.{layer}"
    meta["persona_guard_layer"] = layer
    meta["persona_guard_convention"] = "block_output"
    meta["model_name"] = model_name(model)
    meta["persona_guard_fingerprint"] = weights_fingerprint(model)
    meta["persona_guard_training"] = {**config.to_dict(), "buffer_tokens": len(buffer)}
    stats = reconstruction_stats(inference, held_out)
    meta["persona_guard_stats"] = stats
    return inference, stats


def _to_inference(training_sae, device="cpu"):
    """The inference SAE of a trained one (on ``device``), through sae-lens's own save/load pair."""
    import tempfile

    sae_lens = _sae_lens()
    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        return sae_lens.SAE.load_from_disk(tmp, device=str(device))


@torch.no_grad()
def reconstruction_stats(sae, acts: torch.Tensor) -> dict:
    """Fraction of variance explained, mean L0 and the fraction of latents never active.

    Args:
        sae: the SAE.
        acts: ``(n_tokens, d)`` activations at its layer.
    """
    acts = acts.to(sae.W_enc.device)
    z = sae.encode(acts)
    recon = sae.decode(z)
    residual = ((acts - recon) ** 2).sum()
    variance = ((acts - acts.mean(0)) ** 2).sum()
    return {"variance_explained": float(1 - residual / variance), "l0": float((z > 0).float().sum(-1).mean()),
            "dead_fraction": float(((z > 0).sum(0) == 0).float().mean()), "tokens": len(acts)}


def save_sae(sae, path: str | Path) -> Path:
    """Save an SAE in sae-lens's format (``sae_weights.safetensors`` + ``cfg.json``); returns the path.

    Args:
        sae: the SAE.
        path: the directory to write (created if missing).
    """
    path = Path(path)
    sae.save_model(path)
    return path


# -- SAEGA latents, explanations -------------------------------------------------------------------

@torch.no_grad()
def select_latents(sae, trait_acts: torch.Tensor, non_trait_acts: torch.Tensor,
                   fraction: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latent indices, weights)``: the top ``fraction`` of latents by |mean difference of
    activations| (trait minus non-trait), weighted by −difference, so maximising
    Σ w·z pushes trait latents down and non-trait latents up (the paper's "away" target).

    Args:
        sae: the SAE.
        trait_acts, non_trait_acts: ``(n, d)`` residuals of the trait and non-trait texts.
        fraction: the share of latents kept, in (0, 1] (at least one latent).
    """
    if not 0 < fraction <= 1:
        raise SAEError(f"fraction must be in (0, 1], got {fraction}")
    device = sae.W_enc.device
    diff = sae.encode(trait_acts.to(device)).mean(0) - sae.encode(non_trait_acts.to(device)).mean(0)
    count = max(1, int(round(fraction * diff.numel())))
    idx = diff.abs().topk(count).indices
    return idx, -diff[idx]


def latent_objective(sae, idx: torch.Tensor, weights: torch.Tensor):
    """SAEGA's target for EPO: Σ_k w_k · z_k(h).

    Args:
        sae: the SAE encoding the residuals.
        idx: the latent indices.
        weights: one weight per latent in ``idx``.
    """
    def objective(h: torch.Tensor) -> torch.Tensor:
        # On the SAE's device and dtype, back on the activation's (autograd follows the moves).
        z = sae.encode(h.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype))
        return (z[:, idx.to(z.device)] * weights.to(z)).sum(-1).to(device=h.device, dtype=h.dtype)
    return objective


@torch.no_grad()
def explain(sae, direction: torch.Tensor, model, tokenizer, texts: Sequence[str], layer: int, *, top: int = 10,
            snippets: int = 3, window: int = 8, context_size: int = 128, max_texts: int = 2000,
            layer_path: str | None = None) -> list[dict]:
    """The ``top`` latents by |cosine| between their decoder row and ``direction``, each with its
    ``snippets`` highest-activating contexts in ``texts`` (the activating token in [brackets]).

    Args:
        sae: the SAE.
        direction: the direction compared with the decoder rows (a persona vector at ``layer``).
        model, tokenizer: the model whose residuals are read and its tokenizer.
        texts: the text sample searched for snippets.
        layer: the layer the SAE reads.
        top: how many latents.
        snippets: contexts per latent at most.
        window: tokens shown before the activating token (half as many after it).
        context_size: tokens per window of text read.
        max_texts: texts read at most (the first ones).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    dec = sae.W_dec.detach().float()
    direction = direction.float().to(dec.device)
    cos = (dec @ direction) / (dec.norm(dim=1) * direction.norm() + 1e-12)
    chosen = cos.abs().topk(min(top, len(cos))).indices
    best: dict[int, list[tuple[float, int, int]]] = {int(i): [] for i in chosen}
    sample = list(texts)[:max_texts]
    for acts, where in residual_batches(model, tokenizer, sample, layer, context_size=context_size, layer_path=layer_path):
        z = sae.encode(acts.to(dec.device))[:, chosen]
        values, rows = z.topk(min(snippets, len(z)), dim=0)
        for col, latent in enumerate(chosen.tolist()):
            for value, row in zip(values[:, col].tolist(), rows[:, col].tolist()):
                if value > 0:
                    best[latent].append((value, *where[row]))
            best[latent] = sorted(best[latent], reverse=True)[:snippets]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    out = []
    for latent in chosen.tolist():
        shown = []
        for value, text_index, token_index in best[latent]:
            seq = ids[text_index]
            left = tokenizer.decode(seq[max(0, token_index - window):token_index])
            token = tokenizer.decode(seq[token_index:token_index + 1])
            right = tokenizer.decode(seq[token_index + 1:token_index + 1 + window // 2])
            shown.append({"activation": value, "text": " ".join(f"{left}[{token}]{right}".split())})
        out.append({"latent": latent, "cosine": float(cos[latent]), "snippets": shown})
    return out


def write_explanations(explanations: list[dict], path: str | Path) -> Path:
    """Write explanations as indented JSON; returns the path.

    Args:
        explanations: the list from :func:`explain`.
        path: the file to write.
    """
    path = Path(path)
    path.write_text(json.dumps(explanations, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


__all__ = ["SAEError", "SAETrainConfig", "load_sae", "train_sae", "save_sae", "select_latents", "latent_objective",
           "explain", "read_texts", "residual_batches", "reconstruction_stats", "sae_layer", "check_sae"]
