"""Latent retrieval without a hosted feature search, on dev prompts only.

1. Both answer sets of the dev prompts (the prompted and the neutral answers) are read at the
   SAE's layer with the neutral system prompt as context, so the difference is the answers',
   not the system prompts'; every response token is encoded by the SAE.
2. Per latent: firing density over all those tokens, the mean activation difference (prompted
   minus neutral, per token), AUROC of the per-answer mean activation, and the cosine of its
   decoder row with the DiffMean residual direction (mean prompted minus mean neutral activation).
3. Dead latents (never firing) and dense ones (firing on more than ``max_density`` of the tokens,
   as FGAA drops them) are dropped; the candidates are the top latents by |mean difference|,
   plus the top latents by |cosine| with the DiffMean direction.
4. Output score (after Arad, Mueller, Belinkov 2025): each candidate is steered alone at a probe
   strength and the change of the pairwise preference for the prompted over the neutral answers
   is measured (nats/token); candidates whose output score is at most ``min_output_score`` do
   not act on the output in the wanted direction and are dropped.
5. The ``k`` candidates with the highest output score are chosen.

Every latent looked at gets a :class:`LatentRecord` saying which rule picked or dropped it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..core.stats import auroc
from ..core.steering import Steering
from ..measure.behavior import pairwise_preference
from .data import AutosteerError, ContrastiveSet, prompt_ids, response_token_activations


@dataclass
class LatentRecord:
    """What retrieval found about one latent, and which rule picked or dropped it.

    Args:
        latent: its index in the SAE.
        status: ``"chosen"`` or ``"dropped"``.
        rule: the rule that decided: ``"dead"``, ``"dense"``, ``"low output score"``,
            ``"not in top k"`` for dropped latents; for chosen ones ``"top k by output score"``.
        picked_by: the candidate rules that brought it in (``"mean difference"``, ``"DiffMean cosine"``).
        sign: +1 to add its decoder direction, -1 to subtract it (the sign of its mean difference).
        density: the fraction of answer tokens it fires on.
        mean_difference: mean activation per token, prompted minus neutral answers.
        auroc: of its per-answer mean activation, prompted vs neutral, in the direction of ``sign``.
        cosine: of its decoder row with the DiffMean direction.
        output_score: the preference-gap change when steered alone (None: not measured).
        top_tokens: the tokens its decoder direction promotes most through the unembedding.
        snippets: answer tokens it fires most on, the token in [brackets].
    """

    latent: int
    status: str
    rule: str
    picked_by: list[str] = field(default_factory=list)
    sign: float = 1.0
    density: float = 0.0
    mean_difference: float = 0.0
    auroc: float | None = None
    cosine: float = 0.0
    output_score: float | None = None
    top_tokens: list[str] = field(default_factory=list)
    snippets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatentRecord:
        return cls(**data)


@dataclass
class Retrieval:
    """The outcome of retrieval.

    Args:
        layer: the SAE's layer.
        chosen: the chosen latents' records, best output score first.
        records: every latent looked at (chosen, candidates dropped, and the dead or dense latents
            that would have been candidates).
        diffmean: the DiffMean residual direction ``(d,)`` (mean prompted minus mean neutral).
        residual_norm: mean norm of the answer tokens' residuals at the layer (the unit of strengths).
        counts: how many latents were dead, dense, candidates, dropped for their output score.
        baseline_gap: the unsteered preference gap the output scores are measured from.
        density: ``(d_sae,)`` the fraction of answer tokens each latent fires on.
    """

    layer: int
    chosen: list[LatentRecord]
    records: list[LatentRecord]
    diffmean: torch.Tensor
    residual_norm: float
    counts: dict
    baseline_gap: float
    density: torch.Tensor

    def to_dict(self) -> dict:
        return {"layer": self.layer, "residual_norm": self.residual_norm, "counts": self.counts,
                "baseline_gap": self.baseline_gap, "chosen": [r.latent for r in self.chosen],
                "records": [r.to_dict() for r in self.records]}


def unit_decoder_rows(sae, latents: Sequence[int]) -> torch.Tensor:
    """``(len(latents), d)`` float32 CPU unit decoder directions of ``latents``.

    Args:
        sae: the SAE.
        latents: latent indices.
    """
    rows = sae.W_dec.detach()[torch.as_tensor(list(latents), dtype=torch.long, device=sae.W_dec.device)]
    rows = rows.to("cpu", torch.float32)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def latent_steering(sae, layer: int, latents: Sequence[int], signs: Sequence[float], strengths: Sequence[float],
                    residual_norm: float, *, positions: str = "response", description: dict | None = None,
                    layer_path: str | None = None) -> Steering:
    """The steering that adds ``residual_norm * sum(strength_i * sign_i * unit decoder row_i)`` at
    ``layer`` (coefficient 1, ``add``).

    Args:
        sae: the SAE.
        layer: the layer it reads (where the vector is added).
        latents, signs, strengths: per latent its index, +1/-1 and strength (in units of ``residual_norm``).
        residual_norm: the typical residual norm at the layer.
        positions: ``"all"`` or ``"response"``.
        description: stored with the steering (spec files).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    rows = unit_decoder_rows(sae, latents)
    weights = torch.tensor([float(s) * float(w) for s, w in zip(signs, strengths)], dtype=torch.float32)
    vector = residual_norm * (weights[:, None] * rows).sum(0)
    return Steering({layer: vector}, 1.0, positions, "add", dict(description or {}), layer_path)


def _top_tokens(model, tokenizer, direction: torch.Tensor, n: int = 5) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None or head.weight.shape[1] != direction.numel():
        return []
    logits = head.weight.detach().float().cpu() @ direction.float()
    return [tokenizer.decode([int(i)]) for i in logits.topk(min(n, len(logits))).indices]


def retrieve_latents(model, tokenizer, sae, layer: int, data: ContrastiveSet, *, k: int = 4, candidates: int = 12,
                     cosine_candidates: int = 4, max_density: float = 0.25, min_output_score: float = 0.0,
                     probe_strength: float = 0.5, neutral_system: str | None = None, positions: str = "response",
                     batch_size: int = 16, layer_path: str | None = None,
                     check_prompts: Callable[[Sequence[str]], None] | None = None,
                     progress: bool = False) -> Retrieval:
    """Choose ``k`` latents for the behaviour the contrastive set shows (see the module docstring).

    Args:
        model, tokenizer: the model and its tokenizer.
        sae: the SAE (already checked against the model at ``layer``).
        layer: the SAE's layer.
        data: the dev contrastive set (never the test one: ``check_prompts`` refuses it).
        k: latents chosen at most.
        candidates: candidates by |mean difference| (before the output score).
        cosine_candidates: extra candidates by |cosine| with the DiffMean direction.
        max_density: latents firing on more than this fraction of answer tokens are dropped.
        min_output_score: candidates whose output score is not above this are dropped.
        probe_strength: the strength (in units of the residual norm) each candidate is steered at
            for its output score.
        neutral_system: the context both answer sets are read in (and the output score runs in).
        positions: the steering positions of the output-score probe.
        batch_size: sequences per forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
        check_prompts: called with the prompts before anything is read (the dev-only guard).
        progress: show a progress bar over the candidates' output scores.
    """
    from tqdm.auto import tqdm

    if check_prompts is not None:
        check_prompts(data.prompts)
    if not 0 < max_density <= 1:
        raise AutosteerError(f"max_density must be in (0, 1], got {max_density}")
    if k < 1 or candidates < 1:
        raise AutosteerError("k and candidates must be at least 1")
    context = prompt_ids(tokenizer, data.prompts, neutral_system)
    prompted = response_token_activations(model, context, data.prompted_ids, layer, batch_size=batch_size,
                                          layer_path=layer_path)
    neutral = response_token_activations(model, context, data.neutral_ids, layer, batch_size=batch_size,
                                         layer_path=layer_path)
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    with torch.no_grad():
        z_prompted = [sae.encode(a.to(device, dtype)).float().cpu() for a in prompted]
        z_neutral = [sae.encode(a.to(device, dtype)).float().cpu() for a in neutral]
    all_p, all_n = torch.cat(prompted), torch.cat(neutral)
    zp, zn = torch.cat(z_prompted), torch.cat(z_neutral)
    density = torch.cat([zp, zn]).gt(0).float().mean(0)
    difference = zp.mean(0) - zn.mean(0)
    diffmean = all_p.mean(0) - all_n.mean(0)
    residual_norm = float(torch.cat([all_p, all_n]).norm(dim=-1).mean())
    rows_all = sae.W_dec.detach().to("cpu", torch.float32)
    cosine = (rows_all @ diffmean) / (rows_all.norm(dim=-1) * diffmean.norm()).clamp_min(1e-12)

    records: dict[int, LatentRecord] = {}

    def record(latent: int, **fields) -> LatentRecord:
        if latent not in records:
            sign = float(torch.sign(difference[latent])) or float(torch.sign(cosine[latent])) or 1.0
            records[latent] = LatentRecord(latent, "dropped", "", sign=sign, density=float(density[latent]),
                                           mean_difference=float(difference[latent]), cosine=float(cosine[latent]))
        for key, value in fields.items():
            setattr(records[latent], key, value)
        return records[latent]

    dead = density.eq(0)
    dense = density.gt(max_density)
    # The latents mean difference would have picked, filter or not: the dead and dense among them
    # are recorded with the rule that dropped them.
    for latent in difference.abs().topk(min(candidates, len(difference))).indices.tolist():
        if dead[latent]:
            record(latent, rule="dead", picked_by=["mean difference"])
        elif dense[latent]:
            record(latent, rule="dense", picked_by=["mean difference"])
    usable = ~(dead | dense)
    if not bool(usable.any()):
        raise AutosteerError(f"every latent is dead or fires on more than {max_density:.0%} of tokens; "
                             "raise max_density or use another SAE")
    masked_diff = torch.where(usable, difference.abs(), torch.full_like(difference, -1.0))
    pool: list[int] = []
    for latent in masked_diff.topk(min(candidates, int(usable.sum()))).indices.tolist():
        record(latent, picked_by=["mean difference"])
        pool.append(latent)
    masked_cos = torch.where(usable, cosine.abs(), torch.full_like(cosine, -1.0))
    for latent in masked_cos.topk(min(cosine_candidates, int(usable.sum()))).indices.tolist() if cosine_candidates else []:
        entry = record(latent)
        if "DiffMean cosine" not in entry.picked_by:
            entry.picked_by = entry.picked_by + ["DiffMean cosine"]
        if latent not in pool:
            pool.append(latent)

    answers_per = [zp_i.mean(0) for zp_i in z_prompted], [zn_i.mean(0) for zn_i in z_neutral]
    per_p, per_n = torch.stack(answers_per[0]), torch.stack(answers_per[1])
    pairs = data.pairs()
    baseline = pairwise_preference(model, tokenizer, pairs, system=neutral_system or None, batch_size=batch_size)
    for latent in tqdm(pool, desc="output scores", disable=not progress, unit="latent"):
        entry = records[latent]
        entry.auroc = auroc(entry.sign * per_p[:, latent], entry.sign * per_n[:, latent])
        direction = unit_decoder_rows(sae, [latent])[0] * entry.sign
        entry.top_tokens = _top_tokens(model, tokenizer, direction)
        probe = latent_steering(sae, layer, [latent], [entry.sign], [probe_strength], residual_norm,
                                positions=positions, layer_path=layer_path)
        steered = pairwise_preference(model, tokenizer, pairs, system=neutral_system or None, steering=probe,
                                      batch_size=batch_size)
        entry.output_score = steered.mean_gap - baseline.mean_gap
    passing = [latent for latent in pool if records[latent].output_score > min_output_score]
    for latent in pool:
        if latent not in passing:
            records[latent].rule = "low output score"
    passing.sort(key=lambda latent: -records[latent].output_score)
    chosen = passing[:k]
    for latent in passing[k:]:
        records[latent].rule = "not in top k"
    for latent in chosen:
        records[latent].status, records[latent].rule = "chosen", "top k by output score"
    if not chosen:
        raise AutosteerError(f"no candidate latent moves the output toward the prompted answers (every output "
                             f"score <= {min_output_score}); try more candidates, another probe strength or SAE layer")
    _add_snippets(tokenizer, [records[latent] for latent in chosen], z_prompted + z_neutral,
                  data.prompted_ids + data.neutral_ids)
    counts = {"latents": len(difference), "dead": int(dead.sum()), "dense": int(dense.sum()),
              "candidates": len(pool), "low_output_score": len(pool) - len(passing), "chosen": len(chosen),
              "tokens": int(len(zp) + len(zn))}
    ordered = [records[latent] for latent in chosen] + sorted(
        (r for r in records.values() if r.status != "chosen"), key=lambda r: (r.rule, -abs(r.mean_difference)))
    return Retrieval(layer, [records[latent] for latent in chosen], ordered, diffmean, residual_norm, counts,
                     float(baseline.mean_gap), density)


def _add_snippets(tokenizer, entries: list[LatentRecord], codes: list[torch.Tensor], ids: list[list[int]],
                  n: int = 3, window: int = 6) -> None:
    """Each entry's ``n`` highest-activating answer tokens with ``window`` tokens before them."""
    for entry in entries:
        best = []
        for seq, (z, tokens) in enumerate(zip(codes, ids)):
            if len(z):
                value, pos = z[:, entry.latent].max(0)
                if float(value) > 0:
                    best.append((float(value), seq, int(pos)))
        best.sort(reverse=True)
        shown = []
        for value, seq, pos in best[:n]:
            tokens = ids[seq]
            left = tokenizer.decode(tokens[max(0, pos - window):pos])
            token = tokenizer.decode(tokens[pos:pos + 1])
            right = tokenizer.decode(tokens[pos + 1:pos + 1 + window // 2])
            shown.append(" ".join(f"{left}[{token}]{right}".split()))
        entry.snippets = shown
