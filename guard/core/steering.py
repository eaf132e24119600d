"""Steering: change the residual stream at chosen layers, as hooks that never outlive their block.

    >>> steering = Steering.from_vector(vector, coeff=4.0)       # the vector's recommended layer
    >>> with steering.apply(model):
    ...     model.generate(...)

One :class:`Steering` serves inference (``generate``, ``evaluate``, sweeps) and training
(:class:`guard.callbacks.PreventativeSteeringCallback`) alike. Its ``operator`` says what the
hook does to a block's output ``h`` with ``v`` the layer's vector and ``û = v / |v|``:

``add``         ``h + c·v`` (the paper's steering; ``c`` is in units of the raw vector, so
                ``c = 1`` moves the activation by the full mean difference between
                trait-positive and trait-negative answers at that layer)
``ablate``      ``h − c·(h·û)û`` (directional ablation, as in CAFT; ``c = 1`` removes it all)
``ablate_add``  ``h − (h·û)û + c·v`` (ablate, then set the component to ``c·|v|``)

``Steering.from_vector(..., incremental=True)`` steers every listed layer with the paper's
layer-incremental vectors ``v_l − v_(l−1)`` (App. J.3), so stacked layers do not add up.

Positions:

``all``       every position of every forward pass (prompt, response, padding).
``response``  during ``generate``, the last prompt token and every generated token (the reference
              code's ``response`` mode: the prefill adds at its last position only, each cached
              decoding step adds at its one new token); for a teacher-forced forward over
              ``prompt + response``, pass ``response_mask`` to :meth:`Steering.apply`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import VectorFileError
from .layers import _hidden, _with_hidden, forward_hooks, hidden_size
from .stats import random_directions
from .vectors import ModelIdentity, PersonaVector, save_tensors_atomically

STEER_POSITIONS = ("all", "response")
OPERATORS = ("add", "ablate", "ablate_add")
SPEC_FORMAT = "persona-guard/steering"
_SPEC_KEY = "persona_guard_steering"

Coeff = float | Callable[[], float]


def _last_position_on_prefill(hidden: torch.Tensor) -> torch.Tensor | None:
    batch, seq = hidden.shape[:2]
    if seq == 1:  # a cached decoding step: the one position is a generated token
        return None
    mask = torch.zeros((batch, seq), device=hidden.device)
    mask[:, -1] = 1  # left padding puts every row's last prompt token here
    return mask


def _response_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """The response mask plus the last prompt token of each row (where the first response token
    is predicted from)."""
    mask = response_mask.clone()
    starts = response_mask.float().argmax(dim=1)
    rows = torch.nonzero(response_mask.any(dim=1)).flatten()
    mask[rows, (starts[rows] - 1).clamp_min(0)] = 1
    return mask


class _OnActivation:
    """A float32 vector cached on each (device, dtype) activations arrive in."""

    def __init__(self, vec: torch.Tensor):
        self.vec = vec.detach().to(torch.float32)
        self.cache: dict = {}

    def like(self, hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in self.cache:
            self.cache[key] = self.vec.to(device=hidden.device, dtype=hidden.dtype)
        return self.cache[key]


def _checked(model: nn.Module, vectors: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    d = hidden_size(model)
    checked = {int(layer): vec for layer, vec in vectors.items()}
    for layer, vec in checked.items():
        if vec.shape != (d,):
            raise ValueError(f"vector for layer {layer} has shape {tuple(vec.shape)}, expected ({d},)")
    return checked


@dataclass(frozen=True)
class Steering:
    """What to do where: ``{layer: raw vector}``, a coefficient, an operator and a position mode.

    Args:
        vectors: raw vector per decoder-block index (negative indices count from the end).
        coeff: the operator's coefficient, or a function read at every forward (a schedule).
        positions: ``"all"`` or ``"response"`` (see the module docstring).
        operator: ``"add"``, ``"ablate"`` or ``"ablate_add"`` (see the module docstring).
        description: what the steering is, for reports and spec files.
        layer_path: the decoder-block list, when auto-discovery needs help.
    """

    vectors: Mapping[int, torch.Tensor]
    coeff: Coeff = 1.0
    positions: str = "all"
    operator: str = "add"
    description: dict = field(default_factory=dict, compare=False)
    layer_path: str | None = None

    def __post_init__(self):
        if self.positions not in STEER_POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(STEER_POSITIONS)}; got {self.positions!r}")
        if self.operator not in OPERATORS:
            raise ValueError(f"operator must be one of {', '.join(OPERATORS)}; got {self.operator!r}")
        if not self.vectors:
            raise ValueError("a steering needs at least one layer")

    @classmethod
    def from_vector(cls, vector: PersonaVector, layers: int | Sequence[int] | None = None, coeff: Coeff = 1.0,
                    positions: str = "all", layer_path: str | None = None, *, operator: str = "add",
                    incremental: bool = False) -> "Steering":
        """Steer along ``vector``.

        Args:
            vector: the persona vector.
            layers: one layer or several (default: the vector's recommended layer).
            coeff: coefficient (see the operators), or a function read at every forward.
            positions: ``"all"`` or ``"response"``.
            layer_path: the decoder-block list, when auto-discovery needs help.
            operator: ``"add"``, ``"ablate"`` or ``"ablate_add"``.
            incremental: steer each layer with ``v_l − v_(l−1)`` instead of ``v_l``.
        """
        if layers is None or isinstance(layers, int):
            layers = [layers]
        indices = sorted({vector.resolve_layer(layer) for layer in layers})
        raw = vector.vectors
        resolved = {i: (raw[i] - raw[i - 1] if incremental and i > 0 else raw[i]) for i in indices}
        described = coeff if not callable(coeff) else "schedule"
        return cls(resolved, coeff, positions, operator,
                   {"trait": vector.trait, "layers": indices, "coeff": described, "positions": positions,
                    "operator": operator, "incremental": incremental}, layer_path)

    def with_coeff(self, coeff: Coeff) -> "Steering":
        """The same steering with another coefficient."""
        return replace(self, coeff=coeff, description={**self.description, "coeff": coeff})

    def random_like(self, seed: int = 0) -> "Steering":
        """The same steering along random directions of the same norms (the control for any effect).

        Args:
            seed: seeds the random directions (layers in ascending order get ``seed``, ``seed + 1``, ...).
        """
        vectors = {}
        for offset, (layer, vec) in enumerate(sorted(self.vectors.items())):
            vectors[layer] = random_directions(1, vec.numel(), float(vec.norm()), seed + offset)[0]
        return replace(self, vectors=vectors, description={**self.description, "random_seed": seed})

    @contextmanager
    def apply(self, model, *, response_mask: torch.Tensor | None = None,
              mask: torch.Tensor | Callable[[torch.Tensor], torch.Tensor | None] | None = None,
              gate: Callable[[nn.Module], bool] | None = None, layer_path: str | None = None) -> Iterator[None]:
        """Hooks in place for the ``with`` block, removed on exit and on exceptions.

        Args:
            model: the model (PEFT and DDP wrappers are looked through).
            response_mask: ``(batch, seq)``, 1 on response tokens; used in ``response`` mode for
                teacher-forced forwards (steering then also covers the last prompt token).
            mask: an explicit ``(batch, seq)`` mask of the positions to change, or a function of a
                block's hidden state returning one (None: every position); overrides ``positions``.
            gate: ``gate(block) -> bool`` decides per forward whether to steer at all (for
                example training passes only).
            layer_path: overrides :attr:`layer_path`.
        """
        if mask is None and self.positions == "response":
            mask = _last_position_on_prefill if response_mask is None else _response_positions(response_mask)
        hooks = {layer: self._hook(vec, mask, gate) for layer, vec in _checked(model, self.vectors).items()}
        with forward_hooks(model, hooks, layer_path or self.layer_path):
            yield

    def _hook(self, vec: torch.Tensor, mask, gate):
        raw = _OnActivation(vec)
        unit = _OnActivation(vec / vec.norm().clamp_min(1e-12))
        coeff, operator = self.coeff, self.operator

        def hook(module, args, output):
            if gate is not None and not gate(module):
                return None
            hidden = _hidden(output)
            scale = coeff() if callable(coeff) else coeff
            if operator == "add":
                delta = scale * raw.like(hidden)
            else:
                u = unit.like(hidden)
                along = (hidden @ u).unsqueeze(-1) * u
                delta = -scale * along if operator == "ablate" else scale * raw.like(hidden) - along
            where = mask(hidden) if callable(mask) else mask
            if where is not None:
                if where.shape != hidden.shape[:2]:
                    raise ValueError(
                        f"steering mask shape {tuple(where.shape)} does not match activations {tuple(hidden.shape[:2])}")
                delta = delta * where.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
            return _with_hidden(output, hidden + delta)  # out of place: autograd keeps the original
        return hook

    # -- spec files ---------------------------------------------------------------------------
    def save(self, path: str | Path, model) -> Path:
        """Write a steering spec file (safetensors: one tensor per layer, JSON header with the
        operator, coefficient, positions, description and the model it belongs to).

        Args:
            path: the ``.safetensors`` file to write.
            model: the model the steering is for (its identity is stored and checked on load).
        """
        if callable(self.coeff):
            raise ValueError("a steering with a coefficient schedule cannot be saved; give a number")
        path = Path(path)
        header = {"format": SPEC_FORMAT, "format_version": 1, "coeff": float(self.coeff), "positions": self.positions,
                  "operator": self.operator, "description": self.description, "layer_path": self.layer_path,
                  "model": ModelIdentity.of(model).to_dict()}
        tensors = {f"layer.{layer}": vec.detach().to("cpu", torch.float32).contiguous()
                   for layer, vec in self.vectors.items()}
        return save_tensors_atomically(tensors, path, {_SPEC_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, model=None, *, allow_other_weights: bool = False) -> "Steering":
        """Read a spec written by :meth:`save`; given ``model``, refuse it unless it belongs to
        that model (the same check as for vector files).

        Args:
            path: the spec file.
            model: the model it will steer (None: no check).
            allow_other_weights: accept a model with other weights of the same architecture (a finetune).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise VectorFileError(f"steering spec {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_SPEC_KEY)
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            header = json.loads(raw) if raw else None
        except Exception as exc:  # safetensors raises its own types for corrupt files
            raise VectorFileError(f"{path} is not a steering spec file ({exc}); write one with Steering.save") from None
        if not isinstance(header, dict) or header.get("format") != SPEC_FORMAT:
            raise VectorFileError(f"{path} is not a persona-guard steering spec; write one with Steering.save")
        if model is not None:
            ModelIdentity.from_dict(header["model"]).check(model, f"the steering spec {path.name}",
                                                            allow_other_weights=allow_other_weights)
        vectors = {int(key.split(".", 1)[1]): value for key, value in tensors.items() if key.startswith("layer.")}
        return cls(vectors, header["coeff"], header["positions"], header["operator"], header.get("description") or {},
                   header.get("layer_path"))


@contextmanager
def steer(model, vector: PersonaVector, layer: int | None = None, coeff: float = 1.0, positions: str = "all",
          *, operator: str = "add", layer_path: str | None = None) -> Iterator[Steering]:
    """Shortcut: ``with steer(model, vector, coeff=4): ...`` steers at the vector's recommended layer.

    Args:
        model: the model. vector: the persona vector. layer: default the recommended layer.
        coeff, positions, operator, layer_path: as in :meth:`Steering.from_vector`.
    """
    steering = Steering.from_vector(vector, layer, coeff, positions, layer_path, operator=operator)
    with steering.apply(model):
        yield steering


def add_vectors(model: nn.Module, vectors: Mapping[int, torch.Tensor], coeff: Coeff = 1.0, *,
                mask=None, gate: Callable[[nn.Module], bool] | None = None, layer_path: str | None = None):
    """Add ``coeff * vectors[layer]`` to each listed block's output (a :class:`Steering` with the
    ``add`` operator; ``mask`` and ``gate`` as in :meth:`Steering.apply`). A context manager.

    Args:
        model: the model.
        vectors: the vector to add per decoder-block index (negative indices count from the end).
        coeff: the multiplier, or a function read at every forward (a schedule).
        mask, gate: as in :meth:`Steering.apply` (None: every position, every forward).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    return Steering(dict(vectors), coeff, operator="add").apply(model, mask=mask, gate=gate, layer_path=layer_path)


def project_out(model: nn.Module, directions: Mapping[int, torch.Tensor], strength: float = 1.0, *,
                gate: Callable[[nn.Module], bool] | None = None, layer_path: str | None = None):
    """Remove ``strength`` times the component along each ``directions[layer]`` from that block's
    output (a :class:`Steering` with the ``ablate`` operator). A context manager.

    Args:
        model: the model.
        directions: the direction per decoder-block index (its norm does not matter).
        strength: how many times the component is removed (1: all of it).
        gate: as in :meth:`Steering.apply` (None: every forward).
        layer_path: the decoder-block list, when auto-discovery needs help.
    """
    return Steering(dict(directions), strength, operator="ablate").apply(model, gate=gate, layer_path=layer_path)
