"""TrainerCallback classes for ``transformers.Trainer`` and TRL trainers, installed as ``guard.callbacks``.

    >>> trainer = SFTTrainer(..., callbacks=[PersonaDriftCallback(["vectors/sycophancy.safetensors"]),
    ...                                      PreventativeSteeringCallback("vectors/sycophancy.safetensors", 4.0)])
"""

from .drift import PersonaDriftCallback
from .steering import PreventativeSteeringCallback

__all__ = ["PersonaDriftCallback", "PreventativeSteeringCallback"]
