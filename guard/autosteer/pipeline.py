"""Auto-steering from a one-sentence description, offline: contrastive data, latent retrieval,
weight search, and a held-out report against prompting and a random-latent control.

    >>> from guard.autosteer import AutosteerConfig, autosteer
    >>> result = autosteer(model, tokenizer, sae, "Talk like a pirate.", AutosteerConfig(k=4, budget=24))
    >>> result.save("runs/pirate", model)        # steering.safetensors, report.json, report.md
    >>> with result.steering.apply(model):
    ...     model.generate(...)

Stages (each timed in :attr:`AutosteerResult.timings`):

``dev data``        greedy answers to the dev prompts with the description as the system prompt
                    and with a neutral one (:func:`guard.autosteer.data.build_contrastive`)
``retrieval``       latents from the SAE (:func:`guard.autosteer.retrieval.retrieve_latents`)
``tuning``          the chosen latents' strengths by black-box search on the dev prompts,
                    maximising the mean harmonic score of concept, fluency and relevance
                    (:mod:`guard.autosteer.scoring`); the best judged strengths are kept
``tuning diffmean`` the DiffMean direction's strength, searched the same way (optional)
``tuning control``  random latents of the chosen latents' density band, searched the same way
                    (or given the chosen strengths and rescaled to equal norm)
``test data``       the same answers for the test prompts (read only from here on)
``report``          every condition on the test prompts, with bootstrap CIs and paired differences

No test prompt reaches the first five stages: :func:`guard.autosteer.data.ensure_dev_only` refuses it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.models import model_name
from ..core.stats import Estimate, bootstrap_ci, paired_difference
from ..core.steering import STEER_POSITIONS, Steering
from ..measure.behavior import pairwise_preference
from ..measure.evaluate import neutral_logliks
from .data import (
    NEUTRAL_SYSTEM,
    AutosteerError,
    ContrastiveSet,
    build_contrastive,
    ensure_dev_only,
    load_prompt_bank,
)
from .retrieval import LatentRecord, latent_steering, retrieve_latents
from .scoring import Reference, concept_rubric, mean_score, reference, score_condition
from .search import SearchResult, search_one_strength, search_strengths, search_with_proposer

SPEC_FILE = "steering.safetensors"
REPORT_FILE = "report.json"
MARKDOWN_FILE = "report.md"
CONTROL_FILES = {"diffmean": "diffmean.safetensors", "random latents": "random_latents.safetensors"}
REPORT_METRICS = ("concept", "fluency", "relevance", "harmonic", "gap", "pair_gap", "capability")
METRIC_NOTES = {
    "concept": "0-1; shows the behaviour (judge-free: sigmoid of the preference gap / temperature; or judge / 100)",
    "fluency": "0-1; greedy answer's likelihood under the unsteered model vs the prompted answers', times 1 - repetition",
    "relevance": "0-1; the neutral answer's likelihood under the condition vs unsteered",
    "harmonic": "0-1; harmonic mean of concept, fluency, relevance (0 if any is 0)",
    "gap": "nats/token; prompted minus neutral answer's log-probability under the condition",
    "pair_gap": "nats/token; on held-out pairs (--pairs), the concept reply's log-probability minus the neutral reply's",
    "capability": "nats/token of ordinary answers (NEUTRAL_QA); a drop is the capability cost",
}


@dataclass(frozen=True)
class AutosteerConfig:
    """Every setting of an auto-steering run.

    Args:
        k: latents chosen at most.
        candidates: candidate latents by |mean difference| before the output score.
        cosine_candidates: extra candidates by |cosine| of their decoder row with the DiffMean direction.
        max_density: latents firing on more than this fraction of answer tokens are dropped.
        min_output_score: candidates whose output score (nats/token) is not above this are dropped.
        probe_strength: strength each candidate is steered at for its output score.
        max_strength: the upper end of each latent's strength; strengths are in units of the mean
            residual norm at the SAE's layer (0.25: a quarter of a typical activation's length).
        budget: objective evaluations of each weight search.
        n_dev: dev prompts used (None: all of the bank's).
        n_test: test prompts reported on (None: all of the bank's).
        max_new_tokens: length cap of every greedy answer.
        neutral_system: the neutral system prompt (empty: none).
        positions: steering positions, ``"response"`` (the last prompt token and the reply) or ``"all"``.
        concept_temperature: nats/token of preference gap that move the judge-free concept from 0.5 to 0.73.
        tune_diffmean: also tune and report steering along the DiffMean direction.
        control: ``"tuned"`` (random latents searched with the same budget) or ``"equal-norm"``
            (random latents with the chosen strengths, rescaled to the steering's norm).
        seed: seeds the search's perturbations and the control's latents.
        n_boot: bootstrap resamples per CI.
        level: CI coverage.
        batch_size: sequences per forward.
        samples: greedy answers per condition kept in the report.
        prompt_bank: a JSON file with ``dev`` and ``test`` prompt lists (None: the shipped bank).
    """

    k: int = 4
    candidates: int = 12
    cosine_candidates: int = 4
    max_density: float = 0.25
    min_output_score: float = 0.0
    probe_strength: float = 0.5
    max_strength: float = 1.0
    budget: int = 24
    n_dev: int | None = 16
    n_test: int | None = 24
    max_new_tokens: int = 48
    neutral_system: str = NEUTRAL_SYSTEM
    positions: str = "response"
    concept_temperature: float = 0.5
    tune_diffmean: bool = True
    control: str = "tuned"
    seed: int = 0
    n_boot: int = 2000
    level: float = 0.95
    batch_size: int = 16
    samples: int = 3
    prompt_bank: str | None = None

    def __post_init__(self):
        positive_ints = ("k", "candidates", "budget", "max_new_tokens", "batch_size", "n_boot")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise AutosteerError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_dev", "n_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AutosteerError(f"{name} must be at least 1 (or None for all), got {value}")
        for name in ("max_strength", "probe_strength", "concept_temperature"):
            value = float(getattr(self, name))
            if not (value > 0 and math.isfinite(value)):
                raise AutosteerError(f"{name} must be a positive number, got {value}")
        if not 0 < self.max_density <= 1:
            raise AutosteerError(f"max_density must be in (0, 1], got {self.max_density}")
        if not math.isfinite(self.min_output_score):
            raise AutosteerError("min_output_score must be finite")
        if self.positions not in STEER_POSITIONS:
            raise AutosteerError(f"positions must be one of {', '.join(STEER_POSITIONS)}, got {self.positions!r}")
        if self.control not in ("tuned", "equal-norm"):
            raise AutosteerError(f"control must be 'tuned' or 'equal-norm', got {self.control!r}")
        if not 0 < self.level < 1:
            raise AutosteerError(f"level must be between 0 and 1, got {self.level}")
        if self.cosine_candidates < 0 or self.samples < 0:
            raise AutosteerError("cosine_candidates and samples cannot be negative")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AutosteerConfig:
        """The inverse of :meth:`to_dict`; an unknown key is an error (a typo would silently do nothing).

        Args:
            data: the settings.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AutosteerError(f"unknown autosteer setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class ConditionReport:
    """One condition measured on the test prompts.

    Args:
        name: ``none``, ``prompt``, ``autosteer``, ``prompt + autosteer``, ``diffmean``, ``random latents``.
        system: its system prompt.
        steering: what its steering is (no tensors), or None.
        values: per metric (:data:`REPORT_METRICS`), the per-item values.
        estimates: per metric, the mean with its bootstrap CI.
        vs_none: per metric, the paired difference this condition minus ``none``.
        samples: ``[prompt, greedy answer]`` for the first test prompts.
    """

    name: str
    system: str | None
    steering: dict | None
    values: dict[str, list[float]] = field(default_factory=dict)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    vs_none: dict[str, Estimate] = field(default_factory=dict)
    samples: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "system": self.system, "steering": self.steering, "values": self.values,
                "estimates": {k: e.to_dict() for k, e in self.estimates.items()},
                "vs_none": {k: {**e.to_dict(), "verdict": e.verdict()} for k, e in self.vs_none.items()},
                "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict) -> ConditionReport:
        return cls(data["name"], data.get("system"), data.get("steering"), dict(data.get("values") or {}),
                   {k: Estimate.from_dict(e) for k, e in (data.get("estimates") or {}).items()},
                   {k: Estimate.from_dict(e) for k, e in (data.get("vs_none") or {}).items()},
                   list(data.get("samples") or []))


@dataclass
class AutosteerResult:
    """What an auto-steering run found, and its held-out report.

    Args:
        description: the behaviour asked for.
        config: the settings.
        model: the model's name.
        sae: the SAE's source, layer and width.
        prompts: the dev and test prompts used, and those dropped for an empty answer.
        latents: the chosen latents' records (see :class:`~guard.autosteer.retrieval.LatentRecord`).
        strengths: the tuned strength of each chosen latent (units of ``residual_norm``).
        records: every latent retrieval looked at, with the rule that picked or dropped it.
        retrieval: retrieval's counts, residual norm and baseline gap.
        searches: the weight searches' histories (``autosteer``, ``diffmean``, ``random latents``).
        conditions: every condition on the test prompts, ``none`` first.
        comparisons: per other condition, ``autosteer`` minus it (paired, per metric).
        timings: seconds per stage.
        steering: the tuned steering (what the spec file holds).
        controls: the other steerings reported (``diffmean``, ``random latents``).
        judge: the judge's name, when the concept was judged.
        proposer: the proposer's name, when an LLM proposed the strengths.
    """

    description: str
    config: AutosteerConfig
    model: str
    sae: dict
    prompts: dict
    latents: list[LatentRecord]
    strengths: list[float]
    records: list[LatentRecord]
    retrieval: dict
    searches: dict[str, SearchResult]
    conditions: list[ConditionReport]
    comparisons: dict[str, dict[str, Estimate]]
    timings: dict[str, float]
    steering: Steering | None = None
    controls: dict[str, Steering] = field(default_factory=dict)
    judge: str | None = None
    proposer: str | None = None

    def condition(self, name: str) -> ConditionReport:
        """The report of the condition named ``name``."""
        for result in self.conditions:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-ready (no tensors; the steerings are in the spec files)."""
        return {"format": "persona-guard/autosteer", "format_version": 1, "description": self.description,
                "model": self.model, "sae": self.sae, "judge": self.judge, "proposer": self.proposer, "config": self.config.to_dict(),
                "prompts": self.prompts,
                "latents": [{**r.to_dict(), "strength": s} for r, s in zip(self.latents, self.strengths)],
                "records": [r.to_dict() for r in self.records], "retrieval": self.retrieval,
                "searches": {k: s.to_dict() for k, s in self.searches.items()},
                "metrics": METRIC_NOTES,
                "conditions": [c.to_dict() for c in self.conditions],
                "comparisons": {name: {k: {**e.to_dict(), "verdict": e.verdict()} for k, e in d.items()}
                                for name, d in self.comparisons.items()},
                "timings": self.timings, "files": {"spec": SPEC_FILE, **{k: v for k, v in CONTROL_FILES.items()
                                                                          if k in self.controls}}}

    def save(self, path: str | Path, model, *, overwrite: bool = False) -> Path:
        """Write the run to the directory ``path``: ``steering.safetensors`` (a
        :class:`~guard.core.steering.Steering` spec, checked against the model on load),
        ``diffmean.safetensors`` / ``random_latents.safetensors`` (the reported controls),
        ``report.json`` and ``report.md``. Everything is written into a temporary directory beside
        ``path`` and renamed into place, so a failure leaves no half-written directory.

        Args:
            path: the output directory (must not exist, or be empty, unless ``overwrite``).
            model: the model the steering is for (its identity goes into the spec files).
            overwrite: replace an existing non-empty directory.
        """
        if self.steering is None:
            raise AutosteerError("this result has no steering to save (it was loaded without its spec file)")
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise AutosteerError(f"{path} exists and is not an empty directory; pick another output directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.steering.save(tmp / SPEC_FILE, model)
            for name, steering in self.controls.items():
                steering.save(tmp / CONTROL_FILES[name], model)
            (tmp / REPORT_FILE).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
            (tmp / MARKDOWN_FILE).write_text(self.markdown(), encoding="utf-8")
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, *, allow_other_weights: bool = False) -> AutosteerResult:
        """Read a directory written by :meth:`save`; given ``model``, its spec files are checked
        against it (refused for another model, as vector files are).

        Args:
            path: the directory.
            model: the model the steering will be used on (None: no check).
            allow_other_weights: accept a model with other weights of the same architecture.
        """
        path = Path(path)
        report = path / REPORT_FILE
        if not report.is_file():
            raise AutosteerError(f"{path} has no {REPORT_FILE}: not a directory written by autosteer")
        data = json.loads(report.read_text(encoding="utf-8"))
        if data.get("format") != "persona-guard/autosteer":
            raise AutosteerError(f"{report} is not an autosteer report")
        steering = Steering.load(path / SPEC_FILE, model, allow_other_weights=allow_other_weights)
        controls = {name: Steering.load(path / file, model, allow_other_weights=allow_other_weights)
                    for name, file in CONTROL_FILES.items() if (path / file).is_file()}
        latents = [LatentRecord.from_dict({k: v for k, v in d.items() if k != "strength"}) for d in data["latents"]]
        return cls(data["description"], AutosteerConfig.from_dict(data["config"]), data["model"], data["sae"],
                   data["prompts"], latents, [float(d["strength"]) for d in data["latents"]],
                   [LatentRecord.from_dict(r) for r in data["records"]], data["retrieval"],
                   {k: SearchResult.from_dict(s) for k, s in data["searches"].items()},
                   [ConditionReport.from_dict(c) for c in data["conditions"]],
                   {name: {k: Estimate.from_dict(e) for k, e in d.items()} for name, d in data["comparisons"].items()},
                   dict(data["timings"]), steering, controls, data.get("judge"), data.get("proposer"))

    def markdown(self) -> str:
        """The report as Markdown: the latents, a table per metric with CIs, and greedy samples."""
        level = f"{self.config.level:.0%}"
        lines = [f"# Auto-steering: {self.description}", "",
                 (f"Model {self.model}; SAE {self.sae.get('source')} at layer {self.sae.get('layer')} "
                 f"({self.sae.get('d_sae')} latents). Tuned on {len(self.prompts['dev'])} dev prompts, reported on "
                 f"{len(self.prompts['test'])} held-out test prompts (never used for selection or tuning). "
                 f"Means with {level} bootstrap CIs; differences are paired over the same prompts."), "",
                 "## Latents", "", ("| latent | rule | picked by | strength | density | mean diff | AUROC | cosine | "
                 "output score | snippets |"), "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
        strengths = {r.latent: s for r, s in zip(self.latents, self.strengths)}
        for r in self.records:
            strength = f"{strengths[r.latent]:.3f}" if r.latent in strengths else ""
            score = "" if r.output_score is None else f"{r.output_score:+.3f}"
            au = "" if r.auroc is None else f"{r.auroc:.2f}"
            snippets = " / ".join(s.replace("|", "\\|") for s in r.snippets)
            lines.append(f"| {r.latent} | {r.status}: {r.rule} | {', '.join(r.picked_by)} | {strength} | "
                         f"{r.density:.3f} | {r.mean_difference:+.3f} | {au} | {r.cosine:+.2f} | {score} | {snippets} |")
        for key in REPORT_METRICS:
            lines += ["", f"## {key}", "", METRIC_NOTES[key], "",
                      f"| condition | mean [{level} CI] | minus none | autosteer minus it |", "|---|---:|---:|---:|"]
            for c in self.conditions:
                if key not in c.estimates:
                    continue
                diff = c.vs_none.get(key)
                versus = self.comparisons.get(c.name, {}).get(key)
                lines.append(f"| {c.name} | {c.estimates[key].format()} | {diff.format() if diff else ''} | "
                             f"{versus.format() if versus else ''} |")
        lines += ["", "## Greedy samples (test prompts)", ""]
        for c in self.conditions:
            for prompt, answer in c.samples:
                lines.append(f"- **{c.name}** — *{prompt}* → {answer!r}")
        lines += ["", "## Time per stage", ""] + [f"- {k}: {v:.1f} s" for k, v in self.timings.items()]
        return "\n".join(lines) + "\n"


# --- the run ---------------------------------------------------------------------------------------


def _control_latents(retrieval_density: torch.Tensor, chosen: list[LatentRecord], excluded: set[int], max_density: float,
                     seed: int) -> list[int]:
    """As many random latents as chosen ones, from those firing in the chosen latents' density
    band (half the lowest to twice the highest density), never dead, dense or chosen; the band
    widens to every usable latent when it holds too few."""
    low = min(r.density for r in chosen) / 2
    high = min(max(r.density for r in chosen) * 2, max_density)
    usable = [i for i, d in enumerate(retrieval_density.tolist()) if 0 < d <= max_density and i not in excluded]
    band = [i for i in usable if low <= retrieval_density[i] <= high]
    pool = band if len(band) >= len(chosen) else usable
    if len(pool) < len(chosen):
        raise AutosteerError("the SAE has too few usable latents for a random-latent control")
    return random.Random(seed).sample(pool, len(chosen))


@contextmanager
def _stage(name: str, timings: dict, on_stage, log):
    if on_stage is not None:
        on_stage(name)
    log(f"{name}...")
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 3)


def autosteer(model, tokenizer, sae, description: str, config: AutosteerConfig = AutosteerConfig(), *,
              layer: int | None = None, sae_source: str | None = None, judge=None, pairs=None,
              proposer=None, allow_other_weights: bool = False,
              layer_path: str | None = None, progress: bool = False, log: Callable[[str], None] = lambda m: None,
              on_stage: Callable[[str], None] | None = None) -> AutosteerResult:
    """Find SAE latents and strengths that make the model behave as ``description`` says, and
    report the result on held-out prompts (see the module docstring).

    Args:
        model, tokenizer: the model and its tokenizer.
        sae: a loaded SAE (:func:`guard.sae.lens.load_sae`); checked against the model here.
        description: the behaviour in a sentence, e.g. "Talk like a pirate."
        config: the settings.
        layer: the layer the SAE reads (None: the SAE's own).
        sae_source: where the SAE came from, for the report and the spec.
        judge: a :class:`~guard.judges.Judge` scoring the concept of greedy answers (None: judge-free).
        pairs: held-out ``(prompt, reply showing the behaviour, neutral reply)`` triples
            (:func:`guard.measure.evaluate.load_pairs`), read only by the report (``pair_gap``);
            none may share a prompt with the dev prompts.
        proposer: a :class:`~guard.autosteer.proposer.ChatProposer` that proposes the chosen
            latents' strengths from the past trials (the hackathon's loop) instead of the
            coordinate search; the best judged strengths are kept either way.
        allow_other_weights: accept an SAE trained on other weights of the same model.
        layer_path: the decoder-block list, when auto-discovery needs help.
        progress: show progress bars.
        log: progress messages.
        on_stage: called with each stage's name as it starts.
    """
    from ..sae.lens import check_sae

    description = (description or "").strip()
    if not description:
        raise AutosteerError("the description is empty; describe the behaviour in a sentence, e.g. "
                             "\"Talk like a pirate.\"")
    layer = check_sae(sae, model, layer, allow_other_weights=allow_other_weights)
    split = load_prompt_bank(config.prompt_bank).take(config.n_dev, config.n_test)
    pairs = [tuple(p) for p in pairs] if pairs else None
    if pairs:
        tuned_on = sorted({p[0] for p in pairs} & set(split.dev))
        if tuned_on:
            raise AutosteerError(f"{len(tuned_on)} held-out pair(s) share a prompt with the dev prompts tuning reads "
                                 f"(first: {tuned_on[0]!r}); drop them from the pairs or use another --prompts bank")
    neutral = config.neutral_system or None
    rubric = concept_rubric(description) if judge is not None else None
    timings: dict[str, float] = {}
    common = {"neutral_system": neutral, "max_new_tokens": config.max_new_tokens,
              "concept_temperature": config.concept_temperature, "judge": judge, "rubric": rubric,
              "batch_size": config.batch_size}

    def dev_only(prompts):
        ensure_dev_only(prompts, split, "latent selection and tuning")

    with _stage("dev data", timings, on_stage, log):
        dev_only(split.dev)
        dev = build_contrastive(model, tokenizer, split.dev, description, "dev", neutral_system=config.neutral_system,
                                max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, progress=progress)
        dev_ref = reference(model, tokenizer, dev, neutral, batch_size=config.batch_size)
    with _stage("retrieval", timings, on_stage, log):
        found = retrieve_latents(model, tokenizer, sae, layer, dev, k=config.k, candidates=config.candidates,
                                 cosine_candidates=config.cosine_candidates, max_density=config.max_density,
                                 min_output_score=config.min_output_score, probe_strength=config.probe_strength,
                                 neutral_system=neutral, positions=config.positions, batch_size=config.batch_size,
                                 layer_path=layer_path, check_prompts=dev_only, progress=progress)
    chosen = found.chosen
    latents, signs = [r.latent for r in chosen], [r.sign for r in chosen]

    def tune(name: str, make: Callable[[tuple[float, ...]], Steering], n: int, one: bool = False,
             max_strength: float = config.max_strength, propose=None) -> SearchResult:
        dev_only(dev.prompts)
        bar = tqdm(total=config.budget, desc=f"tuning {name}", disable=not progress, unit="trial")

        def objective(strengths):
            # The same context as the reported "autosteer" condition: the neutral system prompt.
            scores = score_condition(model, tokenizer, dev, dev_ref, system=neutral, steering=make(strengths), **common)
            score, components = mean_score(scores)
            if propose is not None:  # what the proposer reads of each trial: a few answers
                components["samples"] = [[p, a] for p, a in list(zip(dev.prompts, scores.answers))[:2]]
            return score, components
        try:
            if propose is not None:
                return search_with_proposer(objective, n, propose, budget=config.budget, max_strength=max_strength,
                                            seed=config.seed, on_trial=lambda t: bar.update(1))
            if one:
                return search_one_strength(lambda s: objective((s,)), budget=config.budget, max_strength=max_strength,
                                           seed=config.seed, on_trial=lambda t: bar.update(1))
            return search_strengths(objective, n, budget=config.budget, max_strength=max_strength, seed=config.seed,
                                    on_trial=lambda t: bar.update(1))
        finally:
            bar.close()

    def latent_maker(which, which_signs):
        return lambda strengths: latent_steering(sae, layer, which, which_signs, strengths, found.residual_norm,
                                                 positions=config.positions, layer_path=layer_path)

    searches: dict[str, SearchResult] = {}
    with _stage("tuning", timings, on_stage, log):
        propose = proposer.for_latents(description, chosen, config.max_strength) if proposer is not None else None
        searches["autosteer"] = tune("autosteer", latent_maker(latents, signs), len(latents), propose=propose)
    strengths = list(searches["autosteer"].best.strengths)
    sae_info = {"source": str(sae_source) if sae_source is not None else None, "layer": layer,
                "d_sae": int(sae.cfg.d_sae), "d_in": int(sae.cfg.d_in)}
    steering_info = {"method": "sae-autosteer", "concept": description, "sae": sae_info,
                     "residual_norm": found.residual_norm,
                     "latents": [{"latent": r.latent, "sign": r.sign, "strength": s, "picked_by": r.picked_by,
                                  "output_score": r.output_score, "top_tokens": r.top_tokens, "snippets": r.snippets}
                                 for r, s in zip(chosen, strengths)],
                     "dev_score": searches["autosteer"].best.components, "settings": config.to_dict()}
    steering = latent_steering(sae, layer, latents, signs, strengths, found.residual_norm, positions=config.positions,
                               description=steering_info, layer_path=layer_path)
    controls: dict[str, Steering] = {}
    if config.tune_diffmean:
        unit = found.diffmean / found.diffmean.norm().clamp_min(1e-12)

        def diffmean_maker(s):
            return Steering({layer: unit * found.residual_norm * s[0]}, 1.0, config.positions, "add",
                            {"method": "diffmean", "concept": description, "layer": layer}, layer_path)
        with _stage("tuning diffmean", timings, on_stage, log):
            searches["diffmean"] = tune("diffmean", diffmean_maker, 1, one=True,
                                        max_strength=config.max_strength * math.sqrt(len(latents)))
        controls["diffmean"] = diffmean_maker(searches["diffmean"].best.strengths)
    control_ids = _control_latents(found.density, chosen, {r.latent for r in found.records},
                                   config.max_density, config.seed)
    control_signs = [1.0] * len(control_ids)
    control_info = {"method": "random-latent control", "concept": description, "latents": control_ids,
                    "sae": sae_info}
    with _stage("tuning control", timings, on_stage, log):
        if config.control == "tuned":
            searches["random latents"] = tune("random latents", latent_maker(control_ids, control_signs),
                                              len(control_ids))
            control_strengths = list(searches["random latents"].best.strengths)
            control = latent_steering(sae, layer, control_ids, control_signs, control_strengths, found.residual_norm,
                                      positions=config.positions, description=control_info, layer_path=layer_path)
        else:
            control = latent_steering(sae, layer, control_ids, control_signs, strengths, found.residual_norm,
                                      positions=config.positions, description=control_info, layer_path=layer_path)
            own, theirs = float(steering.vectors[layer].norm()), float(control.vectors[layer].norm())
            control = Steering({layer: control.vectors[layer] * (own / theirs if theirs > 0 else 0.0)}, 1.0,
                               config.positions, "add", control_info, layer_path)
    controls["random latents"] = control

    with _stage("test data", timings, on_stage, log):
        test = build_contrastive(model, tokenizer, split.test, description, "test",
                                 neutral_system=config.neutral_system, max_new_tokens=config.max_new_tokens,
                                 batch_size=config.batch_size, progress=progress)
        test_ref = reference(model, tokenizer, test, neutral, batch_size=config.batch_size)
    with _stage("report", timings, on_stage, log):
        conditions = [("none", neutral, None), ("prompt", description, None), ("autosteer", neutral, steering),
                      ("prompt + autosteer", description, steering)]
        conditions += [(name, neutral, controls[name]) for name in ("diffmean", "random latents") if name in controls]
        reports = _report(model, tokenizer, test, test_ref, conditions, config, common, progress, pairs)
    stats = {"n_boot": config.n_boot, "level": config.level, "seed": config.seed}
    autosteered = next(c for c in reports if c.name == "autosteer")
    comparisons = {c.name: {k: paired_difference(autosteered.values[k], v, **stats) for k, v in c.values.items()}
                   for c in reports if c.name != "autosteer"}
    prompts = {"source": split.source, "dev": list(dev.prompts), "test": list(test.prompts),
               "dropped": {"dev": dev.dropped, "test": test.dropped}}
    retrieval_info = {k: v for k, v in found.to_dict().items() if k != "records"}
    if pairs:
        prompts["pairs"] = len(pairs)
    return AutosteerResult(description, config, model_name(model), sae_info, prompts, chosen, strengths, found.records,
                           retrieval_info, searches, reports, comparisons, timings, steering, controls,
                           getattr(judge, "name", None) if judge is not None else None,
                           getattr(proposer, "name", None) if proposer is not None else None)


def _report(model, tokenizer, test: ContrastiveSet, ref: Reference, conditions, config: AutosteerConfig, common: dict,
            progress: bool, pairs=None) -> list[ConditionReport]:
    """Every condition's per-prompt scores and capability on the test set, with CIs and differences vs ``none``."""
    stats = {"n_boot": config.n_boot, "level": config.level, "seed": config.seed}
    reports = []
    for name, system, steering in tqdm(conditions, desc="report", disable=not progress, unit="condition"):
        scores = score_condition(model, tokenizer, test, ref, system=system, steering=steering, **common)
        values = {k: list(scores.values[k]) for k in REPORT_METRICS if k in scores.values}
        if pairs:
            values["pair_gap"] = list(pairwise_preference(model, tokenizer, pairs, system=system, steering=steering,
                                                          batch_size=config.batch_size).gaps)
        values["capability"] = neutral_logliks(model, tokenizer, system=system, steering=steering,
                                               batch_size=config.batch_size)
        described = None
        if steering is not None:
            described = {"method": steering.description.get("method"), "layers": sorted(steering.vectors),
                         "positions": steering.positions,
                         "norm": round(float(next(iter(steering.vectors.values())).norm()), 5)}
        samples = [[p, a] for p, a in list(zip(test.prompts, scores.answers))[:config.samples]]
        reports.append(ConditionReport(name, system, described, values, samples=samples))
    base = reports[0]
    for report in reports:
        report.estimates = {k: bootstrap_ci(v, **stats) for k, v in report.values.items()}
        if report is not base:
            report.vs_none = {k: paired_difference(v, base.values[k], **stats) for k, v in report.values.items()}
    return reports
