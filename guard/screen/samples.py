"""Finetuning samples: read them from JSONL, CSV or a `datasets` dataset, and write a filtered
copy back in the input's own format.

A sample is a prompt (a conversation in chat format) and the response being trained on:

* ``messages``: the last assistant turn is the response, everything before it the prompt
  (multi-turn conversations included);
* ``prompt`` / ``response`` fields (names configurable; ``completion``, ``answer``, ``output``
  and ``question``, ``instruction`` are found without flags). Either side may be a string or a
  list of messages (TRL's conversational prompt/completion format).

Records keep their place in the source so the filtered output is the input minus the dropped
samples: JSONL lines are copied verbatim, CSV rows field by field, datasets by ``select``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.data import ON_ERROR, DataFileError, check_messages, read_jsonl

logger = logging.getLogger(__name__)  # warnings reach Python users who pass no warn=

PROMPT_FIELDS = ("prompt", "question", "instruction", "input")
RESPONSE_FIELDS = ("response", "completion", "answer", "output", "chosen")


@dataclass(frozen=True)
class Sample:
    """One training sample. ``index`` is its position among the source's records (0-based,
    counting only records that were read); ``where`` names it in messages (``file:line``)."""

    id: str
    index: int
    prompt: tuple[dict, ...]
    response: str
    where: str

    @property
    def last_user(self) -> str:
        return next((m["content"] for m in reversed(self.prompt) if m.get("role") == "user"), "")


@dataclass(frozen=True)
class FieldNames:
    """Where the text is in a record; ``None`` means: look for the usual names."""

    messages: str = "messages"
    prompt: str | None = None
    response: str | None = None
    system: str = "system"
    id: str = "id"


def _messages(value, where: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if isinstance(value, list) and value:
        check_messages(value, where, what)  # names the message and the value at fault
        return [{"role": m["role"], "content": m["content"]} for m in value]
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    raise DataFileError(f"{where}: {what} must be a string or a non-empty list of {{role, content}} messages, "
                        f"got {shown} ({type(value).__name__})")


def _pick(record: dict, name: str | None, candidates: Sequence[str]) -> str | None:
    if name is not None:
        return name if name in record else None
    return next((key for key in candidates if key in record), None)


def sample_from_record(record, index: int, where: str, fields: FieldNames = FieldNames()) -> Sample:
    """A :class:`Sample` from one parsed record; raises :class:`DataFileError` naming ``where``."""
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected an object with the sample's fields, got {type(record).__name__}")
    sample_id = record.get(fields.id)
    sample_id = str(sample_id) if sample_id not in (None, "") else str(index)
    messages = record.get(fields.messages)
    if isinstance(messages, str) and messages.lstrip().startswith("["):  # a JSON column in a CSV file
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataFileError(f"{where}: '{fields.messages}' is not a valid JSON list of messages") from None
    if messages is not None and fields.prompt is None:
        messages = _messages(messages, where, fields.messages)
        if messages[-1]["role"] != "assistant":
            raise DataFileError(f"{where}: the conversation must end with the assistant response being screened")
        if len(messages) < 2:
            raise DataFileError(f"{where}: the conversation has a response but no prompt")
        return Sample(sample_id, index, tuple(messages[:-1]), messages[-1]["content"], where)
    prompt_key = _pick(record, fields.prompt, PROMPT_FIELDS)
    response_key = _pick(record, fields.response, RESPONSE_FIELDS)
    if prompt_key is None or response_key is None:
        wanted = (f"'{fields.prompt or '/'.join(PROMPT_FIELDS)}' and '{fields.response or '/'.join(RESPONSE_FIELDS)}'")
        raise DataFileError(f"{where}: no '{fields.messages}' and no {wanted} fields "
                            f"(found: {', '.join(map(str, record)) or 'none'}); name them with --prompt-field/--response-field")
    prompt = _messages(record[prompt_key], where, "prompt")
    system = record.get(fields.system)
    if isinstance(system, str) and system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    response = _messages(record[response_key], where, "response")
    if response[-1]["role"] != "assistant":
        raise DataFileError(f"{where}: the response must come from the assistant")
    # A multi-message completion: earlier turns belong to the context, the last one is screened.
    return Sample(sample_id, index, tuple(prompt + response[:-1]), response[-1]["content"], where)


@dataclass
class SampleSource:
    """Samples read from one source, with what is needed to write a filtered copy of it."""

    path: str
    format: str  # "jsonl" | "csv" | "datasets"
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)  # messages for records skipped as malformed
    _raw: list = field(default_factory=list, repr=False)  # per sample: JSONL line / CSV row / dataset row index
    _header: list[str] | None = field(default=None, repr=False)
    _dataset: object = field(default=None, repr=False)
    # How the input file was written, so that filtered copies are written the same way.
    bom: bool = False          # it began with a UTF-8 byte-order mark
    newline: str = "\n"        # its line ending

    def add(self, record, raw, where: str, fields: "FieldNames", on_error: str, warn) -> None:
        """Append the sample in ``record`` (kept with ``raw`` for writing back), or report it as
        malformed per ``on_error``."""
        try:
            sample = sample_from_record(record, len(self.samples), where, fields)
        except DataFileError as error:
            _skip_or_fail(str(error), on_error, warn, self.skipped)
            return
        self.samples.append(sample)
        self._raw.append(raw)

    def write(self, path: str | Path, indices: Sequence[int]) -> Path:
        """Write the samples at ``indices`` (sample indices, kept in source order) in the input's
        format: JSONL lines verbatim, CSV rows under the same header, a dataset by ``select``.
        Text files keep the input's encoding (its byte-order mark, if it had one) and line
        endings. The copy is written to a temporary file (or directory) and renamed into place,
        so ``path`` is never left half-written.

        Args:
            path: the file (a directory for a dataset) to write.
            indices: sample indices (:attr:`Sample.index`) to keep.
        """
        path = Path(path)
        chosen = sorted(set(indices))
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "datasets":
            self._write_dataset(path, chosen)
            return path
        if path.is_dir():
            raise DataFileError(f"{path} is a directory; give a file name for the filtered copy")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8-sig" if self.bom else "utf-8", newline="") as out:
                if self.format == "jsonl":
                    for i in chosen:
                        line = self._raw[i]
                        out.write(line if line.endswith(("\n", "\r")) else line + self.newline)
                else:
                    writer = csv.writer(out, lineterminator=self.newline)
                    writer.writerow(self._header)
                    writer.writerows(self._raw[i] for i in chosen)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def _write_dataset(self, path: Path, chosen: list[int]) -> None:
        """``select`` + ``save_to_disk`` into a temporary directory, then swapped in. An existing
        ``path`` is replaced only if it is empty or a saved dataset, never another directory."""
        check_dataset_copy_path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        try:
            self._dataset.select([self._raw[i] for i in chosen]).save_to_disk(str(tmp))
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def check_dataset_copy_path(path: str | Path) -> None:
    """Refuse a path a filtered dataset copy (a directory) would replace something else at: a
    file, or a non-empty directory that is not a saved dataset.

    Args:
        path: the ``--keep`` / ``--drop`` directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataFileError(f"{path} is a file; a dataset copy is a directory, give a new directory name")
    if path.is_dir() and any(path.iterdir()) and not _is_saved_dataset(path):
        raise DataFileError(f"{path} exists and is not a saved dataset; give a new or empty directory "
                            "(nothing in it was touched)")


def _skip_or_fail(message: str, on_error: str, warn, skipped: list[str]) -> None:
    if on_error == "fail":
        raise DataFileError(message + "; fix it, or skip malformed records (--on-error skip)")
    warn(message + "; skipped")
    skipped.append(message)


def _decode(path: Path) -> tuple[str, bool]:
    """The text of a UTF-8 file without its byte-order mark, and whether it had one."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), raw.startswith(codecs.BOM_UTF8)
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None


def _line_ending(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else "\r" if line.endswith("\r") else "\n"


def _read_jsonl(path: Path, fields, on_error, warn) -> SampleSource:
    text, bom = _decode(path)
    # Split exactly where read_jsonl's line numbers fall (\n, \r, \r\n; not at U+2028 inside a
    # string, as str.splitlines would), with the line endings kept for the verbatim copy.
    lines = list(io.StringIO(text, newline=""))
    source = SampleSource(str(path), "jsonl", [], bom=bom, newline=_line_ending(lines[0]) if lines else "\n")

    def note(message: str) -> None:  # read_jsonl reports unparsable lines through this
        warn(message)
        source.skipped.append(message)

    for number, record in read_jsonl(path, on_error, note):
        source.add(record, lines[number - 1], f"{path}:{number}", fields, on_error, warn)
    return source


def _read_csv(path: Path, fields, on_error, warn) -> SampleSource:
    text, bom = _decode(path)
    first = next(iter(io.StringIO(text, newline="")), "")
    source = SampleSource(str(path), "csv", [], bom=bom, newline=_line_ending(first) if first else "\r\n")
    with io.StringIO(text, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFileError(f"{path}: empty CSV file (expected a header row)") from None
        source._header = header
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                _skip_or_fail(f"{where}: {len(row)} fields, the header has {len(header)}", on_error, warn, source.skipped)
                continue
            source.add(dict(zip(header, row)), row, where, fields, on_error, warn)
    return source


def _read_dataset(name: str, split: str | None, fields, on_error, warn) -> SampleSource:
    try:
        import datasets
    except ImportError as error:  # the train extra, not core: say which to install
        raise DataFileError(f"reading {name} (a datasets directory or hub dataset) needs the 'datasets' package, "
                            "which comes with the train extra: pip install 'persona-guard[train]' "
                            "(or give a .jsonl or .csv file)") from error
    path = Path(name)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataFileError(f"{path} is a directory but not one saved by datasets' save_to_disk; give a "
                                ".jsonl or .csv file, or a saved dataset directory") from None
    else:
        # Only the local cache: nothing here may reach the hub.
        try:
            with hub_offline():
                loaded = datasets.load_dataset(name, split=split or "train")
        except Exception as error:  # datasets raises several types for "not cached"
            detail = (str(error).strip().splitlines() or [""])[0]
            detail = detail if len(detail) <= 120 else detail[:119] + "…"
            raise DataFileError(f"{name}: not a local file or directory, and not in the local datasets cache "
                                f"({type(error).__name__}: {detail}); nothing is downloaded here: give a local "
                                "file, or download the dataset once with datasets.load_dataset") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or ("train" if "train" in loaded else next(iter(loaded)))
        if split not in loaded:
            raise DataFileError(f"{name}: no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    source = SampleSource(name, "datasets", [], _dataset=loaded)
    for row_index, record in enumerate(loaded):
        source.add(record, row_index, f"{name} row {row_index}", fields, on_error, warn)
    return source


@contextmanager
def hub_offline():
    """Within the block, ``datasets`` and ``huggingface_hub`` make no network calls (their
    offline switches, environment and module-level, are set); everything is restored after."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {name: os.environ.get(name) for name in names}
    switches = []
    try:
        import huggingface_hub.constants as hub_constants

        switches.append((hub_constants, "HF_HUB_OFFLINE"))
    except ImportError:  # pragma: no cover - datasets depends on it
        pass
    try:
        import datasets.config as datasets_config

        switches += [(datasets_config, name) for name in names]
    except ImportError:  # pragma: no cover
        pass
    saved = [(module, name, getattr(module, name)) for module, name in switches if hasattr(module, name)]
    os.environ.update({name: "1" for name in names})
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


DATA_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".json", ".parquet", ".arrow", ".txt", ".tsv")


def looks_local(source: str | Path) -> bool:
    """Whether ``source`` can only mean a local path (a hub dataset id is ``name`` or
    ``owner/name``): it starts with ``.``, ``/`` or ``~``, has a data file's suffix, a
    backslash, or more than one ``/``.

    Args:
        source: what the user gave as the data (a Path always counts as local).
    """
    text = str(source)
    return (isinstance(source, Path) or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
            or Path(text).suffix.lower() in DATA_SUFFIXES)


def missing_file_message(source: str | Path, what: str = "file") -> str:
    """``"<what> not found: PATH"``, with the closest names in its directory when there are some.

    Args:
        source: the path that does not exist.
        what: what it was meant to be, for the message.
    """
    import difflib

    path = Path(source).expanduser()
    message = f"{what} not found: {source}"
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        names = [p.name for p in parent.iterdir()]
        close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
        if close:
            message += " (did you mean " + " or ".join(str(parent / name) for name in close) + "?)"
    elif str(parent) != ".":
        message += f" (no directory {parent})"
    return message


def load_samples(source: str | Path, *, fields: FieldNames = FieldNames(), on_error: str = "fail",
                 split: str | None = None, warn: Callable[[str], None] = logger.warning) -> SampleSource:
    """Read samples from a ``.jsonl`` / ``.csv`` file, a saved ``datasets`` directory, or a hub
    dataset id already in the local cache (never downloaded: the hub is not contacted). A path
    that does not exist and cannot be a hub id is "file not found" at once. Malformed records
    are reported with their line (or row) and, per ``on_error``, skipped or fatal
    (:class:`DataFileError`). UTF-8 byte-order marks are accepted.

    Args:
        source: the file, directory or dataset id.
        fields: where the text is in each record.
        on_error: ``"fail"`` or ``"skip"`` for malformed records.
        split: the split of a dataset (default: train, or its first split).
        warn: receives a message for each skipped record.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(source).expanduser() if str(source).startswith("~") else Path(source)
    if not path.exists() and looks_local(source):
        raise DataFileError(missing_file_message(source) + "; check the path")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            result = _read_jsonl(path, fields, on_error, warn)
        elif suffix == ".csv":
            result = _read_csv(path, fields, on_error, warn)
        else:
            raise DataFileError(f"{path}: unknown format {suffix!r}; use .jsonl, .csv or a saved datasets directory")
    else:
        result = _read_dataset(str(source), split, fields, on_error, warn)
    if not result.samples:
        raise DataFileError(f"{source}: no samples read" + (f" ({len(result.skipped)} malformed)" if result.skipped else ""))
    return result
