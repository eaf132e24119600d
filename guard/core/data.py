"""Reading user data files: JSONL with line-numbered errors, and prompt lists for the monitor.

A prompt is either a plain user message or a whole conversation (a list of ``{"role",
"content"}`` messages, ending where the assistant would reply).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import DataFileError

ON_ERROR = ("fail", "skip")



@dataclass(frozen=True)
class Prompt:
    """One monitored input: ``messages`` in chat format, the last one from the user."""

    messages: tuple[dict, ...]
    id: str = ""

    @classmethod
    def from_user(cls, text: str, system: str | None = None, id: str = "") -> "Prompt":
        return cls(tuple(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]), id)

    @property
    def text(self) -> str:
        """The last user message (for reports)."""
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")


def read_jsonl(path: str | Path, on_error: str = "fail",
               warn: Callable[[str], None] = lambda message: None) -> Iterator[tuple[int, object]]:
    """``(line number, parsed object)`` for every non-blank line. A malformed line raises
    :class:`DataFileError` naming it (``on_error="fail"``) or is reported through ``warn`` and
    skipped (``"skip"``)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                message = f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                if on_error == "fail":
                    raise DataFileError(message + "; fix the line, or skip malformed lines (--on-error skip)") from None
                warn(message + "; skipped")


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
    Labels may carry a leading space (" (A)") or be lists (the first counts), as in those files."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return [_ab_item(record, f"{path} item {n}") for n, record in enumerate(records, 1)]
    return [_ab_item(record, f"{path}:{n}") for n, record in read_jsonl(path)]


def _prompt_from_record(record, where: str) -> Prompt:
    if isinstance(record, str):
        return Prompt.from_user(record)
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    record_id = str(record.get("id", ""))
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise DataFileError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if messages[-1]["role"] == "assistant":  # a logged exchange: monitor the state before the reply
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataFileError(f"{where}: the conversation must end with a user message")
        return Prompt(tuple(messages), record_id)
    for key in ("prompt", "question", "text"):
        if isinstance(record.get(key), str):
            return Prompt.from_user(record[key], record.get("system"), record_id)
    raise DataFileError(f"{where}: no 'messages', 'prompt', 'question' or 'text' field")


def load_prompts(path: str | Path, on_error: str = "fail", warn: Callable[[str], None] = lambda m: None) -> list[Prompt]:
    """Prompts from a ``.jsonl`` file (``messages``, or ``prompt``/``question``/``text`` with an
    optional ``system``; ``id`` kept), a ``.json`` list of such records or strings, or any other
    text file (one user message per non-blank line)."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise DataFileError(f"{path}: a .json prompt file must hold a list (or use .jsonl, one record per line)")
        return [_prompt_from_record(record, f"{path} item {n}") for n, record in enumerate(records, 1)]
    if path.suffix == ".jsonl":
        prompts = []
        for number, record in read_jsonl(path, on_error, warn):
            try:
                prompts.append(_prompt_from_record(record, f"{path}:{number}"))
            except DataFileError as error:
                if on_error == "fail":
                    raise
                warn(f"{error}; skipped")
        return prompts
    return [Prompt.from_user(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def as_prompts(items: Sequence[str | dict | Prompt | Sequence[dict]]) -> list[Prompt]:
    """Accept user messages, conversations (lists of messages), records, or Prompts alike."""
    result = []
    for index, item in enumerate(items):
        if isinstance(item, Prompt):
            result.append(item)
        elif isinstance(item, (list, tuple)):
            result.append(_prompt_from_record({"messages": list(item)}, f"item {index}"))
        else:
            result.append(_prompt_from_record(item, f"item {index}"))
    return result
