"""The one thing the callbacks need from a Trainer that no public API offers.

No callback event fires when training raises (an out-of-memory error in a forward, backward or
optimizer step), so a callback cannot remove hooks it put on the model inside a step. This
adapter wraps the ``train`` method of one Trainer *instance* (not the class) so that hooks are
removed before the exception leaves ``trainer.train()``. It is the only place in
``guard.callbacks`` that replaces a Trainer attribute; ``tests/callbacks/test_callbacks.py``
(``test_exception_adapter_*``) fails if a transformers release stops routing training through
``Trainer.train`` or stops letting exceptions out of it.
"""

from __future__ import annotations

import functools

_GUARDED = "_persona_guard_cleanup"


def remove_hooks_on_exception(trainer, callback) -> None:
    """Make ``trainer.train()`` call ``callback.remove_hooks()`` when it raises.

    Args:
        trainer: a ``transformers.Trainer`` (TRL trainers included).
        callback: any object with a ``remove_hooks()`` method; registering it twice is a no-op.

    One wrapper per trainer, however many callbacks register: every registered callback is
    cleaned up, in registration order, and the exception is re-raised unchanged.
    """
    guarded = trainer.__dict__.setdefault(_GUARDED, [])
    if any(existing is callback for existing in guarded):
        return
    if not guarded:
        train = trainer.train  # the bound method of the class (or of a subclass)

        @functools.wraps(train)
        def train_removing_hooks(*args, **kwargs):
            try:
                return train(*args, **kwargs)
            except BaseException:
                for registered in guarded:
                    registered.remove_hooks()
                raise

        trainer.train = train_removing_hooks
    guarded.append(callback)
