"""Screening finetuning data by projection difference (Persona Vectors §6).

For a sample (x, y) and a unit persona vector v̂ at layer ℓ, with a(x, y) the mean response-token
activation:

* ``projection``  = a(x, y)·v̂, the raw response projection;
* ``approx``      = a(x, y)·v̂ − h(x)[last prompt token]·v̂, the generation-free estimate
  (both terms from the same forward pass);
* ``delta_p``     = (a(x, y) − a(x, y_base))·v̂ with y_base the base model's own greedy
  response (full mode only);
* ``z``           = the mode's score (``delta_p`` in full mode, ``approx`` otherwise) as a
  z-score against a reference distribution (a reference dataset, or the screened data itself);
* ``score``       = what thresholds, ranking and filtering use (``ScreenConfig.score``). The
  default, ``relative``, is the sample's z minus the mean z of the *other* screened traits: how
  much more the sample leans toward this trait than toward the others. On a mixed dataset
  (code, recipes, math beside a few trait samples) the raw readings of every persona vector
  move together with the kind of content, so the plain approximation ranks a recipe as high as a
  hallucination; the other traits' readings carry that content-type component, and subtracting
  them removes it (benchmarks/RESULTS.md, section ``screening_mixed``). It is a dataset-level
  score, set by :func:`set_relative_scores` once every sample is scored (the pipeline's
  ``finish_scores``); :meth:`Screener.score` alone leaves ``score`` at the mode's score.

One forward per sample serves every vector and layer. Batches are planned up front from token
lengths (sorted, packed to a token budget), so the plan, and with it every number, does not
depend on where a run was interrupted: a resumed run writes the same report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..core.chat import format_messages
from ..core.forward import forward_until, halve_on_oom, pad_batch, plan_batches
from ..core.generation import GenerationCache, SamplingConfig, cached_generate
from ..core.layers import capture
from ..core.models import cache_dir, eval_mode, model_name, state_fingerprint
from ..core.readout import ReadKey, Readout
from ..core.vectors import PersonaVector
from ..errors import ScreenError
from .samples import Sample

logger = logging.getLogger(__name__)  # warnings reach Python users who pass no warn=

MODES = ("full", "approx")
# What ``score`` holds: "relative" (the default, see the module docstring), or one of the raw
# fields: the paper's ΔP ("delta_p", full mode), the approximation, or the raw projection.
SCORES = ("relative", "delta_p", "approx", "projection")
STAGES = ("train", "base")



@dataclass(frozen=True)
class ScreenConfig:
    # approx: generation-free (response projection minus last-prompt-token projection); full: the
    # paper's ΔP against the base model's own greedy answer (generates one answer per prompt).
    mode: str = "approx"
    # What ranks and thresholds use; see SCORES. "relative" needs two screened traits or more to
    # differ from the plain z-score.
    score: str = "relative"
    # Tokens per forward batch (padded length x rows); rows are also capped by max_batch_size.
    token_budget: int = 16384
    max_batch_size: int = 64
    # Context window for prompt + response; None: the model's max_position_embeddings.
    max_length: int | None = None
    # Base responses: greedy, as in the paper's real-data experiments.
    max_new_tokens: int = 128
    generation_batch_size: int = 32
    layer_path: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ScreenError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.score not in SCORES:
            raise ScreenError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.score == "delta_p" and self.mode != "full":
            raise ScreenError("score delta_p needs full mode (mode='full', CLI --mode full): ΔP compares against "
                              "the base model's own answers, which approx mode does not generate")


ScoreKey = ReadKey  # one scored direction: a vector's trait at one layer


def score_keys(vectors: Sequence[PersonaVector], layers: Sequence[int] | None = None) -> list[ScoreKey]:
    """Each vector at its recommended layer (or at each of ``layers``); names are the trait,
    or ``trait@L<layer>`` when a trait is scored at several layers."""
    return Readout(vectors, each_at=layers, error=ScreenError).keys


def fit_window(prompt: list[int], response: list[int], window: int) -> tuple[list[int], list[int], bool]:
    """Truncate to ``window`` tokens: the prompt loses its oldest tokens (keeping at least half
    the window, or all of it if shorter), the response its last ones."""
    if len(prompt) + len(response) <= window:
        return prompt, response, False
    keep_prompt = min(len(prompt), max(window - len(response), window // 2))
    return prompt[len(prompt) - keep_prompt:], response[:window - keep_prompt], True


@torch.inference_mode()
def project_batch(model, prompts: list[list[int]], responses: list[list[int]], keys: Sequence[ScoreKey],
                  units: dict[int, torch.Tensor], layer_path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded forward of prompt+response rows, stopped after the deepest layer needed:
    ``(response-mean projections, last-prompt-token projections)``, each ``(rows, len(keys))``."""
    device = next(model.parameters()).device
    ids, attn = pad_batch([p + r for p, r in zip(prompts, responses)], 0, device, side="right")
    starts = torch.tensor([len(p) for p in prompts], device=device)
    ends = starts + torch.tensor([len(r) for r in responses], device=device)
    cols = torch.arange(ids.shape[1], device=device)
    response_mask = (cols >= starts[:, None]) & (cols < ends[:, None])
    layers = sorted(units)
    with capture(model, layers, position="response_mean", attention_mask=attn, response_mask=response_mask,
                 layer_path=layer_path) as means, \
            capture(model, layers, position="last_prompt", attention_mask=attn, response_mask=response_mask,
                    layer_path=layer_path) as lasts:
        forward_until(model, ids, attn, max(layers), layer_path)
    # Per layer, one matmul against all of its unit vectors; then columns in key order.
    mean_proj, last_proj = {}, {}
    for layer in layers:
        mean_proj[layer] = (means[layer] @ units[layer].to(means[layer]).T).cpu()
        last_proj[layer] = (lasts[layer] @ units[layer].to(lasts[layer]).T).cpu()
    column = {}
    for layer in layers:
        for j, key in enumerate(k for k in keys if k.layer == layer):
            column[key] = (layer, j)
    mean = torch.stack([mean_proj[column[k][0]][:, column[k][1]] for k in keys], dim=1)
    last = torch.stack([last_proj[column[k][0]][:, column[k][1]] for k in keys], dim=1)
    return mean, last


class Checkpoint:
    """Finished batches of one screening run, appended to a JSONL file as they finish.

    The first line holds the run's fingerprint (model, vectors, settings, the token ids of
    every sample); a file from a different run is set aside, never mixed in.
    """

    def __init__(self, path: str | Path, fingerprint: str, warn: Callable[[str], None] = logger.warning):
        self.path = Path(path)
        self.done: dict[tuple[str, int], dict] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            header = _json_or_none(lines[0]) if lines else None
            if header and header.get("fingerprint") == fingerprint:
                for line in lines[1:]:
                    entry = _json_or_none(line)
                    if entry is None:  # a line cut short by the interruption: that batch is redone
                        continue
                    self.done[(entry["stage"], entry["batch"])] = entry
                if self.done:
                    warn(f"resuming from {self.path}: {len(self.done)} batches already done")
                self._rewrite(fingerprint)
                return
            warn(f"{self.path} is from a different screening run (data, model, vectors or settings changed); starting over")
        self._rewrite(fingerprint)

    def _rewrite(self, fingerprint: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            for entry in self.done.values():
                out.write(json.dumps(entry) + "\n")
        os.replace(tmp, self.path)

    def add(self, stage: str, batch: int, indices: list[int], mean: torch.Tensor, last: torch.Tensor) -> dict:
        entry = {"stage": stage, "batch": batch, "indices": indices, "mean": mean.tolist(), "last": last.tolist()}
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.done[(stage, batch)] = entry
        return entry


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


@dataclass
class SampleScore:
    id: str
    index: int
    flags: list[str]
    prompt_tokens: int
    response_tokens: int
    # name -> {"projection", "approx", "delta_p", "base_projection", "score", "z"}
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    base_response: str | None = None


@dataclass
class ScreenResult:
    keys: list[ScoreKey]
    mode: str
    samples: list[SampleScore]
    model: str
    generated: int = 0  # base responses generated in this run (the rest came from the cache)
    score: str | None = None  # what "score" holds once set_relative_scores ran (None: the mode's raw score)

    @property
    def raw_field(self) -> str:
        """The mode's raw score field: ``delta_p`` in full mode, ``approx`` otherwise."""
        return "delta_p" if self.mode == "full" else "approx"

    def score_label(self, short: bool = False) -> str:
        """What the ``score`` field holds, for axes and tables.

        Args:
            short: a few characters instead of a phrase.
        """
        kind = self.score or self.raw_field
        if kind == "relative":
            return "relative score" if short else "relative score (z minus the other traits' mean z)"
        names = {"delta_p": ("ΔP", "projection difference ΔP"),
                 "approx": ("approx ΔP", "approximate ΔP (response − last prompt token)"),
                 "projection": ("projection", "raw response projection")}
        return names[kind][0 if short else 1]

    def primary(self, name: str) -> list[float | None]:
        return [s.scores[name]["score"] for s in self.samples]

    def dataset_scores(self) -> dict[str, dict[str, float | None]]:
        """Per trait: the mean of the mode's score (the paper's dataset-level ΔP in full mode, the
        mean approximation otherwise; not the relative score, which averages to zero over the data
        it was standardised on), mean projection, and how many samples were scored."""
        field_name = self.raw_field
        out = {}
        for key in self.keys:
            values = [s.scores[key.name][field_name] for s in self.samples
                      if s.scores[key.name][field_name] is not None]
            projections = [s.scores[key.name]["projection"] for s in self.samples
                           if s.scores[key.name]["projection"] is not None]
            out[key.name] = {"trait": key.trait, "layer": key.layer, "mean_score": _mean(values),
                             "mean_projection": _mean(projections), "scored": len(values)}
        return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fingerprint(model_identity: list[str], keys, units, config: ScreenConfig, token_ids) -> str:
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k != "score"}  # score: set after scoring
    h.update(json.dumps([*model_identity, [asdict(k) for k in keys], settings]).encode())
    for layer in sorted(units):
        h.update(units[layer].to(torch.float32).cpu().numpy().tobytes())
    for prompt, response in token_ids:
        h.update(json.dumps([prompt, response]).encode())
    return h.hexdigest()


class Screener:
    """Scores samples for every key in one pass per stage; see the module docstring.

    ``checkpoint_path`` makes the run resumable; ``generation_cache`` (default: under the
    persona-guard cache directory) keeps base responses between runs. ``generator`` makes the
    base responses somewhere else: a callable like :func:`~guard.core.generation.cached_generate`
    with an ``identity`` (:class:`~guard.core.generation.RemoteGenerator`: a completions server);
    None generates in process.
    """

    def __init__(self, model, tokenizer, vectors: Sequence[PersonaVector], config: ScreenConfig = ScreenConfig(),
                 layers: Sequence[int] | None = None, generation_cache: str | Path | None = None,
                 generator=None):
        for vector in vectors:
            vector.ensure_fits(model)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        readout = Readout(vectors, each_at=layers, layer_path=config.layer_path, error=ScreenError)
        self.keys = readout.keys
        self.units: dict[int, torch.Tensor] = readout.units_by_layer()
        window = config.max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096
        self.window = int(window)
        self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=0.0)
        self.generation_cache = Path(generation_cache) if generation_cache else cache_dir() / "base_responses.sqlite"
        self.generator = generator

    # -- tokenisation -------------------------------------------------------------------------
    def _tokenize(self, samples: Sequence[Sample]) -> tuple[list[list[int]], list[list[int]]]:
        prompts = [format_messages(self.tokenizer, list(s.prompt)) for s in samples]
        enc = lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
        return enc(prompts), enc([s.response for s in samples])

    def _stage(self, stage: str, prompts, responses, usable: list[int], checkpoint: Checkpoint | None,
               progress: bool) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        lengths = [len(prompts[i]) + len(responses[i]) for i in usable]
        plan = [[usable[j] for j in batch] for batch in
                plan_batches(lengths, self.config.max_batch_size, self.config.token_budget)]
        mean, last = {}, {}
        todo = [(n, batch) for n, batch in enumerate(plan) if not checkpoint or (stage, n) not in checkpoint.done]
        for n, batch in enumerate(plan):
            if checkpoint and (stage, n) in checkpoint.done:
                entry = checkpoint.done[(stage, n)]
                mean.update(zip(entry["indices"], entry["mean"]))
                last.update(zip(entry["indices"], entry["last"]))
        bar = tqdm(total=sum(len(b) for _, b in todo), desc=f"scoring {stage} responses", unit="sample",
                   disable=not progress or not todo)
        with eval_mode(self.model):
            for n, batch in todo:
                m, l_ = self._project(batch, prompts, responses)
                if checkpoint:
                    checkpoint.add(stage, n, batch, m, l_)
                mean.update(zip(batch, m.tolist()))
                last.update(zip(batch, l_.tolist()))
                bar.update(len(batch))
        bar.close()
        return mean, last

    def _project(self, batch: list[int], prompts, responses) -> tuple[torch.Tensor, torch.Tensor]:
        """Project one planned batch; on out-of-memory, in halves under the same batch number, so
        the checkpoint's bookkeeping is unchanged."""
        def run(rows):
            return project_batch(self.model, [prompts[i] for i in rows], [responses[i] for i in rows],
                                 self.keys, self.units, self.config.layer_path)

        return halve_on_oom(run, batch, lambda a, b: (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])))

    def score(self, samples: Sequence[Sample], *, checkpoint_path: str | Path | None = None, progress: bool = False,
              warn: Callable[[str], None] = logger.warning) -> ScreenResult:
        prompts, responses = self._tokenize(samples)
        flags: list[list[str]] = [[] for _ in samples]
        truncated = 0
        for i, sample in enumerate(samples):
            if not sample.response.strip() or not responses[i]:
                flags[i].append("empty_response")
            elif not any(m["content"].strip() for m in sample.prompt):
                flags[i].append("empty_prompt")
            else:
                prompts[i], responses[i], cut = fit_window(prompts[i], responses[i], self.window)
                if cut:
                    flags[i].append("truncated")
                    truncated += 1
        if truncated:
            warn(f"{truncated} sample(s) longer than the {self.window}-token window were truncated (flagged 'truncated')")
        usable = [i for i in range(len(samples)) if not {"empty_response", "empty_prompt"} & set(flags[i])]
        # Name and state of the model, once: it keys both the checkpoint and the base-response cache.
        model_identity = [model_name(self.model), state_fingerprint(self.model)]
        checkpoint = None
        if checkpoint_path:
            served = [self.generator.identity] if self.generator is not None and self.config.mode == "full" else []
            fingerprint = _fingerprint(model_identity + served, self.keys, self.units, self.config,
                                       [(prompts[i], responses[i]) for i in range(len(samples))])
            checkpoint = Checkpoint(checkpoint_path, fingerprint, warn)
        mean, last = self._stage("train", prompts, responses, usable, checkpoint, progress)

        base_mean, base_texts, generated = {}, {}, 0
        if self.config.mode == "full":
            room = max(1, self.window - self.config.max_new_tokens)
            base_prompts = [prompts[i][-room:] for i in range(len(samples))]
            cache = GenerationCache(self.generation_cache)
            try:
                base_ids, generated = (self.generator or cached_generate)(
                    self.model, self.tokenizer, [base_prompts[i] for i in usable], self.sampling, cache,
                    ":".join(model_identity),
                    batch_size=self.config.generation_batch_size, progress=progress, desc="base responses")
            finally:
                cache.close()
            base_responses: list[list[int]] = [[] for _ in samples]
            for i, ids in zip(usable, base_ids):
                base_responses[i] = ids
                base_texts[i] = self.tokenizer.decode(ids, skip_special_tokens=True)
            with_base = [i for i in usable if base_responses[i]]
            for i in usable:
                if not base_responses[i]:
                    flags[i].append("empty_base_response")
            # Samples that share a prompt share its base response: score each pair once.
            first_of: dict[tuple, int] = {}
            for i in with_base:
                first_of.setdefault((tuple(base_prompts[i]), tuple(base_responses[i])), i)
            unique = sorted(set(first_of.values()))
            base_mean, _ = self._stage("base", base_prompts, base_responses, unique, checkpoint, progress)
            for i in with_base:
                base_mean[i] = base_mean[first_of[(tuple(base_prompts[i]), tuple(base_responses[i]))]]

        results = []
        for i, sample in enumerate(samples):
            row = SampleScore(sample.id, sample.index, flags[i], len(prompts[i]), len(responses[i]),
                              base_response=base_texts.get(i))
            for k, key in enumerate(self.keys):
                projection = mean[i][k] if i in mean else None
                approx = projection - last[i][k] if i in mean else None
                base = base_mean[i][k] if i in base_mean else None
                delta = projection - base if projection is not None and base is not None else None
                score = delta if self.config.mode == "full" else approx
                row.scores[key.name] = {"score": score, "delta_p": delta, "approx": approx, "projection": projection,
                                        "base_projection": base, "z": None}
            results.append(row)
        return ScreenResult(self.keys, self.config.mode, results, model_name(self.model), generated)


# -- reference distribution, thresholds ----------------------------------------------------------

def set_z_scores(result: ScreenResult, reference: ScreenResult | None = None) -> dict[str, tuple[float, float]]:
    """Fill each sample's ``z`` from the mean and standard deviation of the reference's values of
    the mode's score (``delta_p`` in full mode, ``approx`` otherwise; the screened data itself by
    default); returns ``{name: (mean, std)}``. With fewer than two scored reference samples there
    is no spread: z stays None (and so does the std).

    Args:
        result: the scored samples whose ``z`` is set.
        reference: the samples the mean and spread come from (default: ``result``).
    """
    given = reference is not None
    reference = reference or result
    field_name = result.raw_field
    stats = {}
    for key in result.keys:
        if key.name not in {k.name for k in reference.keys}:
            raise ScreenError(f"the reference was not scored for {key.name}")
        values = [s.scores[key.name][field_name] for s in reference.samples
                  if s.scores[key.name][field_name] is not None]
        if len(values) < 2:
            if given:
                raise ScreenError(f"the reference has {len(values)} scored sample(s) for {key.name}; need at least 2")
            stats[key.name] = (values[0] if values else None, None)
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) or 1e-12
        stats[key.name] = (mean, std)
        for sample in result.samples:
            entry = sample.scores[key.name]
            entry["z"] = None if entry[field_name] is None else (entry[field_name] - mean) / std
    return stats


def set_relative_scores(result: ScreenResult, score: str = "relative") -> None:
    """Set each sample's ``score`` as ``ScreenConfig.score`` asks, from the fields and z-scores
    already filled (:func:`set_z_scores` first). ``relative``: the key's z minus the mean z of the
    keys of the other traits (at the same layer, when every vector is read at several layers);
    with no other trait screened, the z itself; where a key has no spread (fewer than two scored
    samples), the mode's raw score instead (``result.score`` says which). A raw field name copies
    that field.

    Args:
        result: scored samples with ``z`` set.
        score: one of :data:`SCORES`.
    """
    if score not in SCORES:
        raise ScreenError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    raw = result.raw_field
    if score == "relative" and any(all(s.scores[k.name]["z"] is None for s in result.samples) and
                                   any(s.scores[k.name][raw] is not None for s in result.samples)
                                   for k in result.keys):
        # Fewer than two scored samples of a key: no spread to standardise by, so nothing to be
        # relative to; rank by the mode's raw score rather than leave every sample unscored.
        score = raw
    result.score = score
    if score != "relative":
        for sample in result.samples:
            for entry in sample.scores.values():
                entry["score"] = entry[score]
        return
    one_per_trait = len({k.trait for k in result.keys}) == len(result.keys)
    others = {k.name: [j.name for j in result.keys if j.trait != k.trait and (one_per_trait or j.layer == k.layer)]
              for k in result.keys}
    for sample in result.samples:
        z = {name: entry["z"] for name, entry in sample.scores.items()}
        for name, entry in sample.scores.items():
            rest = [z[o] for o in others[name] if z[o] is not None]
            entry["score"] = None if z[name] is None else z[name] - (sum(rest) / len(rest) if rest else 0.0)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in 0..100."""
    ordered = sorted(values)
    if not ordered:
        raise ScreenError("no scored samples to take a percentile of")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_threshold(spec: str) -> tuple[str, float]:
    """``"2.5"`` (a score) or ``"p95"`` (a percentile of the reference distribution)."""
    spec = spec.strip()
    try:
        if spec.lower().startswith("p"):
            q = float(spec[1:])
            if not 0 <= q <= 100:
                raise ValueError
            return "percentile", q
        return "value", float(spec)
    except ValueError:
        raise ScreenError(f"threshold {spec!r} is neither a number nor a percentile like 'p95'") from None


def check_thresholds(keys: Sequence[ScoreKey], specs: dict[str | None, str]) -> None:
    """Refuse, before any work, thresholds for traits that are not screened or that do not parse."""
    known = {k.name for k in keys} | {k.trait for k in keys}
    unknown = [name for name in specs if name is not None and name not in known]
    if unknown:
        raise ScreenError(f"threshold for {', '.join(unknown)}, which is not screened (screened: {', '.join(sorted(known))})")
    for spec in specs.values():
        parse_threshold(spec)


def resolve_thresholds(result: ScreenResult, specs: dict[str | None, str],
                       reference: ScreenResult | None = None) -> dict[str, float]:
    """Score thresholds per key name. ``specs`` maps a trait (or key name) to a spec; the key
    ``None`` applies to every trait not named. Percentiles are of the reference's scores."""
    reference = reference or result
    check_thresholds(result.keys, specs)
    out = {}
    for key in result.keys:
        spec = specs.get(key.name, specs.get(key.trait, specs.get(None)))
        if spec is None:
            continue
        kind, number = parse_threshold(spec)
        if kind == "value":
            out[key.name] = number
        else:
            out[key.name] = percentile([v for v in reference.primary(key.name) if v is not None], number)
    return out


def flagged(result: ScreenResult, thresholds: dict[str, float]) -> dict[int, list[str]]:
    """Sample index -> names of the keys whose score is above their threshold."""
    out: dict[int, list[str]] = {}
    for sample in result.samples:
        over = [name for name, limit in thresholds.items()
                if sample.scores[name]["score"] is not None and sample.scores[name]["score"] > limit]
        if over:
            out[sample.index] = over
    return out
