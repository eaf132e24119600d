"""The judge interface: anything that scores how strongly an answer shows a trait, 0-100.

Real judges (a local HF model, an OpenAI-compatible endpoint) implement this same protocol;
extraction only needs ``score`` and a ``name`` to record in the vector's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class Judge(Protocol):
    name: str

    def score(self, question: str, answer: str, rubric: str) -> float | None:
        """Trait score in [0, 100] for ``answer`` to ``question`` under the ``rubric`` template
        (with ``{question}`` and ``{answer}`` placeholders); None for a refusal or no usable score."""


@dataclass(frozen=True)
class JudgeFilter:
    """Keep trait-positive answers scoring above ``pos_threshold`` and negative ones below ``neg_threshold``
    (the paper's rule with 50/50). Unscorable answers (None) are dropped."""

    judge: Judge
    pos_threshold: float = 50.0
    neg_threshold: float = 50.0

    def keep(self, score: float | None, positive: bool) -> bool:
        if score is None:
            return False
        return score > self.pos_threshold if positive else score < self.neg_threshold

    def describe(self) -> dict:
        return {"judge": self.judge.name, "pos_threshold": self.pos_threshold, "neg_threshold": self.neg_threshold}
