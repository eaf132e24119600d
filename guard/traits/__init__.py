"""Trait definitions: instruction pairs, questions, a judge rubric and paired example responses.

A trait file is JSON with these keys (see ``sycophancy.json`` for a full example):

``name``                  short identifier, e.g. ``"sycophancy"``
``description``           what displaying the trait means
``instruction_pairs``     ``[{"pos": <system prompt eliciting it>, "neg": <system prompt suppressing it>}]``
``extraction_questions``  user messages answered under both prompts to build the vector
``evaluation_questions``  held-out user messages, disjoint from the extraction ones
``judge_rubric``          judge prompt with ``{question}`` and ``{answer}``, scoring 0-100
``examples``              ``[{"question", "trait", "non_trait"}]`` paired responses for judge-free checks
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import TraitError

REQUIRED_KEYS = ("name", "description", "instruction_pairs", "extraction_questions",
                 "evaluation_questions", "judge_rubric", "examples")
# What we hold our shipped traits to; user traits only need one of each.
SHIPPED_MINIMUMS = {"instruction_pairs": 5, "extraction_questions": 20, "evaluation_questions": 20}



@dataclass(frozen=True)
class InstructionPair:
    pos: str
    neg: str


@dataclass(frozen=True)
class Example:
    question: str
    trait: str
    non_trait: str


def split_examples(examples) -> tuple[list, list]:
    """(selection, held-out): alternate items, so both halves cover the whole list. Fewer than
    four cannot be split usefully; both halves are then all of them (see :attr:`TraitSplit.overlap`).

    Args:
        examples: the items to split, in order (any iterable).
    """
    examples = list(examples)
    if len(examples) < 4:
        return examples, examples
    return examples[0::2], examples[1::2]


@dataclass(frozen=True)
class TraitSplit:
    """The one split of a trait's items between choosing and reporting.

    Everything that chooses or tunes (layer selection, SAE latents, prompt and weight search)
    sees only ``selection_examples`` and ``validation_questions``; every held-out figure uses
    only ``heldout_examples`` and ``test_questions``.
    """

    selection_examples: tuple[Example, ...]
    heldout_examples: tuple[Example, ...]
    validation_questions: tuple[str, ...]
    test_questions: tuple[str, ...]

    @property
    def overlap(self) -> bool:
        """True when the trait has too few example pairs to split and both halves are all of them."""
        return bool(self.selection_examples) and self.selection_examples == self.heldout_examples


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    instruction_pairs: tuple[InstructionPair, ...]
    extraction_questions: tuple[str, ...]
    evaluation_questions: tuple[str, ...]
    judge_rubric: str
    examples: tuple[Example, ...] = field(default_factory=tuple)
    source: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("source")
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def judge_prompt(self, question: str, answer: str) -> str:
        """The trait's judge rubric with its placeholders filled.

        Args:
            question, answer: the question asked and the answer judged.
        """
        return self.judge_rubric.format(question=question, answer=answer)

    def split(self, seed: int = 0) -> TraitSplit:
        """The selection / held-out split used by every feature.

        Args:
            seed: shuffles the evaluation questions into validation and test halves. The
                example pairs alternate (selection gets pairs 0, 2, 4, ...) whatever the seed,
                so the layer recorded in a vector file was chosen on the same pairs.
        """
        selection, heldout = split_examples(self.examples)
        questions = list(self.evaluation_questions)
        random.Random(seed).shuffle(questions)
        half = len(questions) // 2
        return TraitSplit(tuple(selection), tuple(heldout), tuple(questions[:half]), tuple(questions[half:]))


def _problems(data) -> list[str]:
    if not isinstance(data, dict):
        return ["the file must hold a JSON object"]
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in data]
    problems += [f"unknown key {key!r}" for key in data if key not in REQUIRED_KEYS]

    def strings(key):
        if key not in data:
            return []
        value = data[key]
        if not isinstance(value, list) or not value:
            problems.append(f"{key!r} must be a non-empty list")
            return []
        bad = [i for i, s in enumerate(value) if not isinstance(s, str) or not s.strip()]
        if bad:
            problems.append(f"{key!r}: entries {bad} are not non-empty strings")
        dupes = sorted({s for s in value if isinstance(s, str) and value.count(s) > 1})
        if dupes:
            problems.append(f"{key!r}: duplicated entries {dupes[:3]}")
        return [s for s in value if isinstance(s, str)]

    for key in ("name", "description", "judge_rubric"):
        if key in data and (not isinstance(data[key], str) or not data[key].strip()):
            problems.append(f"{key!r} must be a non-empty string")
    extraction = strings("extraction_questions")
    evaluation = strings("evaluation_questions")
    overlap = set(extraction) & set(evaluation)
    if overlap:
        problems.append(f"extraction and evaluation questions must be disjoint; shared: {sorted(overlap)[:3]}")

    def records(key, fields, non_empty):
        """A list of objects with exactly ``fields``, each a non-empty string."""
        if key not in data:
            return
        shape = "{" + ", ".join(f'"{f}": str' for f in fields) + "}"
        value = data[key]
        if not isinstance(value, list) or (non_empty and not value):
            problems.append(f"{key!r} must be a {'non-empty ' if non_empty else ''}list of {shape}")
            return
        for i, item in enumerate(value):
            if not isinstance(item, dict) or set(item) != set(fields) or not all(
                    isinstance(v, str) and v.strip() for v in item.values()):
                problems.append(f"{key}[{i}] must be {shape} with non-empty strings")

    records("instruction_pairs", ("pos", "neg"), non_empty=True)
    records("examples", ("question", "trait", "non_trait"), non_empty=False)

    rubric = data.get("judge_rubric")
    if isinstance(rubric, str):
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(rubric) if f is not None}
        except ValueError as exc:
            problems.append(f"judge_rubric is not a valid format string ({exc}); write literal braces as {{{{ }}}}")
        else:
            if fields != {"question", "answer"}:
                problems.append("judge_rubric must use exactly the placeholders {question} and {answer}, "
                                f"found {sorted(fields)}")

    return problems


def parse_trait(data, source: str = "<dict>", shipped: bool = False) -> Trait:
    """Validate a trait mapping and build a :class:`Trait`; raises :class:`TraitError` listing all problems.

    Args:
        data: the trait mapping, as read from a trait JSON file.
        source: where it came from, for error messages and :attr:`Trait.source`.
        shipped: also hold it to the minimum counts of shipped traits (:data:`SHIPPED_MINIMUMS`).
    """
    problems = _problems(data)
    if shipped and not problems:
        problems += [f"{key!r} has {len(data[key])} entries; shipped traits need at least {n}"
                     for key, n in SHIPPED_MINIMUMS.items() if len(data[key]) < n]
    if problems:
        raise TraitError(f"invalid trait {source}:\n  - " + "\n  - ".join(problems))
    return Trait(
        name=data["name"].strip(),
        description=data["description"].strip(),
        instruction_pairs=tuple(InstructionPair(p["pos"], p["neg"]) for p in data["instruction_pairs"]),
        extraction_questions=tuple(data["extraction_questions"]),
        evaluation_questions=tuple(data["evaluation_questions"]),
        judge_rubric=data["judge_rubric"],
        examples=tuple(Example(**ex) for ex in data["examples"]),
        source=source,
    )


def evaluation_prompts(names) -> list[str]:
    """The evaluation questions of the named shipped traits, in order and without repeats: the
    ordinary prompts the monitor and the drift probe compare against. Unknown names raise TraitError."""
    prompts: list[str] = []
    for name in names:
        if name not in list_traits():
            raise TraitError(f"no shipped trait named {name!r}")
        prompts += [q for q in load_trait(name).evaluation_questions if q not in prompts]
    return prompts


def list_traits() -> list[str]:
    """Names of the traits shipped with persona-guard."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_trait(name_or_path: str | Path) -> Trait:
    """Load a shipped trait by name, or a user trait from a JSON file path.

    Args:
        name_or_path: a shipped trait's name (see :func:`list_traits`) or the path of an existing ``.json`` file.
    """
    path = Path(name_or_path)
    shipped = False
    if path.suffix != ".json" or not path.exists():
        if str(name_or_path) not in list_traits():
            if path.suffix == ".json":
                raise TraitError(f"trait file {path} does not exist")
            raise TraitError(f"unknown trait {str(name_or_path)!r}; shipped traits: {', '.join(list_traits())} "
                             "(or pass the path of your own trait .json file)")
        path = Path(str(resources.files(__name__) / f"{name_or_path}.json"))
        shipped = True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TraitError(f"{path} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    return parse_trait(data, source=str(path), shipped=shipped)
