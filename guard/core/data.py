"""Reading user data files: JSONL with line-numbered errors, and prompt lists for the monitor.

A prompt is either a plain user message or a whole conversation (a list of ``{"role",
"content"}`` messages, ending where the assistant would reply).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import DataFileError

logger = logging.getLogger(__name__)  # warnings reach Python users who pass no warn=

ON_ERROR = ("fail", "skip")



@dataclass(frozen=True)
class Prompt:
    """One monitored input: ``messages`` in chat format, the last one from the user."""

    messages: tuple[dict, ...]
    id: str = ""

    @classmethod
    def from_user(cls, text: str, system: str | None = None, id: str = "") -> "Prompt":
        """A prompt of one user message, after an optional system message.

        Args:
            text: the user message.
            system: a system message to put first (None or empty: none).
            id: the prompt's identifier, kept for reports.
        """
        return cls(tuple(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]), id)

    @property
    def text(self) -> str:
        """The last user message (for reports)."""
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")


SKIP_OPTION = "--on-error skip"


def read_jsonl(path: str | Path, on_error: str = "fail", warn: Callable[[str], None] = logger.warning, *,
               skip_option: str | None = SKIP_OPTION) -> Iterator[tuple[int, object]]:
    """``(line number, parsed object)`` for every non-blank line. A malformed line raises
    :class:`DataFileError` naming it (``on_error="fail"``) or is reported through ``warn`` and
    skipped (``"skip"``). A UTF-8 byte-order mark at the start of the file is ignored.

    Args:
        path: the ``.jsonl`` file.
        on_error: ``"fail"`` or ``"skip"``.
        warn: receives the message of each skipped line.
        skip_option: how the caller lets users skip malformed lines, suggested in the error
            (None: the caller has no such option, so only fixing the line is suggested).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    with open(path, encoding="utf-8-sig") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    message = f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                    if on_error == "fail":
                        hint = f", or skip malformed lines ({skip_option})" if skip_option else ""
                        raise DataFileError(f"{message}; fix the line{hint}") from None
                    warn(message + "; skipped")
        except UnicodeDecodeError as error:
            raise DataFileError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                                "save it as UTF-8") from None


@dataclass(frozen=True)
class ABItem:
    """One multiple-choice behaviour item (CAA / Anthropic model-written evals)."""

    question: str
    matching: str  # one uppercase letter, e.g. "A"
    not_matching: str


_LABEL = re.compile(r"\s*\(?\s*([A-Za-z])\s*\)?\s*")


def _letter(label, where: str) -> str:
    if isinstance(label, list) and label:  # CAA takes the first of several non-matching answers
        label = label[0]
    match = _LABEL.fullmatch(label) if isinstance(label, str) else None
    if not match:
        raise DataFileError(f"{where}: answer label {label!r} is not a single letter like '(A)'")
    return match.group(1).upper()


def _ab_item(record, where: str) -> ABItem:
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("question", "answer_matching_behavior", "answer_not_matching_behavior") if k not in record]
    if missing:
        raise DataFileError(f"{where}: missing {', '.join(missing)}")
    matching = _letter(record["answer_matching_behavior"], where)
    not_matching = _letter(record["answer_not_matching_behavior"], where)
    if matching == not_matching:
        raise DataFileError(f"{where}: matching and non-matching answers are both ({matching})")
    return ABItem(str(record["question"]), matching, not_matching)


def load_ab_items(path: str | Path) -> list[ABItem]:
    """A/B items from a JSON list (CAA) or a JSONL file (Anthropic model-written evals).
    Labels may carry a leading space (" (A)") or be lists (the first counts), as in those files.

    Args:
        path: the file; one starting with ``[`` is read as a JSON list, any other as JSONL.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return [_ab_item(record, f"{path} item {n}") for n, record in enumerate(records, 1)]
    return [_ab_item(record, f"{path}:{n}") for n, record in read_jsonl(path)]


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:39] + "…"


def check_messages(messages, where: str, what: str = "messages") -> None:
    """Refuse anything but a non-empty list of ``{"role": str, "content": str}`` messages,
    naming the message and the value at fault.

    Args:
        messages: the parsed value.
        where: the record's location for the message (``file:line``).
        what: the field's name.
    """
    if not isinstance(messages, list) or not messages:
        raise DataFileError(f"{where}: '{what}' must be a non-empty list of {{role, content}} messages, "
                            f"got {_shown(messages)}")
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataFileError(f"{where}: message {n} of '{what}' is {_shown(message)}, not a "
                                "{role, content} object")
        for key in ("role", "content"):
            if key not in message:
                raise DataFileError(f"{where}: message {n} of '{what}' has no '{key}' "
                                    f"(keys: {', '.join(map(str, message)) or 'none'})")
            if not isinstance(message[key], str):
                raise DataFileError(f"{where}: message {n} of '{what}' has {key} {_shown(message[key])} "
                                    f"({type(message[key]).__name__}); {key} must be a string")


def _prompt_from_record(record, where: str) -> Prompt:
    if isinstance(record, str):
        return Prompt.from_user(record)
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    record_id = str(record.get("id", ""))
    if "messages" in record:
        messages = record["messages"]
        check_messages(messages, where, "messages")
        if messages[-1]["role"] == "assistant":  # a logged exchange: monitor the state before the reply
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataFileError(f"{where}: the conversation must end with a user message")
        return Prompt(tuple(messages), record_id)
    for key in ("prompt", "question", "text"):
        if key in record:
            if not isinstance(record[key], str):
                raise DataFileError(f"{where}: '{key}' is {_shown(record[key])} ({type(record[key]).__name__}); "
                                    "it must be a string (or give chat 'messages')")
            system = record.get("system")
            if system is not None and not isinstance(system, str):
                raise DataFileError(f"{where}: 'system' is {_shown(system)} ({type(system).__name__}); "
                                    "it must be a string")
            return Prompt.from_user(record[key], system, record_id)
    raise DataFileError(f"{where}: no 'messages', 'prompt', 'question' or 'text' field")


PROMPT_COLUMNS = ("prompt", "question", "text")


def _read_text(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark dropped), or a :class:`DataFileError` if it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                            "save it as UTF-8") from None


def _prompts_from_csv(path: Path, on_error: str, warn, skip_option: str | None) -> list[Prompt]:
    """Prompts from a CSV file with a header row: the first of the prompt/question/text columns
    holds the user message; ``system`` and ``id`` columns are used when present."""
    import csv
    import io

    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        return []
    column = next((name for name in PROMPT_COLUMNS if name in header), None)
    if column is None:
        raise DataFileError(f"{path}: a CSV prompt file needs a header row with a "
                            f"{'/'.join(PROMPT_COLUMNS)} column (found: {', '.join(header) or 'none'})")
    prompts = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{reader.line_num}"
        if len(row) != len(header):
            message = f"{where}: {len(row)} fields, the header has {len(header)}"
            if on_error == "fail":
                hint = f", or skip malformed rows ({skip_option})" if skip_option else ""
                raise DataFileError(f"{message}; fix the row{hint}")
            warn(f"{message}; skipped")
            continue
        record = dict(zip(header, row))
        prompts.append(Prompt.from_user(record[column], record.get("system") or None, record.get("id", "")))
    return prompts


def load_prompts(path: str | Path, on_error: str = "fail", warn: Callable[[str], None] = logger.warning, *,
                 skip_option: str | None = SKIP_OPTION) -> list[Prompt]:
    """Prompts from a ``.jsonl`` file (``messages``, or ``prompt``/``question``/``text`` with an
    optional ``system``; ``id`` kept), a ``.json`` list of such records or strings, a ``.csv``
    file with a header (a prompt/question/text column, optional system and id columns), or any
    other text file (one user message per non-blank line). A UTF-8 byte-order mark is ignored.

    Args:
        path: the prompt file.
        on_error: a malformed line or row: ``"fail"`` or ``"skip"`` (reported through ``warn``).
        warn: receives the message of each skipped line.
        skip_option: how the caller lets users skip malformed lines, suggested in errors (None:
            no such option, so only fixing the line is suggested).
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            records = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise DataFileError(f"{path}: a .json prompt file must hold a list (or use .jsonl, one record per line)")
        return [_prompt_from_record(record, f"{path} item {n}") for n, record in enumerate(records, 1)]
    if suffix == ".csv":
        return _prompts_from_csv(path, on_error, warn, skip_option)
    if suffix in (".jsonl", ".ndjson"):
        prompts = []
        for number, record in read_jsonl(path, on_error, warn, skip_option=skip_option):
            try:
                prompts.append(_prompt_from_record(record, f"{path}:{number}"))
            except DataFileError as error:
                if on_error == "fail":
                    raise
                warn(f"{error}; skipped")
        return prompts
    return [Prompt.from_user(line.strip()) for line in _read_text(path).splitlines() if line.strip()]


def as_prompts(items: Sequence[str | dict | Prompt | Sequence[dict]]) -> list[Prompt]:
    """Accept user messages, conversations (lists of messages), records, or Prompts alike.

    Args:
        items: each a user message (str), a record (dict, as in a prompt file), a
            :class:`Prompt` (kept as is), or a list/tuple of ``{"role", "content"}`` messages.
    """
    result = []
    for index, item in enumerate(items):
        if isinstance(item, Prompt):
            result.append(item)
        elif isinstance(item, (list, tuple)):
            result.append(_prompt_from_record({"messages": list(item)}, f"item {index}"))
        else:
            result.append(_prompt_from_record(item, f"item {index}"))
    return result
