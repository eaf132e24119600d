"""Where the callbacks keep their state in a Trainer checkpoint, and where they find it on resume.

transformers' ``ExportableState`` does not fit: it stores JSON in ``trainer_state.json`` and, when
``restore_callback_states_from_checkpoint`` is on, replaces the user's callback with a new
instance built from JSON arguments (persona vectors and reference activations are tensors). So
each callback writes its own file into the checkpoint directory in ``on_save`` (which runs right
after ``Trainer._save_checkpoint``) and reads it in ``on_train_begin``.

The Trainer does not pass ``resume_from_checkpoint`` to callbacks. What it does tell them: on
resume, ``state`` is loaded from the checkpoint's ``trainer_state.json`` before
``on_train_begin``, so ``state.global_step > 0`` there means a resumed run, and the checkpoint is
``<output_dir>/checkpoint-<global_step>`` unless it was given elsewhere (then
``args.resume_from_checkpoint``, or the callback's ``load_checkpoint(dir)``).
"""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def saved_checkpoint_dir(args, state) -> Path:
    """The directory ``Trainer._save_checkpoint`` has just written (no hyperparameter search).

    Args:
        args, state: the Trainer's ``TrainingArguments`` (its ``output_dir``) and ``TrainerState``
            (its ``global_step``).
    """
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def resumed(state) -> bool:
    """True in ``on_train_begin`` of a run resumed from a checkpoint.

    Args:
        state: the Trainer's ``TrainerState``.
    """
    return state.global_step > 0


def resume_candidates(args, state, explicit: str | Path | None = None) -> list[Path]:
    """Directories that may hold the checkpoint a run resumed from, most specific first.

    Args:
        args, state: the Trainer's ``TrainingArguments`` (``resume_from_checkpoint``, ``output_dir``)
            and ``TrainerState`` (``global_step``).
        explicit: a directory the user named (the callback's ``load_checkpoint``), tried first; or None.
    """
    found = [Path(explicit)] if explicit is not None else []
    given = getattr(args, "resume_from_checkpoint", None)
    if isinstance(given, str) and given:
        found.append(Path(given))
    found.append(saved_checkpoint_dir(args, state))
    return found
