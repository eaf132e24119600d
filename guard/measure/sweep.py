"""Steering sweeps: trait effect and coherence per coefficient, and choosing the layer to steer.

Everything here is judge-free by default, so it runs offline:

* trait effect: the pairwise-preference gap on the trait's example pairs (how much likelier the
  trait answer becomes than the non-trait one, in nats per token);
* coherence: the mean log-likelihood of both answers of every pair (it falls when steering
  damages the model), and, when questions are given, the repetition rate of greedy answers.

A judge, when given, adds trait and coherence scores of those answers. Layer selection follows
the paper (steer each layer with the same coefficient, keep the layer with the largest trait
effect) with a coherence gate, on half of the example pairs; the other half stays held out
for reporting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from ..errors import SelectionError
from ..core.chat import format_prompt
from .behavior import ab_behavior_rate, pairwise_preference
from ..core.generation import SamplingConfig, encode, generate
from ..judges import COHERENCE_RUBRIC, Judge
from ..core.stats import repetition_rate
from ..core.steering import Steering
from ..core.vectors import PersonaVector


SELECTION_COEFF = 4.0
MAX_COHERENCE_DROP = 0.25  # nats/token lost on the pair answers; past ~0.5 SmolLM2 starts looping


def split_examples(examples: Sequence) -> tuple[list, list]:
    """(selection, held-out): alternate pairs, so both halves cover the whole example list.
    Fewer than four pairs cannot be split usefully; both halves are then all of them."""
    examples = list(examples)
    if len(examples) < 4:
        return examples, examples
    return examples[0::2], examples[1::2]


@dataclass
class SweepPoint:
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

    def to_dict(self) -> dict:
        return asdict(self)


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
    log: Callable[[str], None] = lambda message: None,
) -> list[SweepPoint]:
    """Measure the trait metric and coherence at every coefficient (one :class:`SweepPoint` each)."""
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
        if random_control:
            control = pairwise_preference(model, tokenizer, pairs, steering=steering.random_like(random_seed),
                                          batch_size=batch_size)
            point.random_gap, point.random_loglik = control.mean_gap, control.mean_loglik
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


@dataclass
class LayerSelection:
    layer: int
    coeff: float
    max_coherence_drop: float
    effect: dict[int, float]  # gap(+coeff) - gap(0) per layer
    coherence_drop: dict[int, float]  # loglik(0) - loglik(+coeff) per layer
    gated: bool  # False when no layer stayed within the coherence limit (the least damaging was taken)
    n_pairs: int

    def to_dict(self) -> dict:
        data = asdict(self)
        data["effect"] = {str(k): round(v, 5) for k, v in self.effect.items()}
        data["coherence_drop"] = {str(k): round(v, 5) for k, v in self.coherence_drop.items()}
        data["metric"] = "pairwise_preference"
        return data


def default_candidate_layers(num_layers: int, max_candidates: int = 10) -> list[int]:
    """Layers from 20% to 80% of the depth, thinned to at most ``max_candidates``: steering the
    first few blocks barely moves behaviour and the last few mostly break fluency."""
    low, high = max(0, round(0.2 * num_layers)), min(num_layers - 1, round(0.8 * num_layers))
    span = list(range(low, high + 1))
    step = max(1, -(-len(span) // max_candidates))
    return span[::step]


def select_layer(
    model, tokenizer, vector: PersonaVector, pairs: Sequence, *, layers: Sequence[int] | None = None,
    coeff: float = SELECTION_COEFF, max_coherence_drop: float = MAX_COHERENCE_DROP, positions: str = "all",
    batch_size: int = 16, layer_path: str | None = None, log: Callable[[str], None] = lambda message: None,
) -> LayerSelection:
    """Steer each candidate layer by ``coeff``; pick the largest trait effect among layers whose
    coherence drop stays within ``max_coherence_drop`` (the least damaging layer if none does)."""
    layers = list(layers) if layers is not None else default_candidate_layers(vector.num_layers)
    if not layers:
        raise SelectionError("no candidate layers to select from")
    base = pairwise_preference(model, tokenizer, pairs, batch_size=batch_size)
    effect, drop = {}, {}
    for layer in layers:
        steered = pairwise_preference(model, tokenizer, pairs, batch_size=batch_size,
                                      steering=Steering.from_vector(vector, layer, coeff, positions, layer_path))
        effect[layer] = steered.mean_gap - base.mean_gap
        drop[layer] = base.mean_loglik - steered.mean_loglik
        log(f"layer {layer}: effect {effect[layer]:+.3f}, coherence drop {drop[layer]:+.3f}")
    acceptable = [layer for layer in layers if drop[layer] <= max_coherence_drop]
    if acceptable:
        best = max(acceptable, key=lambda layer: effect[layer])
    else:
        best = min(layers, key=lambda layer: drop[layer])
    return LayerSelection(best, coeff, max_coherence_drop, effect, drop, bool(acceptable), len(pairs))


def record_selection(vector: PersonaVector, selection: LayerSelection) -> None:
    """Store the chosen layer in the vector's metadata (save the vector afterwards)."""
    vector.meta.recommended_layer = selection.layer
    vector.meta.layer_stats["selection"] = selection.to_dict()


def select_and_record(model, tokenizer, vector: PersonaVector, trait, **kwargs) -> LayerSelection:
    """Layer selection on the selection half of ``trait``'s example pairs, stored in ``vector``."""
    selection_pairs, _ = split_examples(trait.examples)
    if len(selection_pairs) < 2:
        raise SelectionError(f"trait {trait.name!r} has {len(trait.examples)} example pair(s); layer selection needs "
                         "at least 2 (add 'examples' to the trait file, or pass a layer explicitly)")
    selection = select_layer(model, tokenizer, vector, selection_pairs, **kwargs)
    record_selection(vector, selection)
    return selection
