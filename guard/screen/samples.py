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

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.data import ON_ERROR, DataFileError, read_jsonl

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
    if (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataFileError(f"{where}: {what} must be a string or a non-empty list of {{role, content}} messages")


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
        format: JSONL lines verbatim, CSV rows under the same header, a dataset by ``select``."""
        path = Path(path)
        chosen = sorted(set(indices))
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "jsonl":
            with open(path, "w", encoding="utf-8") as out:
                for i in chosen:
                    line = self._raw[i]
                    out.write(line if line.endswith("\n") else line + "\n")
        elif self.format == "csv":
            with open(path, "w", encoding="utf-8", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(self._header)
                writer.writerows(self._raw[i] for i in chosen)
        else:
            self._dataset.select([self._raw[i] for i in chosen]).save_to_disk(str(path))
        return path


def _skip_or_fail(message: str, on_error: str, warn, skipped: list[str]) -> None:
    if on_error == "fail":
        raise DataFileError(message + "; fix it, or skip malformed records (--on-error skip)")
    warn(message + "; skipped")
    skipped.append(message)


def _read_jsonl(path: Path, fields, on_error, warn) -> SampleSource:
    source = SampleSource(str(path), "jsonl", [])
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def note(message: str) -> None:  # read_jsonl reports unparsable lines through this
        warn(message)
        source.skipped.append(message)

    for number, record in read_jsonl(path, on_error, note):
        source.add(record, lines[number - 1], f"{path}:{number}", fields, on_error, warn)
    return source


def _read_csv(path: Path, fields, on_error, warn) -> SampleSource:
    source = SampleSource(str(path), "csv", [])
    with open(path, encoding="utf-8", newline="") as handle:
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
    except ImportError as error:  # a core dependency, but say what is missing
        raise DataFileError(f"reading {name} needs the 'datasets' package") from error
    path = Path(name)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        # Only the local cache: nothing here may reach the hub.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            loaded = datasets.load_dataset(name, split=split or "train")
        except Exception as error:  # datasets raises several types for "not cached"
            raise DataFileError(f"{name}: not a file or saved dataset directory, and not in the local "
                                f"datasets cache ({type(error).__name__}: {error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or ("train" if "train" in loaded else next(iter(loaded)))
        if split not in loaded:
            raise DataFileError(f"{name}: no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    source = SampleSource(name, "datasets", [], _dataset=loaded)
    for row_index, record in enumerate(loaded):
        source.add(record, row_index, f"{name} row {row_index}", fields, on_error, warn)
    return source


def load_samples(source: str | Path, *, fields: FieldNames = FieldNames(), on_error: str = "fail",
                 split: str | None = None, warn: Callable[[str], None] = lambda message: None) -> SampleSource:
    """Read samples from a ``.jsonl`` / ``.csv`` file, a saved ``datasets`` directory, or a hub
    dataset id already in the local cache. Malformed records are reported with their line (or
    row) and, per ``on_error``, skipped or fatal (:class:`DataFileError`)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(source)
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
