"""TrainerCallback classes for ``transformers.Trainer`` and TRL trainers, installed as ``guard.callbacks``.

    >>> drift = PersonaDriftCallback(["vectors/sycophancy.safetensors"])
    >>> steer = PreventativeSteeringCallback("vectors/sycophancy.safetensors", 4.0)
    >>> trainer = SFTTrainer(..., callbacks=[drift, steer])
    >>> attach(trainer)     # they log through trainer.log and clean up if training raises
"""

from .drift import PersonaDriftCallback
from .steering import PreventativeSteeringCallback


def attach(trainer):
    """Attach every persona-guard callback of ``trainer`` to it (as TRL's callbacks take their
    trainer): the drift callback then logs through ``trainer.log``, the steering callback removes
    its hooks if training raises. Returns ``trainer``.

    Args:
        trainer: a ``transformers.Trainer`` or TRL trainer built with these callbacks.
    """
    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, (PersonaDriftCallback, PreventativeSteeringCallback)):
            callback.attach(trainer)
    return trainer


__all__ = ["PersonaDriftCallback", "PreventativeSteeringCallback", "attach"]
