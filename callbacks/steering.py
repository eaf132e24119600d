"""``PreventativeSteeringCallback``: the paper's "vaccine", steering toward a trait while training.

Adding alpha * v during finetuning relieves the optimiser of moving the weights along v to fit
trait-inducing data; without the hooks at inference the model keeps less of the trait.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import TrainerCallback

from guard.core.steering import Steering
from guard.core.vectors import PersonaVector

from ._trainer import find_trainer

Schedule = Callable[[int, int], float]
# Callback modes and the steering operator each one applies.
OPERATOR = {"steer": "add", "ablate": "ablate", "ablate_steer": "ablate_add"}
MODES = tuple(OPERATOR)


def constant(step: int, max_steps: int) -> float:
    return 1.0


def linear_decay(step: int, max_steps: int) -> float:
    """From 1 at the first step to 0 at the last."""
    return max(0.0, 1.0 - step / max(max_steps, 1))


SCHEDULES = {"constant": constant, "linear_decay": linear_decay}


def _training_forward(block) -> bool:
    """True for the forward passes that train the model: eval and generation run in eval mode;
    a DPO reference pass runs under no_grad with gradient checkpointing switched off. (A
    reentrant checkpointed forward also runs under no_grad, but with checkpointing on.)"""
    return block.training and (torch.is_grad_enabled() or bool(getattr(block, "gradient_checkpointing", False)))


class PreventativeSteeringCallback(TrainerCallback):
    """Steers at ``layers`` during training forward passes only: ``mode="steer"`` adds
    ``coeff * v`` (the paper's preventative steering), ``"ablate"`` projects v out (CAFT-style),
    ``"ablate_steer"`` projects it out and then adds ``coeff * v``. One
    :class:`guard.core.steering.Steering` does the work, as at inference.

    Hooks exist only between ``on_step_begin`` and ``on_step_end``, so evaluation, generation
    and saving (all of which run after a step ends) never see them; inside a step they also
    skip eval-mode passes and DPO reference passes. Checkpoints never contain steering: hooks
    are not weights. If training raises, the hooks are removed before the exception leaves
    ``trainer.train()``.

    ``incremental=True`` steers every listed layer with the paper's layer-incremental vectors
    v_l - v_(l-1) (App. J.3), so stacked layers do not add up. ``schedule`` scales the
    coefficient by step: ``"constant"``, ``"linear_decay"`` or a function (step, max_steps) -> factor.
    """

    def __init__(self, vector: PersonaVector | str | Path, coeff: float = 1.0, *,
                 layers: int | Sequence[int] | None = None, mode: str = "steer", incremental: bool = False,
                 schedule: str | Schedule = "constant", layer_path: str | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.vector = vector if isinstance(vector, PersonaVector) else PersonaVector.load(vector)
        if layers is None or isinstance(layers, int):
            layers = [layers]
        self.layers = sorted({self.vector.resolve_layer(layer) for layer in layers})
        self.coeff = coeff
        self.mode = mode
        self.incremental = incremental
        self.schedule = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        self.layer_path = layer_path
        self._hooks: ExitStack | None = None
        self._model = None
        self._step = 0
        self._max_steps = 1
        self.steered_forwards = 0  # counted, so tests and users can see steering actually ran
        self._steering = self.steering()

    def steering(self) -> Steering:
        """The steering applied in training forwards: its coefficient follows the schedule
        (``ablate`` removes the whole component, whatever ``coeff``)."""
        coeff = 1.0 if self.mode == "ablate" else self.current_coeff
        return Steering.from_vector(self.vector, self.layers, coeff, layer_path=self.layer_path,
                                    operator=OPERATOR[self.mode], incremental=self.incremental)

    def directions(self) -> dict[int, torch.Tensor]:
        """The vector added (or ablated) at each layer."""
        return dict(self._steering.vectors)

    def current_coeff(self) -> float:
        return self.coeff * self.schedule(self._step, self._max_steps)

    # -- hooks -----------------------------------------------------------------------------
    def _gate(self, block) -> bool:
        if not _training_forward(block):
            return False
        self.steered_forwards += 1
        return True

    def _attach(self, model) -> None:
        if self._hooks is not None:
            return
        stack = ExitStack()
        stack.enter_context(self._steering.apply(model, gate=self._gate))
        self._hooks = stack

    def remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    def _guard_trainer(self) -> None:
        """Remove the hooks if training raises (no callback event fires then)."""
        trainer = find_trainer()
        if trainer is None:
            return
        guarded = trainer.__dict__.setdefault("_persona_guard_steering", [])
        if self in guarded:
            return
        if not guarded:  # wrap once; every steering callback of this trainer is cleaned up
            step = trainer.training_step

            @functools.wraps(step)
            def training_step(*args, **kwargs):
                try:
                    return step(*args, **kwargs)
                except BaseException:
                    for callback in guarded:
                        callback.remove_hooks()
                    raise

            trainer.training_step = training_step  # forward and backward: where the hooks run
        guarded.append(self)

    # -- lifecycle -------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        self._guard_trainer()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._guard_trainer()  # when added with trainer.add_callback after __init__
        self._model = model
        self._max_steps = max(state.max_steps, 1)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step = state.global_step
        self._attach(model if model is not None else self._model)

    def on_step_end(self, args, state, control, **kwargs):
        self.remove_hooks()

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()
