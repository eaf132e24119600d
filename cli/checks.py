"""Checks every command runs on its arguments before it loads a model: outputs can be written
(tried, not guessed from permission bits: root passes every ``os.access`` test), no output
lands on an input or on another output, floats are finite, a vector file reads cleanly and its
trait can be found. Each failure is one line naming the option and the fix.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Iterable

import click

from guard.errors import PersonaGuardError, TraitError


class PathError(PersonaGuardError, ValueError):
    """An input or output path a command cannot use; the message names the option and what to do."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _cannot_create_in(directory: Path) -> str | None:
    """None if a file can be created in the existing ``directory`` (tried with a probe file that
    is removed at once), else the reason."""
    try:
        handle, name = tempfile.mkstemp(dir=directory, prefix=".persona-guard-probe-")
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(handle)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None


def _creatable_under(path: Path, option: str, fix: str) -> None:
    """``path`` (which need not exist) can be created: its nearest existing ancestor is a
    directory a file can be created in."""
    ancestor = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not ancestor.is_dir():
        raise PathError(f"cannot write {option} {path}: {ancestor} is a file, not a directory; {fix}")
    reason = _cannot_create_in(ancestor)
    if reason:
        raise PathError(f"cannot write {option} {path}: nothing can be created in {ancestor} ({reason}); {fix}")


def writable_file(path: str | os.PathLike | None, option: str, fix: str | None = None) -> Path | None:
    """``path`` as a Path if a file can be written there, else a :class:`PathError` naming ``option``.

    A missing parent directory is fine when it can be created. Refused: a directory where a file
    is expected, a parent that is a file, a directory nothing can be created in, an existing file
    without write permission.

    Args:
        path: the output file (None: nothing to check, None returned).
        option: the option it came from, e.g. ``"--out"``, for the message.
        fix: what the message tells the user to do (default: pick another ``option``).
    """
    if path is None:
        return None
    fix = fix or f"pick another {option}"
    path = Path(path).expanduser()
    if path.is_dir():
        raise PathError(f"{option} {path} is a directory; give a file name (for example {path / 'out'}...)")
    _creatable_under(path, option, fix)
    if path.exists() and not os.access(path, os.W_OK):
        raise PathError(f"cannot write {option} {path}: no write permission on the file; {fix}")
    return path


def writable_dir(path: str | os.PathLike | None, option: str) -> Path | None:
    """``path`` as a Path if it is (or can be created as) a directory files can be written in,
    else a :class:`PathError` naming ``option``.

    Args:
        path: the output directory (None: nothing to check, None returned).
        option: the option it came from, for the message.
    """
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise PathError(f"{option} {path} is a file, not a directory; give a directory (it is created if missing)")
    if path.is_dir():
        reason = _cannot_create_in(path)
        if reason:
            raise PathError(f"cannot write into {option} {path} ({reason}); pick another {option}")
        return path
    _creatable_under(path, option, f"pick another {option}")
    return path


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: symlinks resolved, hard links compared by inode."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def distinct_outputs(outputs: dict[str, str | os.PathLike | None],
                     inputs: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse an output that is an input (it would be overwritten) or the same file as another output.

    Args:
        outputs: ``{option: path}`` of everything the command writes (None: not given).
        inputs: ``{option or argument: path}`` of what it reads (None entries and paths that do
            not exist are ignored).
    """
    given = [(option, path) for option, path in outputs.items() if path is not None]
    sources = [(option, path) for option, path in (inputs or {}).items()
               if path is not None and Path(path).expanduser().exists()]
    for option, path in given:
        for source_option, source in sources:
            if same_path(path, source):
                raise PathError(f"{option} {path} is the input {source_option} ({source}); writing it would "
                                f"overwrite the input: give {option} another path")
    for i, (option, path) in enumerate(given):
        for other_option, other in given[i + 1:]:
            if same_path(path, other):
                raise PathError(f"{option} and {other_option} are the same file ({path}); give each its own path")


class FiniteFloat(click.ParamType):
    """A click float type that refuses NaN and infinity (``float("nan")`` parses, and NaN
    compares false with everything, so it would silently disable a threshold)."""

    name = "float"

    def convert(self, value, param, ctx):
        """Parse ``value`` as a finite float or fail with click's usual one-line message.

        Args:
            value: the text (or number) given.
            param, ctx: click's parameter and context.
        """
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()


def trait_source(name: str) -> str:
    """Refuse a ``--trait`` (or ``traits validate``) argument that is an existing file but not a
    ``.json`` file: only .json files are read as trait files, so it would otherwise be reported
    as an "unknown trait".

    Args:
        name: a shipped trait's name or a trait file's path.
    """
    path = Path(name)
    if path.exists() and path.suffix.lower() != ".json":
        raise TraitError(f"{path} is not a trait file: a trait file is one JSON object in a file ending in .json "
                         "(see `persona-guard traits show sycophancy --json`); rename it if it holds one")
    return name


def trait_for_vector(vector_trait: str, trait_name: str | None):
    """The trait whose questions and example pairs a command uses: ``trait_name`` if given, else
    the vector's own trait when it is shipped. A vector of an unshipped trait gets one line
    saying to pass its trait file with ``--trait``.

    Args:
        vector_trait: the vector's trait (from its file).
        trait_name: the ``--trait`` option (None: not given).
    """
    from guard.traits import list_traits, load_trait

    if trait_name:
        return load_trait(trait_source(trait_name))
    try:
        return load_trait(vector_trait)
    except TraitError:
        raise TraitError(f"the vector's trait {vector_trait!r} is not shipped with persona-guard (shipped: "
                         f"{', '.join(list_traits())}); pass its trait file with --trait path/to/{vector_trait}.json"
                         ) from None


def read_vectors(paths: Iterable[str | os.PathLike]) -> list:
    """Read vector files before any model is loaded (their headers and tensors are small), so a
    bad file or a layer out of range fails at once; check them against the model later with
    :meth:`~guard.core.vectors.PersonaVector.check_model`.

    Args:
        paths: the vector files.
    """
    from guard.core.vectors import PersonaVector

    return [PersonaVector.load(path) for path in paths]
