"""Every error persona-guard raises on purpose, in one place.

Each carries a message written for the user (what is wrong and what to do about it). The CLI
turns :class:`PersonaGuardError` into one line and exit status 1; anything else is a bug and
keeps its traceback. Subclasses also derive from the builtin a caller would expect
(``ValueError`` for bad input, ``RuntimeError`` for a model that will not load).
"""

from __future__ import annotations


class PersonaGuardError(Exception):
    """Base class: an input, file or setting persona-guard cannot work with; the message says why."""


class ModelLoadError(PersonaGuardError, RuntimeError):
    """A model could not be loaded; the message says what to do about it."""


class LayerError(PersonaGuardError, ValueError):
    """Layers could not be found or a requested layer does not exist."""


class VectorMismatchError(PersonaGuardError, ValueError):
    """A vector does not belong to the model it is used with; the message says which field differs."""


class VectorFileError(PersonaGuardError, ValueError):
    """A file is not a readable persona-guard vector file."""


class DataFileError(PersonaGuardError, ValueError):
    """A data file cannot be read as asked; the message names the file and line."""


class TraitError(PersonaGuardError, ValueError):
    """A trait file is missing, malformed or inconsistent; the message lists every problem."""


class JudgeError(PersonaGuardError, RuntimeError):
    """A judge could not produce a score (bad endpoint, malformed reply, ...)."""


class ExtractionError(PersonaGuardError, ValueError):
    """Extraction could not produce a vector (nothing left to average); the message says why."""


class SelectionError(PersonaGuardError, ValueError):
    """Layer selection cannot run (for example a trait with no example pairs); the message says why."""


class MonitorError(PersonaGuardError, ValueError):
    """The monitor cannot be set up as asked (no reference, a layer out of range); the message says why."""


class ScreenError(PersonaGuardError, ValueError):
    """A screen cannot run as asked (bad threshold, no vectors, ...)."""


class OptimizeError(PersonaGuardError, ValueError):
    """The prompt search cannot run as asked."""


class HardenError(PersonaGuardError, ValueError):
    """Hardening cannot run as asked."""


class SAEError(PersonaGuardError, ValueError):
    """An SAE cannot be loaded, trained or used as asked."""


class EvaluationError(PersonaGuardError, ValueError):
    """An evaluation cannot run as asked (no conditions, clashing names, a judge with nothing to judge)."""


class AutosteerError(PersonaGuardError, ValueError):
    """Auto-steering cannot run as asked (empty description, a test prompt reaching selection, ...)."""
