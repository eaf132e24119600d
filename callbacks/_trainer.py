"""Finding the objects that call a callback, for the two things the callback API cannot do.

Reporting callbacks (TensorBoard, W&B) run before user callbacks in ``on_log``, so metrics a
user callback adds to ``logs`` would never reach them; and no callback event fires when
training raises, so hooks could outlive a crash. Both need the caller: the ``CallbackHandler``
(to move a callback ahead of the reporters) and the ``Trainer`` (to clean up on exceptions).
They are the ``self`` of frames up the stack of every callback event.
"""

from __future__ import annotations

import inspect


def caller_instance(cls, max_depth: int = 12):
    """The nearest ``self`` up the call stack that is an instance of ``cls``, or None."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, cls):
                return candidate
        return None
    finally:
        del frame


def move_ahead_of_reporters(callback) -> bool:
    """Put ``callback`` first in its handler's list, so its ``on_log`` edits reach every reporter.

    Called from inside a callback event: the handler is iterating its list, and moving the
    running callback from index i to 0 shifts only the entries before it, which already ran.
    """
    from transformers.trainer_callback import CallbackHandler

    handler = caller_instance(CallbackHandler)
    if handler is None or callback not in handler.callbacks:
        return False
    handler.callbacks.remove(callback)
    handler.callbacks.insert(0, callback)
    return True


def find_trainer():
    from transformers import Trainer

    return caller_instance(Trainer, max_depth=16)
