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
from ..core.data import Prompt, as_prompts
from ..core.readout import Readout
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

    Args:
        model, tokenizer: the model watched.
        vectors: one persona vector per trait (checked against the model when loaded; a vector
            never checked is checked strictly here).
        layers: a layer per vector (None: each vector's recommended layer).
        threshold: flag a prompt when a trait's z-score reaches this.
        batch_size: prompts per forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """

    def __init__(self, model, tokenizer, vectors: Sequence[PersonaVector], *, layers: Sequence[int | None] | None = None,
                 threshold: float = 2.0, batch_size: int = 16, layer_path: str | None = None):
        if not vectors:
            raise MonitorError("the monitor needs at least one persona vector")
        for vector in vectors:
            vector.ensure_fits(model)
        self.readout = Readout(vectors, layers, batch_size=batch_size, layer_path=layer_path, error=MonitorError)
        self.model, self.tokenizer = model, tokenizer
        self.vectors, self.layers, self.units = self.readout.vectors, self.readout.layers, self.readout.units
        self.threshold = threshold
        self.reference_mean: torch.Tensor | None = None
        self.reference_std: torch.Tensor | None = None
        self.reference_size = 0

    def projections(self, prompts: Sequence, progress: bool = False) -> torch.Tensor:
        """``(n_prompts, n_vectors)`` last-prompt-token projections on the unit vectors.

        Args:
            prompts: user messages, conversations (lists of messages), records or :class:`Prompt` objects.
            progress: show a progress bar.
        """
        return self.readout(self.model, self.tokenizer, prompts, progress=progress, desc="monitoring")

    def fit_reference(self, prompts: Sequence | None = None, progress: bool = False) -> "PromptMonitor":
        """Set the z-score reference: ordinary prompts (default: the evaluation questions of every
        vector's shipped trait, together, asked with no system prompt).

        Args:
            prompts: at least two reference prompts, in any form :meth:`projections` takes (None: the
                default above; a trait that is not shipped then raises :class:`MonitorError`).
            progress: show a progress bar.
        """
        if prompts is None:
            try:
                prompts = evaluation_prompts(v.trait for v in self.vectors)
            except TraitError as exc:
                raise MonitorError(f"{exc} to take reference prompts from; "
                                   "pass reference prompts of ordinary use (--reference FILE)") from None
        if len(prompts) < 2:
            raise MonitorError(f"the reference set has {len(prompts)} prompt(s); it needs at least two")
        proj = self.projections(prompts, progress)
        self.reference_mean, self.reference_std = proj.mean(dim=0), proj.std(dim=0).clamp_min(1e-6)
        self.reference_size = len(proj)
        return self

    def score(self, prompts: Sequence, progress: bool = False) -> list[MonitorResult]:
        """One :class:`MonitorResult` per prompt (the reference is fitted first if it was not).

        Args:
            prompts: the prompts to score, in any form :meth:`projections` takes.
            progress: show progress bars.
        """
        if self.reference_mean is None:
            self.fit_reference(progress=progress)
        prompts = as_prompts(prompts)
        if not prompts:
            raise MonitorError("no prompts to monitor")
        proj = self.projections(prompts, progress)
        z = (proj - self.reference_mean) / self.reference_std
        return [MonitorResult(prompt, tuple(
            TraitReading(v.trait, layer, float(proj[i, j]), float(z[i, j]), bool(z[i, j] >= self.threshold))
            for j, (v, layer) in enumerate(zip(self.vectors, self.layers))))
            for i, prompt in enumerate(prompts)]

    def report(self, results: Sequence[MonitorResult]) -> dict:
        """The monitor's result as one JSON-ready dict: threshold, reference statistics, the number
        flagged and every prompt's readings (what ``persona-guard monitor --json`` prints).

        Args:
            results: what :meth:`score` returned.
        """
        return {"threshold": self.threshold, "reference_size": self.reference_size,
                "reference": {v.trait: {"mean": float(m), "std": float(s)} for v, m, s in
                              zip(self.vectors, self.reference_mean, self.reference_std)},
                "flagged": sum(r.flagged for r in results), "results": [r.to_dict() for r in results]}
