"""Steering sweeps: trait effect and coherence per coefficient.

Everything here is judge-free by default, so it runs offline:

* trait effect: the pairwise-preference gap on the trait's example pairs (how much likelier the
  trait answer becomes than the non-trait one, in nats per token);
* coherence: the mean log-likelihood of both answers of every pair (it falls when steering
  damages the model), and, when questions are given, the repetition rate of greedy answers.

A judge, when given, adds trait and coherence scores of those answers. Choosing the layer is
:mod:`guard.extract.selection`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from ..core.chat import format_prompt
from ..core.generation import SamplingConfig, encode, generate
from ..core.stats import Estimate, bootstrap_ci, paired_difference, repetition_rate
from ..core.steering import Steering
from ..core.vectors import PersonaVector
from ..judges import COHERENCE_RUBRIC, Judge
from .behavior import ab_behavior_rate, pairwise_preference


@dataclass
class SweepPoint:
    """One coefficient of a sweep. ``trait_gap_ci`` is the gap's bootstrap CI over pairs;
    ``gap_vs_random`` the paired difference (steered minus random control, same pairs, same
    coefficient) with its CI: the effect that is the direction's doing."""

    coeff: float
    layer: int
    trait_gap: float  # pairwise-preference gap (nats/token); rises toward the trait
    preference_rate: float
    loglik: float  # mean log-likelihood of all pair answers; the judge-free coherence signal
    random_gap: float | None = None  # the same steering along a random direction of equal norm
    random_loglik: float | None = None
    ab_rate: float | None = None  # A/B behaviour rate, when A/B items are given
    repetition: float | None = None  # of greedy answers to the questions, when given
    judge_trait: float | None = None
    judge_coherence: float | None = None
    samples: list = field(default_factory=list)  # a few (question, answer) for reading
    trait_gap_ci: Estimate | None = None
    random_gap_ci: Estimate | None = None
    gap_vs_random: Estimate | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.gap_vs_random is not None:
            data["gap_vs_random"]["verdict"] = self.gap_vs_random.verdict()
        return data


def _mean_of_scores(values) -> float | None:
    """Mean of the values that are not None (unscorable answers), None when none is left."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def coefficient_sweep(
    model, tokenizer, vector: PersonaVector, pairs: Sequence, coeffs: Sequence[float], *,
    layer: int | None = None, positions: str = "all", random_control: bool = True, random_seed: int = 0,
    ab_items: Sequence | None = None, questions: Sequence[str] | None = None,
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=48, temperature=0.0),
    judge: Judge | None = None, rubric: str | None = None, batch_size: int = 16, layer_path: str | None = None,
    log: Callable[[str], None] = lambda message: None, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> list[SweepPoint]:
    """Measure the trait metric and coherence at every coefficient (one :class:`SweepPoint` each).

    Args:
        model, tokenizer: the model and its tokenizer.
        vector: the persona vector steered along.
        pairs: the example pairs the gap is measured on (the trait's held-out pairs, usually).
        coeffs: the coefficients.
        layer: the layer (default: the vector's recommended one). positions: ``"all"`` or ``"response"``.
        random_control: also steer along a random direction of equal norm at each coefficient.
        random_seed: seeds that direction.
        ab_items: A/B items for the behaviour rate (None: none).
        questions: questions answered greedily for repetition (and judge) scores (None: none).
        sampling: their generation settings.
        judge, rubric: score those answers for the trait (rubric) and coherence.
        batch_size: forward batch size. layer_path: the decoder-block list, when auto-discovery needs help.
        log: progress messages.
        n_boot, level, seed: the bootstrap behind ``trait_gap_ci`` (over pairs) and ``gap_vs_random``
            (the paired difference steered minus random control, same pairs).
    """
    base = Steering.from_vector(vector, layer, 1.0, positions, layer_path)
    (layer_index,) = base.vectors
    prompts = encode(tokenizer, [format_prompt(tokenizer, q) for q in questions]) if questions else None
    if judge is not None and (questions is None or rubric is None):
        raise ValueError("judging needs questions to answer and the trait's rubric")
    points = []
    for coeff in coeffs:
        steering = base.with_coeff(coeff)
        pref = pairwise_preference(model, tokenizer, pairs, steering=steering, batch_size=batch_size)
        point = SweepPoint(coeff, layer_index, pref.mean_gap, pref.preference_rate, pref.mean_loglik)
        stats = dict(n_boot=n_boot, level=level, seed=seed)
        point.trait_gap_ci = bootstrap_ci(pref.gaps, **stats)
        if random_control:
            control = pairwise_preference(model, tokenizer, pairs, steering=steering.random_like(random_seed),
                                          batch_size=batch_size)
            point.random_gap, point.random_loglik = control.mean_gap, control.mean_loglik
            point.random_gap_ci = bootstrap_ci(control.gaps, **stats)
            point.gap_vs_random = paired_difference(pref.gaps, control.gaps, **stats)
        if ab_items:
            point.ab_rate = ab_behavior_rate(model, tokenizer, ab_items, steering=steering,
                                             batch_size=batch_size).behavior_rate
        if prompts:
            with steering.apply(model):
                answers = generate(model, tokenizer, prompts, sampling, batch_size=batch_size * 4)
            point.repetition = _mean_of_scores([repetition_rate(a) for a in answers])
            texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            point.samples = [[q, a] for q, a in zip(questions[:3], texts[:3])]
            if judge is not None:
                point.judge_trait = _mean_of_scores([judge.score(q, a, rubric) for q, a in zip(questions, texts)])
                point.judge_coherence = _mean_of_scores([judge.score(q, a, COHERENCE_RUBRIC) for q, a in zip(questions, texts)])
        log(f"coeff {coeff:+g}: gap {point.trait_gap:+.3f}, loglik {point.loglik:.3f}")
        points.append(point)
    return points
