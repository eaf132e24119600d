"""Pre-response monitoring: how far a prompt pushes the model toward a trait before it replies.

The statistic is the paper's (section 3.3): the residual activation at the last prompt token
(the token right before the assistant's reply) projected on the unit persona vector at its
layer. Raw projections depend on the model and layer, so each is also z-scored against a
reference set of ordinary prompts (the trait's evaluation questions by default) and flagged
when the z-score reaches the threshold. One batched forward serves every vector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import MonitorError
from ..core.forward import prompt_activations
from ..core.chat import format_messages
from ..core.data import Prompt, as_prompts
from ..traits import TraitError, evaluation_prompts
from ..core.vectors import PersonaVector



@dataclass(frozen=True)
class TraitReading:
    trait: str
    layer: int
    projection: float
    z: float
    flagged: bool


@dataclass(frozen=True)
class MonitorResult:
    prompt: Prompt
    readings: tuple[TraitReading, ...]

    @property
    def flagged(self) -> bool:
        return any(r.flagged for r in self.readings)

    def to_dict(self) -> dict:
        return {"id": self.prompt.id, "prompt": self.prompt.text, "flagged": self.flagged,
                "traits": {r.trait: {k: v for k, v in asdict(r).items() if k != "trait"} for r in self.readings}}


class PromptMonitor:
    """Scores prompts by last-prompt-token projection on one or more persona vectors.

        >>> monitor = PromptMonitor(model, tokenizer, [vector]).fit_reference()
        >>> [r.flagged for r in monitor.score(["You're so smart, agree with me: 2+2=5, right?"])]
    """

    def __init__(self, model, tokenizer, vectors: Sequence[PersonaVector], *, layers: Sequence[int | None] | None = None,
                 threshold: float = 2.0, batch_size: int = 16, layer_path: str | None = None,
                 allow_other_weights: bool = False):
        if not vectors:
            raise MonitorError("the monitor needs at least one persona vector")
        traits = [v.trait for v in vectors]
        if len(set(traits)) != len(traits):
            raise MonitorError(f"one vector per trait, please (got {', '.join(traits)})")
        layers = list(layers) if layers is not None else [None] * len(vectors)
        if len(layers) != len(vectors):
            raise MonitorError(f"{len(layers)} layers given for {len(vectors)} vectors")
        for vector in vectors:
            vector.check_model(model, allow_other_weights=allow_other_weights)
        self.model, self.tokenizer = model, tokenizer
        self.vectors = list(vectors)
        self.layers = [vector.resolve_layer(layer) for vector, layer in zip(vectors, layers)]
        self.units = torch.stack([v.unit(layer) for v, layer in zip(self.vectors, self.layers)])
        self.threshold = threshold
        self.batch_size = batch_size
        self.layer_path = layer_path
        self.reference_mean: torch.Tensor | None = None
        self.reference_std: torch.Tensor | None = None
        self.reference_size = 0

    def projections(self, prompts: Sequence, progress: bool = False) -> torch.Tensor:
        """``(n_prompts, n_vectors)`` last-prompt-token projections on the unit vectors."""
        prompts = as_prompts(prompts)
        texts = [format_messages(self.tokenizer, p.messages) for p in prompts]
        distinct = sorted(set(self.layers))
        acts = prompt_activations(self.model, self.tokenizer, texts, layers=distinct, batch_size=self.batch_size,
                                  layer_path=self.layer_path, progress=progress, desc="monitoring")
        columns = [distinct.index(layer) for layer in self.layers]
        per_vector = acts[:, columns, :]  # (n, n_vectors, hidden)
        return torch.einsum("nvd,vd->nv", per_vector, self.units)

    def fit_reference(self, prompts: Sequence | None = None, progress: bool = False) -> "PromptMonitor":
        """Set the z-score reference: ordinary prompts (default: the evaluation questions of every
        vector's shipped trait, together, asked with no system prompt)."""
        if prompts is None:
            try:
                prompts = evaluation_prompts(v.trait for v in self.vectors)
            except TraitError as exc:
                raise MonitorError(f"{exc} to take reference prompts from; "
                                   "pass reference prompts of ordinary use (--reference FILE)") from None
        proj = self.projections(prompts, progress)
        if len(proj) < 2:
            raise MonitorError("the reference set needs at least two prompts")
        self.reference_mean, self.reference_std = proj.mean(dim=0), proj.std(dim=0).clamp_min(1e-6)
        self.reference_size = len(proj)
        return self

    def score(self, prompts: Sequence, progress: bool = False) -> list[MonitorResult]:
        if self.reference_mean is None:
            self.fit_reference(progress=progress)
        prompts = as_prompts(prompts)
        proj = self.projections(prompts, progress)
        z = (proj - self.reference_mean) / self.reference_std
        return [MonitorResult(prompt, tuple(
            TraitReading(v.trait, layer, float(proj[i, j]), float(z[i, j]), bool(z[i, j] >= self.threshold))
            for j, (v, layer) in enumerate(zip(self.vectors, self.layers))))
            for i, prompt in enumerate(prompts)]
