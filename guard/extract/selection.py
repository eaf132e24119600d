"""Choosing the layer to steer and monitor at (the paper's layer selection, with a coherence gate).

Steer each candidate layer by the same coefficient and keep the one with the largest trait
effect (the pairwise-preference gap on the selection half of the trait's example pairs, see
:meth:`guard.traits.Trait.split`) among layers whose coherence drop stays within a limit. The
held-out half stays untouched for reporting. The choice is stored in the vector file as its
recommended layer, which every command then uses by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from ..core.stats import Estimate, paired_difference
from ..core.steering import Steering
from ..core.vectors import PersonaVector
from ..errors import SelectionError
from ..measure.behavior import pairwise_preference

SELECTION_COEFF = 4.0
MAX_COHERENCE_DROP = 0.25  # nats/token lost on the pair answers; past ~0.5 SmolLM2 starts looping


@dataclass
class LayerSelection:
    """The chosen layer and what every candidate measured. ``effect_ci`` holds, per layer, the
    effect as a paired difference over the pairs (steered gap minus unsteered gap) with its
    bootstrap CI; the rule picks on ``effect`` and does not read it."""

    layer: int
    coeff: float
    max_coherence_drop: float
    effect: dict[int, float]  # gap(+coeff) - gap(0) per layer
    coherence_drop: dict[int, float]  # loglik(0) - loglik(+coeff) per layer
    gated: bool  # False when no layer stayed within the coherence limit (the least damaging was taken)
    n_pairs: int
    effect_ci: dict[int, Estimate] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["effect"] = {str(k): round(v, 5) for k, v in self.effect.items()}
        data["coherence_drop"] = {str(k): round(v, 5) for k, v in self.coherence_drop.items()}
        data["effect_ci"] = {
            str(k): {**{f: round(x, 5) if isinstance(x, float) else x for f, x in e.to_dict().items()},
                     "verdict": e.verdict()}
            for k, e in self.effect_ci.items()}
        data["metric"] = "pairwise_preference"
        return data


def default_candidate_layers(num_layers: int, max_candidates: int = 10) -> list[int]:
    """Layers from 20% to 80% of the depth, thinned to at most ``max_candidates``: steering the
    first few blocks barely moves behaviour and the last few mostly break fluency.

    Args:
        num_layers: the model's decoder layer count.
        max_candidates: how many layers to return at most.
    """
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
    coherence drop stays within ``max_coherence_drop`` (the least damaging layer if none does).

    Args:
        model, tokenizer: the model steered and scored, and its tokenizer.
        vector: the persona vector to steer along.
        pairs: the example pairs scored (as :func:`~guard.measure.behavior.pairwise_preference` takes them).
        layers: the candidate layers (None: :func:`default_candidate_layers` of the vector's layer count).
        coeff: the steering coefficient tried at every layer.
        max_coherence_drop: the largest acceptable drop in mean answer log-likelihood (nats/token).
        positions: the steered positions, ``"all"`` or ``"response"``.
        batch_size: sequences per forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
        log: receives one line per candidate layer (its effect and coherence drop).
    """
    layers = list(layers) if layers is not None else default_candidate_layers(vector.num_layers)
    if not layers:
        raise SelectionError("no candidate layers to select from")
    base = pairwise_preference(model, tokenizer, pairs, batch_size=batch_size)
    effect, drop, effect_ci = {}, {}, {}
    for layer in layers:
        steered = pairwise_preference(model, tokenizer, pairs, batch_size=batch_size,
                                      steering=Steering.from_vector(vector, layer, coeff, positions, layer_path))
        effect[layer] = steered.mean_gap - base.mean_gap
        drop[layer] = base.mean_loglik - steered.mean_loglik
        # Paired over the same pairs; a measurement without per-pair gaps (a stand-in metric) gets none.
        if getattr(steered, "gaps", None) is not None and getattr(base, "gaps", None) is not None:
            effect_ci[layer] = paired_difference(steered.gaps, base.gaps)
        log(f"layer {layer}: effect {effect[layer]:+.3f}, coherence drop {drop[layer]:+.3f}")
    acceptable = [layer for layer in layers if drop[layer] <= max_coherence_drop]
    if acceptable:
        best = max(acceptable, key=lambda layer: effect[layer])
    else:
        best = min(layers, key=lambda layer: drop[layer])
    return LayerSelection(best, coeff, max_coherence_drop, effect, drop, bool(acceptable), len(pairs), effect_ci)


def record_selection(vector: PersonaVector, selection: LayerSelection) -> None:
    """Store the chosen layer in the vector's metadata (save the vector afterwards).

    Args:
        vector: the vector whose metadata is updated.
        selection: the selection; its layer becomes the recommended layer and its record goes in
            the layer stats.
    """
    vector.meta.recommended_layer = selection.layer
    vector.meta.layer_stats["selection"] = selection.to_dict()


def select_and_record(model, tokenizer, vector: PersonaVector, trait, **kwargs) -> LayerSelection:
    """Layer selection on the selection half of ``trait``'s example pairs, stored in ``vector``.

    Args:
        model, tokenizer: the model and its tokenizer.
        vector: the trait's persona vector; its metadata receives the selection.
        trait: the trait (a :class:`~guard.traits.Trait`); at least 2 selection pairs are needed.
        kwargs: passed on to :func:`select_layer` (``layers``, ``coeff``, ``batch_size``, ...).
    """
    selection_pairs = list(trait.split().selection_examples)
    if len(selection_pairs) < 2:
        raise SelectionError(f"trait {trait.name!r} has {len(trait.examples)} example pair(s); layer selection needs "
                         "at least 2 (add 'examples' to the trait file, or pass a layer explicitly)")
    selection = select_layer(model, tokenizer, vector, selection_pairs, **kwargs)
    record_selection(vector, selection)
    return selection
