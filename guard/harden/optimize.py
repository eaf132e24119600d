"""Evolutionary Prompt Optimisation (EPO, Thompson et al. 2024): discrete prompt search that
maximises an internal feature while keeping the prompt fluent ("fluent gradient ascent").

A population of ``population`` prompts, each with its own fluency weight λ (log-spaced), evolves
for ``iterations`` steps. Each step: token gradients of ``−target + λ·xent`` through a one-hot
relaxation of each member's tokens; ``children_per_member`` children per member, each swapping
one token for one drawn from the top-k of its gradient; exact batched evaluation of every child;
per-slot selection of the best ``−target + λ·xent`` among parents and children; every
``restart_every`` steps the population restarts from the best candidate under a randomised
fluency weight. Everything evaluated feeds a Pareto frontier of target against fluency.

Fixes over the reference implementation (see the method notes): the fluency term scores each
prompt token with the distribution that predicts it (including the first, from the fixed
prefix); the gradient pass embeds exactly as the evaluation pass (scaled embeddings, as in
Gemma 3, included); the restart multiplier is used; attention masks are always passed; tokens
are filtered (no special tokens, optionally printable ASCII, stable under re-tokenisation).
The fixed prefix runs once per context and its KV cache is reused by every forward.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import OptimizeError
from ..core.forward import halve_on_oom
from ..core.layers import capture, resolve_layers, unwrap_model
from ..core.models import eval_mode

PRESETS = {  # fluency weights λ (min, max) and the restart weight, as in the RESGA/SAEGA configs
    "strict": dict(penalty_min=2.0, penalty_max=12.0, restart_xentropy=3.0, restart_xentropy_max_mult=1.5),
    "medium": dict(penalty_min=0.5, penalty_max=4.0, restart_xentropy=1.5, restart_xentropy_max_mult=2.0),
    "loose": dict(penalty_min=0.05, penalty_max=0.5, restart_xentropy=0.5, restart_xentropy_max_mult=2.0),
}



@dataclass(frozen=True)
class EPOConfig:
    prompt_length: int = 8
    population: int = 16
    children_per_member: int = 32
    iterations: int = 300
    topk: int = 512
    restart_every: int = 50
    penalty_min: float = 0.5
    penalty_max: float = 4.0
    restart_xentropy: float = 1.5
    restart_xentropy_max_mult: float = 2.0
    ascii_only: bool = True
    chunk_size: int = 128  # candidates per evaluation forward; halved on out-of-memory
    seed: int = 0

    @classmethod
    def preset(cls, fluency: str = "medium", **overrides) -> "EPOConfig":
        """A config with a preset's fluency weights.

        Args:
            fluency: ``"strict"``, ``"medium"`` or ``"loose"`` (see ``PRESETS``).
            overrides: other config fields, which also win over the preset's.
        """
        if fluency not in PRESETS:
            raise OptimizeError(f"unknown fluency preset {fluency!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[fluency], **overrides})

    def penalties(self) -> torch.Tensor:
        if self.population == 1:
            return torch.tensor([self.penalty_min])
        return torch.exp(torch.linspace(math.log(self.penalty_min), math.log(self.penalty_max), self.population))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PromptSlot:
    """Where the optimised tokens sit: ``prefix + prompt + suffix`` for each context.

    ``read_at="end"`` reads the feature at the last token of the whole input (for a system
    prompt: the state right before the reply, what the monitor reads); ``"prompt"`` at the
    prompt's own last token (the paper's setting).
    """

    prefixes: tuple[tuple[int, ...], ...]
    suffixes: tuple[tuple[int, ...], ...]
    read_at: str = "end"

    def __post_init__(self):
        if len(self.prefixes) != len(self.suffixes) or not self.prefixes:
            raise OptimizeError("a prompt slot needs one prefix and one suffix per context (at least one context)")
        if self.read_at not in ("end", "prompt"):
            raise OptimizeError(f"read_at must be 'end' or 'prompt', got {self.read_at!r}")

    @property
    def contexts(self) -> int:
        return len(self.prefixes)

    @classmethod
    def bare(cls) -> "PromptSlot":
        """The prompt alone: no template, no context (the paper's sycophancy runner)."""
        return cls(((),), ((),), read_at="prompt")


@dataclass
class Candidate:
    ids: tuple[int, ...]
    target: float
    xent: float
    text: str = ""

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": list(self.ids), "target": self.target, "xent": self.xent}


@dataclass
class EPOResult:
    frontier: list[Candidate]  # non-dominated, by increasing xent (and so increasing target)
    population: list[Candidate]
    evaluated: int
    iterations: int
    seconds: float
    config: EPOConfig
    history: list[dict] = field(default_factory=list)  # per iteration: best target, its xent

    def best(self, max_xent: float | None = None) -> Candidate:
        """Highest target on the frontier, optionally among prompts with xent <= max_xent."""
        pool = [c for c in self.frontier if max_xent is None or c.xent <= max_xent] or self.frontier[:1]
        return max(pool, key=lambda c: c.target)


def pareto_frontier(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both counts (higher target, lower xent), by increasing xent.

    Args:
        candidates: the evaluated candidates.
    """
    ordered = sorted(candidates, key=lambda c: (c.xent, -c.target))
    frontier, best = [], -math.inf
    for cand in ordered:
        if cand.target > best:
            frontier.append(cand)
            best = cand.target
    return frontier


def allowed_tokens(tokenizer, vocab_rows: int, ascii_only: bool = True) -> torch.Tensor:
    """Boolean mask over embedding rows: real vocabulary, no special or added tokens, and (by
    default) only tokens that decode to printable ASCII with at least one visible character.

    Args:
        tokenizer: the tokenizer decoding each token.
        vocab_rows: the input embedding's row count (rows past the tokenizer's vocabulary stay masked).
        ascii_only: also require printable ASCII with a visible character.
    """
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token_id in range(min(vocab_rows, len(tokenizer))):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if not text or "\ufffd" in text:
            continue
        if ascii_only and not (text.isascii() and text.isprintable() and text.strip()):
            continue
        mask[token_id] = True
    if not mask.any():
        raise OptimizeError("no token passes the filters")
    return mask


def retokenizes(tokenizer, ids: Sequence[int]) -> bool:
    """True when the decoded text encodes back to the same ids (so the prompt we report is the
    prompt we measured).

    Args:
        tokenizer: the tokenizer.
        ids: the prompt's token ids.
    """
    return tokenizer(tokenizer.decode(list(ids)), add_special_tokens=False)["input_ids"] == list(ids)


class _Forward:
    """Batched forwards of ``prefix + prompt + suffix`` with a cached prefix per context,
    returning (hidden at the read position, log-probs of each prompt token)."""

    def __init__(self, model, slot: PromptSlot, layer: int, layer_path: str | None = None):
        self.model, self.slot, self.layer, self.layer_path = model, slot, layer, layer_path
        core = unwrap_model(model)
        self.base = getattr(core, core.base_model_prefix)
        self.head = core.get_output_embeddings()
        self.embedding = core.get_input_embeddings()
        config = getattr(core.config, "text_config", None) or core.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # Gemma 3 scales inside the embedding module; one-hot @ W must be scaled the same way.
        scale = getattr(self.embedding, "embed_scale", None)
        self.embed_scale = None if scale is None else torch.as_tensor(scale)
        self.device = next(model.parameters()).device
        self.prefix_cache, self.prefix_first_logp = [], []
        with torch.no_grad():
            for prefix in slot.prefixes:
                if not prefix:
                    self.prefix_cache.append(None)
                    self.prefix_first_logp.append(None)
                    continue
                ids = torch.tensor([prefix], device=self.device)
                out = self.base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
                self.prefix_cache.append(out.past_key_values)
                self.prefix_first_logp.append(torch.log_softmax(self._logits(out.last_hidden_state[0, -1:]), -1)[0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def embed(self, one_hot: torch.Tensor) -> torch.Tensor:
        embeds = one_hot.to(self.embedding.weight.dtype) @ self.embedding.weight
        if self.embed_scale is not None:
            embeds = embeds * self.embed_scale.to(embeds.dtype)
        return embeds

    def __call__(self, context: int, prompt_embeds: torch.Tensor, prompt_ids: torch.Tensor,
                 grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = prompt_ids.shape
        suffix = torch.tensor(self.slot.suffixes[context], dtype=torch.long, device=self.device)
        pieces = [prompt_embeds]
        if len(suffix):
            pieces.append(self.embedding(suffix).unsqueeze(0).expand(batch, -1, -1).to(prompt_embeds.dtype))
        embeds = torch.cat(pieces, dim=1)
        prefix_len = len(self.slot.prefixes[context])
        cache = None
        if self.prefix_cache[context] is not None:
            cache = copy.deepcopy(self.prefix_cache[context])
            cache.batch_repeat_interleave(batch)
        total = prefix_len + embeds.shape[1]
        mask = torch.ones((batch, total), dtype=torch.long, device=self.device)
        positions = torch.arange(prefix_len, total, device=self.device).expand(batch, -1)
        with capture(self.model, [self.layer], position="all", detach=not grad, dtype=None,
                     layer_path=self.layer_path) as acts, torch.set_grad_enabled(grad):
            out = self.base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=cache is not None)
        read = embeds.shape[1] - 1 if self.slot.read_at == "end" else length - 1
        hidden = acts[self.layer][:, read]
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        # Token k of the prompt is predicted at position k-1; token 0 by the prefix's last position.
        logp = torch.log_softmax(self._logits(out.last_hidden_state[:, :length - 1]), -1)
        token_logp = logp.gather(-1, prompt_ids[:, 1:, None])[..., 0]
        first = self.prefix_first_logp[context]
        if first is not None:
            token_logp = torch.cat([first[prompt_ids[:, :1]].to(token_logp.dtype), token_logp], dim=1)
        return hidden, token_logp


Objective = Callable[[torch.Tensor], torch.Tensor]  # (batch, hidden) residuals -> (batch,) targets


class EPO:
    """The optimiser. ``objective`` maps residuals at ``layer`` (read per ``slot``) to targets to
    maximise; with several contexts the target and xent are means over them.

    Args:
        model, tokenizer: the model whose residuals are read and its tokenizer.
        objective: ``(batch, hidden)`` residuals to ``(batch,)`` targets.
        layer: the layer read (negative counts from the end).
        slot: where the prompt sits in each context (default: the prompt alone).
        config: the search settings.
        layer_path: the decoder-block list, when auto-discovery needs help.
        validate: which token sequences may be proposed (None: those that survive decode and
            re-encode, :func:`retokenizes`).
    """

    def __init__(self, model, tokenizer, objective: Objective, layer: int, slot: PromptSlot = PromptSlot.bare(),
                 config: EPOConfig = EPOConfig(), layer_path: str | None = None,
                 validate: Callable[[Sequence[int]], bool] | None = None):
        if config.prompt_length < 1 or config.population < 1 or config.children_per_member < 1:
            raise OptimizeError("prompt_length, population and children_per_member must be positive")
        self.model, self.tokenizer, self.objective, self.config = model, tokenizer, objective, config
        self.layer = resolve_layers(model, [layer], layer_path)[0]
        self.slot = slot
        self.layer_path = layer_path
        vocab_rows = unwrap_model(model).get_input_embeddings().weight.shape[0]
        self.allowed = allowed_tokens(tokenizer, vocab_rows, config.ascii_only)
        self.vocab_rows = vocab_rows
        # Which token sequences may be proposed: by default, those that survive decode -> encode.
        self.validate = validate or (lambda ids: retokenizes(tokenizer, ids))

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (target, xent) of each row of ``ids``, in chunks that halve on out-of-memory."""
        with eval_mode(self.model):
            forward = self._forward()
            return self._evaluate(forward, ids)

    def _forward(self) -> _Forward:
        return _Forward(self.model, self.slot, self.layer, self.layer_path)

    def _evaluate(self, forward: _Forward, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets, xents = [], []
        chunk = self.config.chunk_size
        for start in range(0, len(ids), chunk):
            t, x = halve_on_oom(lambda rows: self._score(forward, rows.to(forward.device)), ids[start:start + chunk],
                                lambda a, b: (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])))
            targets.append(t)
            xents.append(x)
        return torch.cat(targets), torch.cat(xents)

    def _score(self, forward: _Forward, ids: torch.Tensor, grad: bool = False, one_hot: torch.Tensor | None = None):
        target = xent = 0.0
        for context in range(self.slot.contexts):
            embeds = forward.embed(one_hot) if one_hot is not None else forward.embedding(ids)
            hidden, token_logp = forward(context, embeds, ids, grad=grad)
            target = target + self.objective(hidden)
            if token_logp.shape[1]:  # a one-token prompt with no prefix has nothing to score
                xent = xent - token_logp.mean(dim=1)
        n = self.slot.contexts
        xent = xent if torch.is_tensor(xent) else torch.zeros_like(target)
        if grad:
            return target / n, xent / n
        return (target / n).detach().float().cpu(), (xent / n).detach().float().cpu()

    def token_gradients(self, ids: torch.Tensor, penalties: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """∂(−target + λ·xent)/∂one-hot for each row, with the row's exact target and xent from
        the same pass.

        Args:
            ids: ``(rows, prompt_length)`` prompt token ids.
            penalties: the fluency weight λ of each row.

        Returns the gradients ``(rows, prompt_length, vocab_rows)``, targets and xents, on the CPU.
        """
        with eval_mode(self.model):
            forward = self._forward()
            one_hot = torch.nn.functional.one_hot(ids.to(forward.device), self.vocab_rows).float().requires_grad_(True)
            target, xent = self._score(forward, ids.to(forward.device), grad=True, one_hot=one_hot)
            loss = (-target + penalties.to(target.device) * xent).sum()
            (grad,) = torch.autograd.grad(loss, [one_hot])
        return grad.detach().cpu(), target.detach().float().cpu(), xent.detach().float().cpu()

    def _gradients_cached(self, population: torch.Tensor, penalties: torch.Tensor, cache: dict) -> torch.Tensor:
        """Gradients for each slot's (prompt, λ); survivors keep theirs, only new pairs are computed
        (each with its own slot's λ, unlike the reference, which gives new members the smallest)."""
        keys = [(tuple(row), float(lam)) for row, lam in zip(population.tolist(), penalties.tolist())]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            grads, _, _ = self.token_gradients(population[missing], penalties[missing])
            for i, g in zip(missing, grads):
                cache[keys[i]] = g
        kept = {key: cache[key] for key in keys}
        cache.clear()
        cache.update(kept)
        return torch.stack([cache[key] for key in keys])

    # -- search ----------------------------------------------------------------------------------
    def _random_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        pool = self.allowed.nonzero()[:, 0]
        rows, tries = [], 0
        while len(rows) < n:
            tries += 1
            if tries > 1000 * n:
                raise OptimizeError("could not draw random prompts that pass the token filters; try a shorter prompt")
            ids = pool[torch.randint(len(pool), (self.config.prompt_length,), generator=generator)]
            if self.validate(ids.tolist()):
                rows.append(ids)
        return torch.stack(rows)

    def _children(self, parents: torch.Tensor, grads: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        scores = (-grads).masked_fill(~self.allowed, -math.inf)
        k = min(cfg.topk, int(self.allowed.sum()))
        top = scores.topk(k, dim=-1).indices  # (population, length, k)
        children = parents.repeat_interleave(cfg.children_per_member, dim=0).clone()
        member = torch.arange(len(parents)).repeat_interleave(cfg.children_per_member)
        position = torch.randint(cfg.prompt_length, (len(children),), generator=generator)
        choice = torch.randint(k, (len(children),), generator=generator)
        children[torch.arange(len(children)), position] = top[member, position, choice]
        keep = [i for i in range(len(children)) if self.validate(children[i].tolist())]
        return children[keep]

    def run(self, initial: Sequence[Sequence[int]] | None = None, progress: bool = False) -> EPOResult:
        """Run the search (see the module docstring).

        Args:
            initial: starting prompts as token ids, each ``prompt_length`` long, repeated to fill the
                population (None: random prompts that pass the token filters).
            progress: show a progress bar over the iterations.
        """
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        penalties = cfg.penalties()
        started = time.perf_counter()
        if initial:
            init = torch.tensor([list(x) for x in initial], dtype=torch.long)
            if init.shape[1] != cfg.prompt_length:
                raise OptimizeError(f"initial prompts have {init.shape[1]} tokens; prompt_length is {cfg.prompt_length}")
            population = init[torch.arange(cfg.population) % len(init)]
        else:
            population = self._random_prompts(cfg.population, generator)
        seen: dict[tuple[int, ...], tuple[float, float]] = {}
        grads, targets, xents = self.token_gradients(population, penalties)
        for row, t, x in zip(population.tolist(), targets.tolist(), xents.tolist()):
            seen[tuple(row)] = (t, x)
        grad_cache = {(tuple(row), float(lam)): g for row, lam, g in zip(population.tolist(), penalties.tolist(), grads)}
        history = []
        bar = tqdm(range(cfg.iterations), desc="optimising prompt", disable=not progress)
        with eval_mode(self.model):
            forward = self._forward()
            for step in bar:
                children = self._children(population, grads, generator)
                fresh = [c for c in dict.fromkeys(map(tuple, children.tolist())) if c not in seen]
                if fresh:
                    t, x = self._evaluate(forward, torch.tensor(fresh, dtype=torch.long))
                    for row, tv, xv in zip(fresh, t.tolist(), x.tolist()):
                        seen[row] = (tv, xv)
                pool = list(dict.fromkeys(list(map(tuple, population.tolist())) + list(map(tuple, children.tolist()))))
                pool_t = torch.tensor([seen[p][0] for p in pool])
                pool_x = torch.tensor([seen[p][1] for p in pool])
                if step % cfg.restart_every == 0:
                    # The reference draws this multiplier and then ignores it; here it is used.
                    log_m = math.log(cfg.restart_xentropy_max_mult)
                    mult = math.exp((torch.rand(1, generator=generator).item() * 2 - 1) * log_m)
                    chosen = [int(torch.argmin(-pool_t + cfg.restart_xentropy * mult * pool_x))] * cfg.population
                else:
                    chosen = [int(torch.argmin(-pool_t + lam * pool_x)) for lam in penalties.tolist()]
                population = torch.tensor([pool[i] for i in chosen], dtype=torch.long)
                grads = self._gradients_cached(population, penalties, grad_cache)
                best = max(range(len(pool)), key=lambda i: pool_t[i])
                history.append({"step": step, "best_target": float(pool_t[best]), "best_xent": float(pool_x[best]),
                                "evaluated": len(seen)})
                bar.set_postfix(target=f"{float(pool_t[best]):.2f}", xent=f"{float(pool_x[best]):.2f}")
        everything = [Candidate(ids, t, x) for ids, (t, x) in seen.items()]
        frontier = pareto_frontier(everything)
        for cand in frontier:
            cand.text = self.tokenizer.decode(list(cand.ids))
        members = []
        for row in population.tolist():
            t, x = seen[tuple(row)]
            members.append(Candidate(tuple(row), t, x, self.tokenizer.decode(row)))
        return EPOResult(frontier, members, len(seen), cfg.iterations, time.perf_counter() - started, cfg, history)
