"""Readouts: activations projected on unit persona vectors, each at its layer.

The drift probe, the pre-response monitor and the data screen all read the same thing: a
model's residual activation at some position, dotted with the unit persona vector of each trait
at that trait's layer. A :class:`Readout` owns that: it resolves each vector's layer (one vector
per trait, recommended layer by default), holds the unit vectors, reads the distinct layers in
one forward per batch, and projects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import LayerError
from .chat import format_messages
from .data import Prompt, as_prompts
from .forward import prompt_activations
from .vectors import PersonaVector


@dataclass(frozen=True)
class ReadKey:
    """One direction read: a vector's trait at one layer. ``name`` labels it in reports (the
    trait, or ``trait@L<layer>`` when a trait is read at several layers)."""

    trait: str
    layer: int
    name: str


class Readout:
    """Projections on persona vectors, each at its layer (or every vector at each of several layers).

    Args:
        vectors: one :class:`PersonaVector` per trait (checked against the model where they were
            loaded; a readout trusts what it is given).
        layers: a layer per vector (None entries: that vector's recommended layer), or None.
        each_at: instead of ``layers``, read every vector at each of these layers.
        batch_size: rows per forward.
        layer_path: the decoder-block list, when auto-discovery needs help.
        error: the error type raised for a bad vector set, so each feature reports in its own terms.
    """

    def __init__(self, vectors: Sequence[PersonaVector], layers: Sequence[int | None] | None = None, *,
                 each_at: Sequence[int] | None = None, batch_size: int = 16, layer_path: str | None = None,
                 error: type[Exception] = LayerError):
        if not vectors:
            raise error("no persona vectors given")
        traits = [v.trait for v in vectors]
        if len(set(traits)) != len(traits):
            repeated = sorted({t for t in traits if traits.count(t) > 1})
            raise error(f"one vector per trait, please (two for {', '.join(repeated)})")
        if each_at:
            per_vector = [list(dict.fromkeys(v.resolve_layer(layer) for layer in each_at)) for v in vectors]
        else:
            layers = list(layers) if layers is not None else [None] * len(vectors)
            if len(layers) != len(vectors):
                raise error(f"{len(layers)} layers given for {len(vectors)} vectors")
            per_vector = [[v.resolve_layer(layer)] for v, layer in zip(vectors, layers)]
        self.vectors, self.keys = [], []
        for vector, chosen in zip(vectors, per_vector):
            for layer in chosen:
                name = vector.trait if len(chosen) == 1 else f"{vector.trait}@L{layer}"
                self.vectors.append(vector)
                self.keys.append(ReadKey(vector.trait, layer, name))
        self.layers = [key.layer for key in self.keys]
        self.units = torch.stack([v.unit(layer) for v, layer in zip(self.vectors, self.layers)])  # (n_keys, d)
        self.norms = [float(v.layer(layer).norm()) for v, layer in zip(self.vectors, self.layers)]
        self.distinct_layers = sorted(set(self.layers))
        self.batch_size = batch_size
        self.layer_path = layer_path

    @property
    def traits(self) -> list[str]:
        return [v.trait for v in self.vectors]

    def texts(self, tokenizer, prompts: Sequence) -> list[str]:
        """Chat-templated texts of prompts (strings, conversations or :class:`Prompt`), ending
        where the reply begins.

        Args:
            tokenizer: the tokenizer whose chat template formats the prompts.
            prompts: user messages, conversations (lists of messages), records or :class:`Prompt` objects.
        """
        return [format_messages(tokenizer, p.messages) for p in as_prompts(prompts)]

    def last_prompt_activations(self, model, tokenizer, texts: Sequence[str], *, progress: bool = False,
                                desc: str = "reading") -> dict[int, torch.Tensor]:
        """``{layer: (n, hidden)}`` last-token activations of templated ``texts`` at every distinct
        layer, from one forward per batch stopped after the deepest of them.

        Args:
            model, tokenizer: the model read and its tokenizer.
            texts: chat-templated prompt texts (see :meth:`texts`).
            progress, desc: show a progress bar, and its label.
        """
        if not texts:
            raise LayerError("no prompts to read")
        acts = prompt_activations(model, tokenizer, list(texts), layers=self.distinct_layers,
                                  batch_size=self.batch_size, layer_path=self.layer_path, progress=progress, desc=desc)
        return {layer: acts[:, i] for i, layer in enumerate(self.distinct_layers)}

    def project(self, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        """``(n, n_keys)``: each key's unit projection of the activations at its layer.

        Args:
            acts: ``{layer: (n, hidden)}`` activations covering every layer read, as
                :meth:`last_prompt_activations` returns them.
        """
        return torch.stack([acts[layer] @ self.units[j] for j, layer in enumerate(self.layers)], dim=1)

    def __call__(self, model, tokenizer, prompts: Sequence[str | dict | Prompt], *, progress: bool = False,
                 desc: str = "reading") -> torch.Tensor:
        """``(n_prompts, n_vectors)`` last-prompt-token projections of prompts."""
        return self.project(self.last_prompt_activations(model, tokenizer, self.texts(tokenizer, prompts),
                                                         progress=progress, desc=desc))

    def units_by_layer(self) -> dict[int, torch.Tensor]:
        """``{layer: (k, hidden)}``: the unit vectors read at each distinct layer, in key order."""
        return {layer: self.units[[j for j, l_ in enumerate(self.layers) if l_ == layer]] for layer in self.distinct_layers}
