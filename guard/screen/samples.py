"""Finetuning samples: read them from JSONL, CSV or a `datasets` dataset, and write a filtered
copy back in the input's own format.

A sample is a prompt (a conversation in chat format) and the response being trained on:

* ``messages``: the last assistant turn is the response, everything before it the prompt
  (multi-turn conversations included);
* ``prompt`` / ``response`` fields (names configurable; ``completion``, ``answer``, ``output``
  and ``question``, ``instruction`` are found without flags). Either side may be a string or a
  list of messages (TRL's conversational prompt/completion format).

Records keep their place in the source so the filtered output is the input minus the dropped
samples: JSONL lines are copied verbatim, CSV rows field by field, parquet rows under the same
schema, datasets by ``select``.

Two ways to read: :func:`load_samples` reads everything into a :class:`SampleSource` (a list of
samples, for small data and for Python users); :func:`open_samples` returns a
:class:`SampleStream`, which validates the whole input once when opened and then reads it again
for each pass (scoring in chunks, the filtered copies), so memory does not grow with the data.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..core.data import ON_ERROR, DataFileError, check_messages

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


MAX_SKIPPED_MESSAGES = 1000  # a stream keeps this many skip messages (all are reported through warn)
JSON_HINT = "; fix the line, or skip malformed lines (--on-error skip)"
RECORD_HINT = "; fix it, or skip malformed records (--on-error skip)"


@dataclass
class SampleSource:
    """Samples read from one source into memory, with what is needed to write a filtered copy of it
    (:func:`load_samples`). :func:`open_samples` gives the same interface without holding the
    samples (:class:`SampleStream`)."""

    path: str
    format: str  # "jsonl" | "csv" | "parquet" | "datasets"
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)  # messages for records skipped as malformed
    _raw: list = field(default_factory=list, repr=False)  # per sample: JSONL line / CSV row / parquet or dataset row
    _header: list[str] | None = field(default=None, repr=False)
    _stream: "SampleStream | None" = field(default=None, repr=False)  # writes parquet and dataset copies
    # How the input file was written, so that filtered copies are written the same way.
    bom: bool = False          # it began with a UTF-8 byte-order mark
    newline: str = "\n"        # its line ending

    @property
    def count(self) -> int:
        """How many samples were read."""
        return len(self.samples)

    @property
    def n_skipped(self) -> int:
        """How many malformed records were skipped."""
        return len(self.skipped)

    def add(self, record, raw, where: str, fields: "FieldNames", on_error: str, warn) -> None:
        """Append the sample in ``record`` (kept with ``raw`` for writing back), or report it as
        malformed per ``on_error``.

        Args:
            record: the parsed record.
            raw: what a filtered copy writes for it (a JSONL line, a CSV row, a row index).
            where: names the record in messages.
            fields: where the text is in the record.
            on_error: ``"fail"`` or ``"skip"``.
            warn: receives the message of a skipped record.
        """
        try:
            sample = sample_from_record(record, len(self.samples), where, fields)
        except DataFileError as error:
            _skip_or_fail(str(error), on_error, warn, self.skipped)
            return
        self.samples.append(sample)
        self._raw.append(raw)

    def iter_samples(self) -> Iterator[Sample]:
        """Every sample, in index order."""
        return iter(self.samples)

    def chunks(self, size: int, only: Callable[[int], bool] | None = None) -> Iterator[tuple[int, list[Sample]]]:
        """``(chunk number, samples)`` for consecutive runs of ``size`` samples (chunk ``n`` holds
        indices ``n * size`` up to ``(n + 1) * size``).

        Args:
            size: samples per chunk.
            only: yield only the chunks whose number it accepts (None: every chunk).
        """
        _check_chunk_size(size)
        for number, start in enumerate(range(0, len(self.samples), size)):
            if only is None or only(number):
                yield number, self.samples[start:start + size]

    def fetch(self, indices: Iterable[int]) -> dict[int, Sample]:
        """The samples at ``indices``, by index.

        Args:
            indices: sample indices (:attr:`Sample.index`).
        """
        return {i: self.samples[i] for i in set(indices)}

    def write(self, path: str | Path, indices: Sequence[int]) -> Path:
        """Write the samples at ``indices`` (sample indices, kept in source order) in the input's
        format: JSONL lines verbatim, CSV rows under the same header, parquet rows under the same
        schema, a dataset by ``select``. Text files keep the input's encoding (its byte-order
        mark, if it had one) and line endings. The copy is written to a temporary file (or
        directory) and renamed into place, so ``path`` is never left half-written.

        Args:
            path: the file (a directory for a dataset) to write.
            indices: sample indices (:attr:`Sample.index`) to keep.
        """
        path = Path(path)
        chosen = sorted(set(indices))
        if self.format in ("jsonl", "csv"):
            return _write_text(path, self.format, self.bom, self.newline, self._header, (self._raw[i] for i in chosen))
        return self._stream.write_rows(path, [self._raw[i] for i in chosen])


class _CappedMessages(list):
    """Keeps the first :data:`MAX_SKIPPED_MESSAGES` messages appended and counts them all."""

    total = 0

    def append(self, message: str) -> None:
        self.total += 1
        if len(self) < MAX_SKIPPED_MESSAGES:
            super().append(message)


def _check_chunk_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk size must be a positive integer, got {size!r}")


class SampleStream:
    """Samples of a file or dataset, read again for every pass instead of held in memory.

    :func:`open_samples` opens one and reads it through once, validating every record (each
    malformed one is reported then, or is fatal, so a bad input fails before any work) and
    counting the samples. Later passes (:meth:`iter_samples`, :meth:`chunks`, :meth:`fetch`,
    :meth:`write`) read it again and skip the same records silently. A file that changes between
    passes is an error, not a silently different screen.

    Attributes:
        path: the source as given.
        format: ``"jsonl"``, ``"csv"``, ``"parquet"`` or ``"datasets"``.
        count: samples read.
        skipped: messages of the malformed records skipped (the first
            :data:`MAX_SKIPPED_MESSAGES`); ``n_skipped`` counts them all.
        bom, newline: how a text file was written (kept by its filtered copies).
    """

    format = ""

    def __init__(self, path: str, fields: FieldNames = FieldNames()):
        self.path = str(path)
        self.fields = fields
        self.count = 0
        self.skipped: list[str] = []
        self.n_skipped = 0
        self.bom = False
        self.newline = "\n"
        self.header: list[str] | None = None
        self._stamp = None

    # -- what each format provides -------------------------------------------------------------
    def _entries(self) -> Iterator[tuple[object, object, str, tuple[str, str] | None]]:
        """``(raw, record, where, error)`` for every record in source order; ``error`` is
        ``(message, hint)`` for a record that cannot be parsed (its ``record`` is None)."""
        raise NotImplementedError

    def _file_stamp(self):
        """Something that changes when the source changes (files: size and modification time)."""
        return None

    def write_rows(self, path: Path, rows: list[int]) -> Path:
        """Write the rows at ``rows`` (positions in the source, ascending) as a copy of the source.

        Args:
            path: the copy.
            rows: row positions.
        """
        raise DataFileError(f"{self.format} sources are copied line by line, not by row")

    # -- passes ---------------------------------------------------------------------------------
    def _pass(self, on_error: str = "skip", warn: Callable[[str], None] | None = None,
              skipped: list[str] | None = None) -> Iterator[tuple[Sample, object]]:
        """``(sample, raw)`` for every sample. With ``warn`` (the validating pass), malformed records
        are reported or fatal per ``on_error`` and their messages appended to ``skipped``;
        without it they are skipped silently, as the validating pass decided."""
        validating = warn is not None
        if not validating and self._stamp is not None and self._file_stamp() != self._stamp:
            raise self._changed()
        index = 0
        for raw, record, where, error in self._entries():
            if error is None:
                try:
                    sample = sample_from_record(record, index, where, self.fields)
                except DataFileError as exc:
                    error = (str(exc), RECORD_HINT)
            if error is not None:
                if validating:
                    _skip_or_fail(error[0], on_error, warn, skipped, hint=error[1])
                continue
            yield sample, raw
            index += 1
        if not validating and index != self.count:
            raise self._changed()

    def _changed(self) -> DataFileError:
        return DataFileError(f"{self.path} changed while it was being screened (it now reads differently from when "
                             "it was opened); screen it again once it is no longer being written")

    def scan(self, on_error: str = "fail", warn: Callable[[str], None] = logger.warning) -> "SampleStream":
        """Read the source once: validate every record, count the samples. Returns ``self``.

        Args:
            on_error: ``"fail"`` or ``"skip"`` for malformed records.
            warn: receives a message for each skipped record.
        """
        self._stamp = self._file_stamp()
        skipped = _CappedMessages()
        self.count = sum(1 for _ in self._pass(on_error, warn, skipped))
        self.skipped, self.n_skipped = list(skipped), skipped.total
        if self._file_stamp() != self._stamp:
            raise self._changed()
        if not self.count:
            raise DataFileError(f"{self.path}: no samples read" + (f" ({self.n_skipped} malformed)" if self.n_skipped else ""))
        return self

    def iter_samples(self) -> Iterator[Sample]:
        """Every sample, in index order (reads the source again)."""
        return (sample for sample, _ in self._pass())

    def chunks(self, size: int, only: Callable[[int], bool] | None = None) -> Iterator[tuple[int, list[Sample]]]:
        """``(chunk number, samples)`` for consecutive runs of ``size`` samples, read as the source
        is read; only one chunk is held at a time.

        Args:
            size: samples per chunk.
            only: yield (and build) only the chunks whose number it accepts (None: every chunk).
        """
        _check_chunk_size(size)
        current, number = [], 0
        for sample, _ in self._pass():
            if sample.index // size != number:
                if current:
                    yield number, current
                current, number = [], sample.index // size
            if only is None or only(number):
                current.append(sample)
        if current:
            yield number, current

    def sample_rows(self) -> Iterator[object]:
        """What each sample was read from, in index order: its row (parquet, datasets), line
        (JSONL) or CSV row. Rows differ from indices only where malformed records were skipped."""
        return (raw for _, raw in self._pass())

    def fetch(self, indices: Iterable[int]) -> dict[int, Sample]:
        """The samples at ``indices``, by index (one pass, stopped at the last one wanted).

        Args:
            indices: sample indices (:attr:`Sample.index`).
        """
        wanted = set(indices)
        found: dict[int, Sample] = {}
        if not wanted:
            return found
        last = max(wanted)
        for sample, _ in self._pass():
            if sample.index in wanted:
                found[sample.index] = sample
            if sample.index >= last:
                break
        return found

    def write(self, path: str | Path, indices: Sequence[int]) -> Path:
        """Write the samples at ``indices`` in the input's format, reading the input again (see
        :meth:`SampleSource.write`: verbatim lines, encoding and line endings kept, written to a
        temporary file and renamed into place).

        Args:
            path: the file (a directory for a dataset) to write.
            indices: sample indices (:attr:`Sample.index`) to keep.
        """
        path = Path(path)
        chosen = set(indices)
        raws = (raw for sample, raw in self._pass() if sample.index in chosen)
        if self.format in ("jsonl", "csv"):
            return _write_text(path, self.format, self.bom, self.newline, self.header, raws)
        return self.write_rows(path, list(raws))


class _TextStream(SampleStream):
    """A UTF-8 text file (JSONL or CSV), read line by line with its line endings kept."""

    def __init__(self, path: Path, fields: FieldNames):
        super().__init__(str(path), fields)
        self.file = path
        with open(path, "rb") as handle:
            self.bom = handle.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8

    def _file_stamp(self):
        stat = self.file.stat()
        return stat.st_size, stat.st_mtime_ns

    def _lines(self) -> Iterator[str]:
        """The file's lines without its byte-order mark, split at \\n, \\r and \\r\\n only (not at
        U+2028 and the like, as str.splitlines would), endings kept."""
        try:
            with open(self.file, encoding="utf-8-sig", newline="") as handle:
                yield from handle
        except UnicodeDecodeError:
            reason, offset = _utf8_error(self.file)
            raise DataFileError(f"{self.path}: not UTF-8 text ({reason} at byte {offset}); save it as UTF-8") from None

    def _first_line(self) -> str:
        lines = self._lines()
        try:
            return next(lines, "")
        finally:
            lines.close()


class _JsonlStream(_TextStream):
    format = "jsonl"

    def __init__(self, path: Path, fields: FieldNames):
        super().__init__(path, fields)
        first = self._first_line()
        self.newline = _line_ending(first) if first else "\n"

    def _entries(self):
        for number, line in enumerate(self._lines(), start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield line, None, where, (f"{where}: not valid JSON ({error.msg} at column {error.colno})", JSON_HINT)
                continue
            yield line, record, where, None


class _CsvStream(_TextStream):
    format = "csv"

    def __init__(self, path: Path, fields: FieldNames):
        super().__init__(path, fields)
        first = self._first_line()
        self.newline = _line_ending(first) if first else "\r\n"

    def _entries(self):
        lines = self._lines()
        reader = csv.reader(lines)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFileError(f"{self.path}: empty CSV file (expected a header row)") from None
        self.header = header
        for row in reader:
            where = f"{self.path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield row, None, where, (f"{where}: {len(row)} fields, the header has {len(header)}", RECORD_HINT)
                continue
            yield row, dict(zip(header, row)), where, None


def _pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise DataFileError(f"reading {what} needs pyarrow, which comes with the train extra: "
                            "pip install 'persona-guard[train]' (or give a .jsonl or .csv file)") from error
    return pyarrow, pyarrow.parquet


class _ParquetStream(SampleStream):
    """A parquet file, read a batch of rows at a time."""

    format = "parquet"
    BATCH = 1024

    def __init__(self, path: Path, fields: FieldNames):
        super().__init__(str(path), fields)
        self.file = path
        _, parquet = _pyarrow(f"{path} (a parquet file)")
        try:
            parquet.ParquetFile(str(path)).close()
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataFileError(f"{path}: not a readable parquet file ({_first_line(error)})") from None

    def _file_stamp(self):
        stat = self.file.stat()
        return stat.st_size, stat.st_mtime_ns

    def _entries(self):
        _, parquet = _pyarrow(self.path)
        table = parquet.ParquetFile(str(self.file))
        try:
            row = 0
            for batch in table.iter_batches(batch_size=self.BATCH):
                for record in batch.to_pylist():
                    yield row, record, f"{self.path} row {row}", None
                    row += 1
        finally:
            table.close()

    def write_rows(self, path: Path, rows: list[int]) -> Path:
        """The rows at ``rows`` under the input's schema (its metadata included), as a parquet file
        written to a temporary file and renamed into place.

        Args:
            path: the copy (a file).
            rows: row positions, ascending.
        """
        pyarrow, parquet = _pyarrow(self.path)
        path = Path(path)
        if path.is_dir():
            raise DataFileError(f"{path} is a directory; give a file name for the filtered copy")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        source = parquet.ParquetFile(str(self.file))
        try:
            schema = source.schema_arrow
            with parquet.ParquetWriter(str(tmp), schema) as writer:
                start, position = 0, 0
                for batch in source.iter_batches(batch_size=self.BATCH):
                    end = start + batch.num_rows
                    stop = bisect.bisect_left(rows, end, position)
                    if stop > position:
                        take = pyarrow.array([r - start for r in rows[position:stop]], type=pyarrow.int64())
                        writer.write_table(pyarrow.Table.from_batches([batch.take(take)]).cast(schema))
                    start, position = end, stop
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            source.close()
        return path


class _DatasetStream(SampleStream):
    """A ``datasets.Dataset`` (memory-mapped Arrow), read a batch of rows at a time."""

    format = "datasets"
    BATCH = 1000

    def __init__(self, name: str, dataset, fields: FieldNames):
        super().__init__(name, fields)
        self.dataset = dataset

    def _entries(self):
        row = 0
        for batch in self.dataset.iter(batch_size=self.BATCH):
            names = list(batch)
            for values in zip(*(batch[name] for name in names)):
                yield row, dict(zip(names, values)), f"{self.path} row {row}", None
                row += 1

    def write_rows(self, path: Path, rows: list[int]) -> Path:
        """``select`` + ``save_to_disk`` into a temporary directory, then swapped in. An existing
        ``path`` is replaced only if it is empty or a saved dataset, never another directory.

        Args:
            path: the copy (a directory).
            rows: row positions, ascending.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        check_dataset_copy_path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        try:
            self.dataset.select(rows).save_to_disk(str(tmp))
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_text(path: Path, fmt: str, bom: bool, newline: str, header: list[str] | None, raws: Iterable) -> Path:
    """A JSONL (verbatim lines) or CSV (rows under ``header``) copy, written to a temporary file
    in the input's encoding and line endings and renamed into place."""
    if path.is_dir():
        raise DataFileError(f"{path} is a directory; give a file name for the filtered copy")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as out:
            if fmt == "jsonl":
                for line in raws:
                    out.write(line if line.endswith(("\n", "\r")) else line + newline)
            else:
                writer = csv.writer(out, lineterminator=newline)
                writer.writerow(header)
                writer.writerows(raws)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def _skip_or_fail(message: str, on_error: str, warn, skipped: list[str], hint: str = RECORD_HINT) -> None:
    if on_error == "fail":
        raise DataFileError(message + hint)
    warn(message + "; skipped")
    skipped.append(message)


def _utf8_error(path: Path) -> tuple[str, int]:
    """The reason and absolute byte offset of the first invalid UTF-8 in ``path`` (read in blocks)."""
    base, carry = 0, b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(1 << 20)
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as error:
                # A character cut by the block boundary is only an error at the end of the file.
                if block and error.reason == "unexpected end of data" and error.start >= len(data) - 3:
                    carry = data[error.start:]
                    base += error.start
                    continue
                return error.reason, base + error.start
            if not block:
                return "invalid data", base
            base += len(data)


def _line_ending(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else "\r" if line.endswith("\r") else "\n"


def _first_line(error: BaseException, limit: int = 120) -> str:
    detail = (str(error).strip().splitlines() or [""])[0]
    return detail if len(detail) <= limit else detail[:limit - 1] + "…"


def _datasets(name: str):
    try:
        import datasets
    except ImportError as error:  # the train extra, not core: say which to install
        raise DataFileError(f"reading {name} (a datasets directory or hub dataset) needs the 'datasets' package, "
                            "which comes with the train extra: pip install 'persona-guard[train]' "
                            "(or give a .jsonl or .csv file)") from error
    return datasets


def _load_dataset(name: str, split: str | None, config: str | None, data_files) -> object:
    """A ``datasets.Dataset``: from a saved directory, or through ``load_dataset`` (a hub id with an
    optional config, or a builder such as ``json`` / ``parquet`` with ``data_files``) from local
    files and the local cache only."""
    datasets = _datasets(name)
    path = Path(name)
    if path.is_dir() and data_files is None and _is_saved_dataset(path):
        if config is not None:
            raise DataFileError(f"{path} is a saved dataset directory, which has no configs; drop --config")
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir() and data_files is None and not any(path.iterdir()):
        raise DataFileError(f"{path} is an empty directory; give a .jsonl, .csv or .parquet file or a saved dataset")
    else:
        # A hub id, a builder with data files, or a directory of data files (its README may name configs).
        # Only local files and the local cache: nothing here may reach the hub.
        try:
            with hub_offline():
                loaded = datasets.load_dataset(name, config, data_files=data_files, split=split)
        except Exception as error:  # datasets raises several types for "not cached"
            detail = f"{type(error).__name__}: {_first_line(error)}"
            if data_files is not None:
                raise DataFileError(f"{name} with data files {', '.join(map(str, data_files))}: could not be "
                                    f"loaded ({detail}); check the files and the builder (json, csv, parquet)"
                                    ) from None
            config_text = f" (config {config})" if config else ""
            if path.is_dir():
                raise DataFileError(f"{path}{config_text} is a directory, but neither one saved by datasets' "
                                    f"save_to_disk nor data files datasets can load ({detail}); give a .jsonl, .csv "
                                    "or .parquet file, or its files with --data-files") from None
            raise DataFileError(f"{name}{config_text}: not a local file or directory, and not in the local datasets "
                                f"cache ({detail}); nothing is downloaded here: give a local file, or download "
                                "the dataset once with datasets.load_dataset") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or ("train" if "train" in loaded else next(iter(loaded)))
        if split not in loaded:
            raise DataFileError(f"{name}: no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded


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


def _stream_for(source, fields: FieldNames, split: str | None, config: str | None, data_files) -> SampleStream:
    """The unread stream for ``source`` (see :func:`open_samples`)."""
    if data_files is not None:
        data_files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
        if not data_files:
            raise DataFileError("no data files given; name at least one (--data-files)")
        data_files = [str(f) for f in data_files]
    path = Path(source).expanduser() if str(source).startswith("~") else Path(source)
    if data_files is None and not path.exists() and looks_local(source):
        raise DataFileError(missing_file_message(source) + "; check the path")
    if path.is_file():
        if data_files is not None or config is not None:
            option = "--data-files" if data_files is not None else "--config"
            raise DataFileError(f"{path} is a file: {option} goes with a hub dataset id or a datasets builder "
                                "(json, csv, parquet) as the data; drop it, or give the builder")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _JsonlStream(path, fields)
        if suffix == ".csv":
            return _CsvStream(path, fields)
        if suffix == ".parquet":
            return _ParquetStream(path, fields)
        raise DataFileError(f"{path}: unknown format {suffix!r}; use .jsonl, .csv, .parquet or a saved datasets "
                            "directory")
    return _DatasetStream(str(source), _load_dataset(str(source), split, config, data_files), fields)


def open_samples(source: str | Path, *, fields: FieldNames = FieldNames(), on_error: str = "fail",
                 split: str | None = None, config: str | None = None, data_files=None,
                 warn: Callable[[str], None] = logger.warning) -> SampleStream:
    """Open a source for streaming (:class:`SampleStream`): a ``.jsonl`` / ``.csv`` / ``.parquet``
    file, a saved ``datasets`` directory, a hub dataset id (with a config) already in the local
    cache, or a ``datasets`` builder (``json``, ``csv``, ``parquet``) over ``data_files``. The
    source is read through once here: every malformed record is reported (or fatal) now, and the
    samples are counted; nothing is kept but the count and the skip messages. The hub is never
    contacted.

    Args:
        source: the file, directory, dataset id or builder name.
        fields: where the text is in each record.
        on_error: ``"fail"`` or ``"skip"`` for malformed records.
        split: the split of a dataset (default: train, or its first split).
        config: the dataset's configuration name (hub datasets).
        data_files: files (or glob patterns) for ``datasets.load_dataset(source, data_files=...)``.
        warn: receives a message for each skipped record.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return _stream_for(source, fields, split, config, data_files).scan(on_error, warn)


def dataset_stream(dataset, *, fields: FieldNames = FieldNames(), on_error: str = "fail", name: str = "the dataset",
                   warn: Callable[[str], None] = logger.warning) -> SampleStream:
    """A :class:`SampleStream` over a ``datasets.Dataset`` already in hand (validated and counted,
    as :func:`open_samples` does).

    Args:
        dataset: the ``datasets.Dataset``.
        fields: where the text is in each row.
        on_error: ``"fail"`` or ``"skip"`` for malformed rows.
        name: how messages name it.
        warn: receives a message for each skipped row.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return _DatasetStream(name, dataset, fields).scan(on_error, warn)


def load_samples(source: str | Path, *, fields: FieldNames = FieldNames(), on_error: str = "fail",
                 split: str | None = None, config: str | None = None, data_files=None,
                 warn: Callable[[str], None] = logger.warning) -> SampleSource:
    """Read every sample into memory (:class:`SampleSource`) from the sources :func:`open_samples`
    takes: a ``.jsonl`` / ``.csv`` / ``.parquet`` file, a saved ``datasets`` directory, a hub
    dataset id already in the local cache (never downloaded: the hub is not contacted), or a
    builder over ``data_files``. A path that does not exist and cannot be a hub id is "file not
    found" at once. Malformed records are reported with their line (or row) and, per
    ``on_error``, skipped or fatal (:class:`DataFileError`). UTF-8 byte-order marks are accepted.

    Args:
        source: the file, directory, dataset id or builder name.
        fields: where the text is in each record.
        on_error: ``"fail"`` or ``"skip"`` for malformed records.
        split: the split of a dataset (default: train, or its first split).
        config: the dataset's configuration name (hub datasets).
        data_files: files (or glob patterns) for ``datasets.load_dataset(source, data_files=...)``.
        warn: receives a message for each skipped record.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    stream = _stream_for(source, fields, split, config, data_files)
    result = SampleSource(stream.path, stream.format, [], bom=stream.bom, newline=stream.newline, _stream=stream)
    stream._stamp = stream._file_stamp()
    for sample, raw in stream._pass(on_error, warn, result.skipped):
        result.samples.append(sample)
        result._raw.append(raw)
    result._header = stream.header
    stream.count, stream.n_skipped = len(result.samples), len(result.skipped)
    if not result.samples:
        raise DataFileError(f"{source}: no samples read" + (f" ({len(result.skipped)} malformed)" if result.skipped else ""))
    return result
