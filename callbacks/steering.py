"""``PreventativeSteeringCallback``: the paper's "vaccine", steering toward a trait while training.

Adding alpha * v during finetuning relieves the optimiser of moving the weights along v to fit
trait-inducing data; without the hooks at inference the model keeps less of the trait.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import TrainerCallback

from guard.core.steering import Steering
from guard.core.vectors import PersonaVector

from ._checkpoint import resume_candidates, resumed, saved_checkpoint_dir
from ._trainer import remove_hooks_on_exception

logger = logging.getLogger(__name__)
STATE_FORMAT = "persona-guard/steering-callback-state"

Schedule = Callable[[int, int], float]
# Callback modes and the steering operator each one applies.
OPERATOR = {"steer": "add", "ablate": "ablate", "ablate_steer": "ablate_add"}
MODES = tuple(OPERATOR)


def constant(step: int, max_steps: int) -> float:
    """1 at every step.

    Args:
        step, max_steps: the Trainer's global step and its total steps (both ignored).
    """
    return 1.0


def linear_decay(step: int, max_steps: int) -> float:
    """From 1 at the first step to 0 at the last.

    Args:
        step: the Trainer's global step.
        max_steps: the run's total steps (at least 1 is used).
    """
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
    are not weights. Attached to its trainer (``trainer=``, :meth:`attach` or
    ``guard.callbacks.attach(trainer)``), the hooks are also removed when training raises, before
    the exception leaves ``trainer.train()``.

    The schedule's position is the Trainer's ``global_step``, which a resumed run restores; each
    checkpoint also gets a small JSON file (``persona_steering_<trait>_L<layers>_<mode>.json``)
    with the settings and the count of steered forwards, checked and restored on resume.

    Args:
        vector: the persona vector (object or vector file).
        coeff: the coefficient, in units of the raw vector (``ablate`` ignores it).
        layers: one layer or several (default: the vector's recommended layer).
        mode: ``"steer"``, ``"ablate"`` or ``"ablate_steer"``.
        incremental: steer every listed layer with the layer-incremental vectors v_l - v_(l-1)
            (the paper's App. J.3), so stacked layers do not add up.
        schedule: scales the coefficient by step: ``"constant"``, ``"linear_decay"`` or a
            function (step, max_steps) -> factor.
        layer_path: the decoder-block list, when auto-discovery needs help.
        trainer: the Trainer whose exceptions should remove the hooks (see :meth:`attach`).
    """

    def __init__(self, vector: PersonaVector | str | Path, coeff: float = 1.0, *,
                 layers: int | Sequence[int] | None = None, mode: str = "steer", incremental: bool = False,
                 schedule: str | Schedule = "constant", layer_path: str | None = None, trainer=None):
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
        self.trainer = None
        self._hooks: ExitStack | None = None
        self._model = None
        self._step = 0
        self._max_steps = 1
        self.steered_forwards = 0  # counted, so tests and users can see steering actually ran
        self._steering = self.steering()
        if trainer is not None:
            self.trainer = trainer
            remove_hooks_on_exception(trainer, self)

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
        """The coefficient at the current step: ``coeff`` times the schedule's factor."""
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
        """Take the steering hooks off the model (a no-op when none are on)."""
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    # -- attaching -------------------------------------------------------------------------
    def attach(self, trainer) -> "PreventativeSteeringCallback":
        """Remove the hooks if ``trainer.train()`` raises (no callback event fires then; see
        ``guard.callbacks._trainer``), and add this callback to ``trainer`` when it is not there yet.

            >>> steer = PreventativeSteeringCallback(vector, 2.0)
            >>> trainer = SFTTrainer(..., callbacks=[steer])
            >>> steer.attach(trainer)        # or guard.callbacks.attach(trainer)
        """
        self.trainer = trainer
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        remove_hooks_on_exception(trainer, self)
        return self

    def state_path(self, checkpoint_dir: str | Path) -> Path:
        """This callback's state file inside a checkpoint directory (one per trait, layers and mode).

        Args:
            checkpoint_dir: the checkpoint directory.
        """
        layers = "-".join(str(layer) for layer in self.layers)
        return Path(checkpoint_dir) / f"persona_steering_{self.vector.trait}_L{layers}_{self.mode}.json"

    def _settings(self) -> dict:
        schedule = next((name for name, fn in SCHEDULES.items() if fn is self.schedule), "custom")
        return {"trait": self.vector.trait, "layers": self.layers, "coeff": self.coeff, "mode": self.mode,
                "incremental": self.incremental, "schedule": schedule}

    # -- lifecycle -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.remove_hooks()  # a retry after an out-of-memory error (auto_find_batch_size) starts clean
        if self.trainer is None:
            logger.warning("PreventativeSteeringCallback is not attached to its trainer: if training raises, its "
                           "hooks stay on the model until remove_hooks(). Call guard.callbacks.attach(trainer).")
        self._model = model
        self._step, self._max_steps = state.global_step, max(state.max_steps, 1)
        if resumed(state):
            self._restore(args, state)

    def on_save(self, args, state, control, **kwargs):
        # Hooks exist only inside steps, so the weights just saved were never steered; this
        # records where the schedule is and what it was.
        directory = saved_checkpoint_dir(args, state)
        if args.should_save and directory.is_dir():
            saved = {"format": STATE_FORMAT, "step": state.global_step, "max_steps": self._max_steps,
                     "coeff_last_step": self.current_coeff(), "steered_forwards": self.steered_forwards,
                     **self._settings()}
            self.state_path(directory).write_text(json.dumps(saved, indent=2))

    def _restore(self, args, state) -> None:
        for directory in resume_candidates(args, state):
            path = self.state_path(directory)
            if not path.is_file():
                continue
            saved = json.loads(path.read_text())
            if saved.get("format") != STATE_FORMAT or saved.get("step") != state.global_step:
                continue
            changed = {k: (saved.get(k), v) for k, v in self._settings().items() if saved.get(k) != v}
            if changed:
                logger.warning("preventative steering: resumed with other settings than the checkpoint was trained "
                               "with: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
            if saved.get("max_steps") != self._max_steps:
                logger.warning(f"preventative steering: the schedule now runs to step {self._max_steps}, not "
                               f"{saved.get('max_steps')} as before the resume")
            self.steered_forwards = saved["steered_forwards"]
            return
        logger.info(f"preventative steering: no steering state with the checkpoint at step {state.global_step}; "
                    "the schedule continues from the step alone")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step = state.global_step
        self._attach(model if model is not None else self._model)

    def on_step_end(self, args, state, control, **kwargs):
        self.remove_hooks()

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()
