"""Persona-vector extraction (Chen et al. 2025, section 2.2).

For every instruction pair and extraction question the model answers twice as often as asked:
under the trait-positive system prompt and under the trait-negative one. Optionally a judge keeps
only answers that actually show (or avoid) the trait. For every layer the vector is the mean over
positive answers of their mean response-token activation, minus the same for negative answers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..errors import ExtractionError
from ..core.forward import sequence_activations
from ..core.chat import format_prompt
from ..core.generation import SamplingConfig, encode, generate
from ..judges import JudgeFilter
from ..traits import Trait
from ..core.vectors import PersonaVector, metadata_for



@dataclass(frozen=True)
class ExtractionConfig:
    samples_per_prompt: int = 1  # rollouts per (instruction pair, question, polarity)
    max_questions: int | None = None  # None = all extraction questions of the trait
    max_pairs: int | None = None  # None = all instruction pairs
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generation_batch_size: int = 64
    forward_batch_size: int = 32
    layer_path: str | None = None

    @classmethod
    def preset(cls, name: str) -> "ExtractionConfig":
        """``default``: every question and pair, 1 rollout of up to 96 tokens (about 5 minutes for the
        embedded model on 2 CPU cores). ``fast``: 10 questions, answers of up to 48 tokens (about a
        minute) that still give a usable direction.

        Args:
            name: ``"default"`` or ``"fast"``; anything else raises ``ValueError``.
        """
        if name == "default":
            return cls()
        if name == "fast":
            return cls(max_questions=10, sampling=SamplingConfig(max_new_tokens=48))
        raise ValueError(f"unknown preset {name!r}; choose default or fast")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rollout:
    positive: bool
    pair: int
    question: str
    prompt: str
    response: str
    response_ids: list[int]
    score: float | None = None
    coherence: float | None = None
    kept: bool = True


@dataclass
class Extraction:
    vector: PersonaVector
    samples: list[Rollout]


def _cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-layer effect size of ``(n, layers)`` projections (pooled standard deviation)."""
    var = (pos.var(dim=0, unbiased=True) * (len(pos) - 1) + neg.var(dim=0, unbiased=True) * (len(neg) - 1))
    pooled = (var / max(len(pos) + len(neg) - 2, 1)).sqrt().clamp_min(1e-12)
    return (pos.mean(dim=0) - neg.mean(dim=0)) / pooled


def extract_vector(
    model,
    tokenizer,
    trait: Trait,
    config: ExtractionConfig = ExtractionConfig(),
    *,
    judge: JudgeFilter | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Extraction:
    """Generate contrasting answers, filter them, and build the per-layer persona vector.

    Args:
        model, tokenizer: the model the vector is extracted from and its tokenizer.
        trait: the trait, whose instruction pairs and extraction questions are used.
        config: how many questions, pairs and rollouts, sampling, batch sizes and the layer path.
        judge: keeps only the answers that pass its trait and coherence rules (see :class:`JudgeFilter`;
            None: keep every non-empty answer).
        progress: show progress bars for generation and activation reading.
        log: called with a line about each stage.
    """
    pairs = trait.instruction_pairs[: config.max_pairs]
    questions = trait.extraction_questions[: config.max_questions]
    samples: list[Rollout] = []
    prompts: list[str] = []
    for positive in (True, False):
        for index, pair in enumerate(pairs):
            for question in questions:
                prompt = format_prompt(tokenizer, question, pair.pos if positive else pair.neg)
                for _ in range(config.samples_per_prompt):
                    samples.append(Rollout(positive, index, question, prompt, "", []))
                    prompts.append(prompt)
    log(f"generating {len(samples)} answers ({len(pairs)} pairs x {len(questions)} questions x "
        f"{config.samples_per_prompt} rollouts x 2 polarities)")
    prompt_ids = encode(tokenizer, prompts)
    response_ids = generate(model, tokenizer, prompt_ids, config.sampling,
                            batch_size=config.generation_batch_size, progress=progress, desc="generating answers")
    for sample, ids in zip(samples, response_ids):
        sample.response = tokenizer.decode(ids, skip_special_tokens=True)
        sample.response_ids = ids
        sample.kept = len(ids) > 0

    if judge is not None:
        for sample in samples:
            if sample.kept:
                sample.score = judge.judge.score(sample.question, sample.response, trait.judge_rubric)
                # Coherence is only asked where the trait rule passed: judge calls can cost money.
                if judge.coherence_threshold is not None and judge.trait_ok(sample.score, sample.positive):
                    sample.coherence = judge.judge.score(sample.question, sample.response, judge.coherence_rubric)
                sample.kept = judge.keep(sample.score, sample.positive, sample.coherence)
    kept = [i for i, s in enumerate(samples) if s.kept]
    n_pos = sum(samples[i].positive for i in kept)
    n_neg = len(kept) - n_pos
    if n_pos == 0 or n_neg == 0:
        hint = "lower the judge thresholds or generate more rollouts" if judge else \
            "every answer was empty: check the chat template and raise --max-new-tokens"
        raise ExtractionError(
            f"no {'trait-positive' if n_pos == 0 else 'trait-negative'} answers left "
            f"({n_pos} positive, {n_neg} negative kept of {len(samples)}); {hint}")

    log(f"reading activations of {len(kept)} answers at every layer")
    acts = sequence_activations(
        model, [prompt_ids[i] for i in kept], [response_ids[i] for i in kept], position="response_mean",
        batch_size=config.forward_batch_size, layer_path=config.layer_path, progress=progress, desc="reading activations")
    is_pos = torch.tensor([samples[i].positive for i in kept])
    pos_mean, neg_mean = acts[is_pos].mean(dim=0), acts[~is_pos].mean(dim=0)
    vectors = pos_mean - neg_mean  # (layers, hidden)

    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = torch.einsum("nld,ld->nl", acts, units)
    effect = _cohens_d(proj[is_pos], proj[~is_pos]) if min(n_pos, n_neg) > 1 else torch.full((len(units),), float("nan"))

    meta = metadata_for(
        model, trait.name,
        positions="response_mean",
        extraction={
            **config.to_dict(),
            "judge": judge.describe() if judge else None,
            "trait_fingerprint": trait.fingerprint(),
            "trait_source": trait.source,
        },
        counts={
            "pos_generated": sum(s.positive for s in samples), "neg_generated": sum(not s.positive for s in samples),
            "pos_kept": n_pos, "neg_kept": n_neg,
            "empty_dropped": sum(not s.response_ids for s in samples),
            "mean_response_tokens": round(sum(len(s.response_ids) for s in samples) / len(samples), 1),
        },
        layer_stats={"effect_size": [round(float(x), 4) for x in effect]},
    )
    vector = PersonaVector(vectors, meta, pos_mean, neg_mean)
    return Extraction(vector, samples)
