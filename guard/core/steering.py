"""Inference-time steering: add ``coeff * v`` to the residual stream at chosen layers.

    >>> steering = Steering.from_vector(vector, coeff=4.0)       # the vector's recommended layer
    >>> with steering.apply(model):
    ...     model.generate(...)

``coeff`` is in units of the raw vector (the paper's alpha): ``coeff=1`` moves the activation by
the full mean difference between trait-positive and trait-negative answers at that layer.

Positions:

``all``       every position of every forward pass (prompt, response, padding).
``response``  during ``generate``, the last prompt token and every generated token (the reference
              code's ``response`` mode: the prefill adds at its last position only, each cached
              decoding step adds at its one new token); for a teacher-forced forward over
              ``prompt + response``, pass ``response_mask`` to :meth:`Steering.apply`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Sequence

import torch

from .layers import add_vectors
from .stats import random_directions
from .vectors import PersonaVector

STEER_POSITIONS = ("all", "response")


def _last_position_on_prefill(hidden: torch.Tensor) -> torch.Tensor | None:
    batch, seq = hidden.shape[:2]
    if seq == 1:  # a cached decoding step: the one position is a generated token
        return None
    mask = torch.zeros((batch, seq), device=hidden.device)
    mask[:, -1] = 1  # left padding puts every row's last prompt token here
    return mask


@dataclass(frozen=True)
class Steering:
    """What to add where: ``{layer: raw vector}``, a coefficient and a position mode."""

    vectors: Mapping[int, torch.Tensor]
    coeff: float = 1.0
    positions: str = "all"
    description: dict = field(default_factory=dict, compare=False)
    layer_path: str | None = None  # the decoder-block list, when auto-discovery needs help

    def __post_init__(self):
        if self.positions not in STEER_POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(STEER_POSITIONS)}; got {self.positions!r}")
        if not self.vectors:
            raise ValueError("a steering needs at least one layer")

    @classmethod
    def from_vector(cls, vector: PersonaVector, layers: int | Sequence[int] | None = None, coeff: float = 1.0,
                    positions: str = "all", layer_path: str | None = None) -> "Steering":
        """Steer along ``vector`` at ``layers`` (default: its recommended layer)."""
        if layers is None or isinstance(layers, int):
            layers = [layers]
        resolved = {index: vector.layer(index) for index in map(vector.resolve_layer, layers)}
        return cls(resolved, coeff, positions, {"trait": vector.trait, "layers": sorted(resolved), "coeff": coeff,
                                                 "positions": positions}, layer_path)

    def with_coeff(self, coeff: float) -> "Steering":
        return replace(self, coeff=coeff, description={**self.description, "coeff": coeff})

    def random_like(self, seed: int = 0) -> "Steering":
        """The same steering along random directions of the same norms (the control for any effect)."""
        vectors = {}
        for offset, (layer, vec) in enumerate(sorted(self.vectors.items())):
            vectors[layer] = random_directions(1, vec.numel(), float(vec.norm()), seed + offset)[0]
        return replace(self, vectors=vectors, description={**self.description, "random_seed": seed})

    @contextmanager
    def apply(self, model, *, response_mask: torch.Tensor | None = None,
              layer_path: str | None = None) -> Iterator[None]:
        """Hooks in place for the ``with`` block, removed on exit and on exceptions.

        ``response_mask`` (``(batch, seq)``, 1 on response tokens) is only used in ``response``
        mode, for teacher-forced forwards; steering then also covers the last prompt token,
        which is where the first response token is predicted from.
        """
        mask = None
        if self.positions == "response":
            if response_mask is None:
                mask = _last_position_on_prefill
            else:
                mask = response_mask.clone()
                starts = response_mask.float().argmax(dim=1)
                rows = torch.nonzero(response_mask.any(dim=1)).flatten()
                mask[rows, (starts[rows] - 1).clamp_min(0)] = 1
        with add_vectors(model, self.vectors, self.coeff, mask=mask, layer_path=layer_path or self.layer_path):
            yield


@contextmanager
def steer(model, vector: PersonaVector, layer: int | None = None, coeff: float = 1.0, positions: str = "all",
          *, layer_path: str | None = None) -> Iterator[Steering]:
    """Shortcut: ``with steer(model, vector, coeff=4): ...`` steers at the vector's recommended layer."""
    steering = Steering.from_vector(vector, layer, coeff, positions, layer_path)
    with steering.apply(model):
        yield steering
