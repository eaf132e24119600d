"""A broad offline corpus for ``sae train``: the text persona-guard ships, and the model's own
greedy answers to a wide bank of ordinary prompts under many system prompts (plain assistants and
styles), so that an SAE trained on it has latents for style, not only for trait questions.

    >>> texts = build_corpus(model, tokenizer)              # a few minutes for a 135M model on CPU
    >>> write_corpus(texts, "corpus.jsonl")                  # then: persona-guard sae train corpus.jsonl ...

Prompts are the auto-steering bank's *dev* split (never its test split: a held-out figure must
not read text the SAE was trained on), ordinary questions with plain answers, and the shipped
traits' extraction questions; shipped text is the traits' evaluation questions and their
*selection* example pairs (held-out pairs stay out).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import SAEError

STYLE_SYSTEMS = (
    "You are a helpful assistant.",
    "You are a grumpy old sea captain who speaks like a pirate.",
    "Réponds toujours en français.",
    "You are thrilled about everything and answer with boundless enthusiasm.",
    "You are talking to a small child; use simple words and short sentences.",
    "Answer in a formal, academic register.",
    "Answer in rhyming verse.",
)


def corpus_prompts(exclude: Iterable[str] = ()) -> list[str]:
    """The prompts the model answers: the auto-steering bank's dev split, ordinary questions and the
    shipped traits' extraction questions, in that order, without duplicates or ``exclude``.

    Args:
        exclude: prompts to leave out (held-out prompts of the caller's evaluation, say).
    """
    from ..autosteer.data import load_prompt_bank
    from ..measure.evaluate import NEUTRAL_QA
    from ..traits import list_traits, load_trait

    prompts = list(load_prompt_bank().dev) + [q for q, _ in NEUTRAL_QA]
    for name in list_traits():
        prompts += list(load_trait(name).extraction_questions)
    banned = set(exclude)
    return [p for p in dict.fromkeys(prompts) if p not in banned]


def shipped_texts(tokenizer) -> list[str]:
    """The shipped traits' evaluation questions and selection example pairs, in the chat template.

    Args:
        tokenizer: renders the chat template.
    """
    from ..core.chat import format_messages
    from ..traits import list_traits, load_trait

    texts = []
    for name in list_traits():
        trait = load_trait(name)
        for q in trait.evaluation_questions:
            texts.append(format_messages(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=False))
        for e in trait.split().selection_examples:
            for answer in (e.trait, e.non_trait):
                texts.append(format_messages(tokenizer, [{"role": "user", "content": e.question},
                                                         {"role": "assistant", "content": answer}],
                                             add_generation_prompt=False))
    return texts


def build_corpus(model, tokenizer, *, prompts: Sequence[str] | None = None, systems: Sequence[str] = STYLE_SYSTEMS,
                 max_new_tokens: int = 64, shipped: bool = True, batch_size: int = 16, progress: bool = False,
                 log: Callable[[str], None] = lambda m: None) -> list[str]:
    """Shipped text plus the model's greedy answer to every prompt under every system prompt, each
    a whole chat (system, user, assistant) in the model's template; empty answers are left out.

    Args:
        model, tokenizer: the model whose answers are written, and its tokenizer.
        prompts: the user prompts (None: :func:`corpus_prompts`).
        systems: the system prompts each prompt is answered under.
        max_new_tokens: each answer's length cap.
        shipped: start with :func:`shipped_texts`.
        batch_size: prompts per generation batch.
        progress: show progress bars.
        log: progress messages.
    """
    from ..autosteer.data import greedy_answers
    from ..core.chat import format_messages

    prompts = list(corpus_prompts() if prompts is None else prompts)
    if not prompts or not systems:
        raise SAEError("the corpus needs at least one prompt and one system prompt")
    if max_new_tokens < 1:
        raise SAEError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    texts = shipped_texts(tokenizer) if shipped else []
    for system in systems:
        log(f"answering {len(prompts)} prompts under {system!r}")
        answers = greedy_answers(model, tokenizer, prompts, system, max_new_tokens, batch_size=batch_size,
                                 progress=progress)
        for prompt, ids in zip(prompts, answers):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if answer:
                texts.append(format_messages(tokenizer, [{"role": "system", "content": system},
                                                         {"role": "user", "content": prompt},
                                                         {"role": "assistant", "content": answer}],
                                             add_generation_prompt=False))
    return texts


def write_corpus(texts: Iterable[str], path: str | Path) -> Path:
    """Write ``texts`` as JSONL (``{"text": ...}`` a line, what ``sae train`` reads), through a
    temporary file renamed into place: an interrupted write leaves no partial corpus.

    Args:
        texts: the documents.
        path: the ``.jsonl`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
