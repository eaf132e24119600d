"""Judge-free trait metrics that run offline on any local causal LM.

Pairwise preference
    For each question with a trait-showing and a trait-free answer, the mean per-token
    log-probability of each answer given the chat-templated prompt (teacher forcing). The gap
    ``trait - non_trait`` says which answer the model would rather give; the mean
    log-likelihood over all answers is a coherence proxy (it falls when steering or finetuning
    breaks the model).

A/B behaviour rate
    Multiple-choice items in the CAA / Anthropic model-written-evals format. The prompt is the
    chat-templated question followed by ``"("`` (the assistant's answer prefilled as CAA does), and
    the next-token probabilities of the two labelled letters give the rate
    ``p(matching) / (p(matching) + p(not_matching))``. The letter bias ``p(A) / (p(A) + p(B))``
    is reported beside it, since on a label-balanced dataset a model that always says "A" scores
    50% too.

Both run batched with right padding (real tokens keep the positions they have alone, which
absolute-position models need) and optionally under a :class:`~guard.core.steering.Steering`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..core.chat import format_prompt
from ..core.data import ABItem, load_ab_items  # noqa: F401  (re-exported beside the A/B metric)
from ..core.forward import encode, pad_batch, plan_batches
from ..core.models import eval_mode


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _batches(sequences: list[list[int]], batch_size: int, progress: bool, desc: str):
    """Indices of ``sequences`` in length-sorted batches, so each batch pads little."""
    return tqdm(plan_batches([len(s) for s in sequences], batch_size), desc=desc, disable=not progress, unit="batch")


def _forward(model, sequences: list[list[int]], spans: list[tuple[int, int]], steering) -> torch.Tensor:
    """Logits of right-padded ``sequences`` (real tokens keep the positions they have alone).

    ``spans[i] = (start, end)`` is the part of sequence ``i`` that counts as the response: it
    becomes the response mask handed to the steering (which ignores it unless it steers "response").
    """
    device = next(model.parameters()).device
    # Pads sit after every real token and are masked out, so their id does not matter.
    ids, attn = pad_batch(sequences, 0, device, side="right")
    response = torch.zeros_like(attn)
    for row, (start, end) in enumerate(spans):
        response[row, start:end] = 1
    hooks = steering.apply(model, response_mask=response) if steering is not None else nullcontext()
    with hooks:
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits


# --- pairwise preference -------------------------------------------------------------------------


@dataclass
class PreferenceResult:
    """Mean per-token log-probabilities of the trait and non-trait answer of every pair."""

    trait_logprob: list[float]
    non_trait_logprob: list[float]

    @property
    def gaps(self) -> list[float]:
        return [t - n for t, n in zip(self.trait_logprob, self.non_trait_logprob)]

    @property
    def mean_gap(self) -> float:
        return _mean(self.gaps)

    @property
    def preference_rate(self) -> float:
        """Fraction of pairs whose trait answer is the likelier one."""
        return _mean([float(g > 0) for g in self.gaps])

    @property
    def mean_loglik(self) -> float:
        """Mean over every answer of both kinds: a coherence proxy."""
        return _mean(self.trait_logprob + self.non_trait_logprob)

    def to_dict(self) -> dict:
        return {"n": len(self.trait_logprob), "mean_gap": self.mean_gap, "preference_rate": self.preference_rate,
                "mean_loglik": self.mean_loglik, "mean_trait_logprob": _mean(self.trait_logprob),
                "mean_non_trait_logprob": _mean(self.non_trait_logprob)}


def _as_triple(pair) -> tuple[str, str, str]:
    if isinstance(pair, (tuple, list)):
        if len(pair) != 3:
            raise ValueError(f"a pair tuple must be (question, trait, non_trait); got {len(pair)} items")
        return tuple(pair)  # type: ignore[return-value]
    return pair.question, pair.trait, pair.non_trait


@torch.inference_mode()
def pairwise_preference(model, tokenizer, pairs, *, system: str | None = None, steering=None,
                        batch_size: int = 16, progress: bool = False) -> PreferenceResult:
    """Score both answers of every pair by their mean token log-probability under the model.

    ``pairs`` holds :class:`guard.traits.Example` objects or ``(question, trait, non_trait)``
    tuples. Answers are tokenized on their own and appended to the prompt's tokens, without an
    end-of-turn token (it would reward short answers for ending, not for their content).

    Args:
        model, tokenizer: the model scored and its tokenizer.
        pairs: the example pairs (see above).
        system: a system prompt for every question (None: none).
        steering: a :class:`~guard.core.steering.Steering` applied while scoring (its "response"
            positions are the answer tokens), or None.
        batch_size: sequences per forward (each pair gives two).
        progress: show a progress bar.
    """
    triples = [_as_triple(p) for p in pairs]
    if not triples:
        raise ValueError("no pairs given")
    sequences, spans = [], []
    for question, trait, non_trait in triples:
        prompt = encode(tokenizer, [format_prompt(tokenizer, question, system)])[0]
        for response in (trait, non_trait):
            answer = tokenizer(response, add_special_tokens=False)["input_ids"]
            if not prompt or not answer:
                raise ValueError(f"empty prompt or answer for question {question!r}")
            sequences.append(prompt + answer)
            spans.append((len(prompt), len(prompt) + len(answer)))
    scores = [0.0] * len(sequences)
    with eval_mode(model):
        for batch in _batches(sequences, batch_size, progress, "pairwise"):
            logits = _forward(model, [sequences[i] for i in batch], [spans[i] for i in batch], steering)
            for row, i in enumerate(batch):
                start, end = spans[i]
                # Position t predicts token t + 1; float32 so bf16 logits do not round the sums.
                logprobs = logits[row, start - 1:end - 1].float().log_softmax(dim=-1)
                targets = torch.tensor(sequences[i][start:end], device=logprobs.device)
                scores[i] = float(logprobs.gather(1, targets[:, None]).mean())
    return PreferenceResult(trait_logprob=scores[0::2], non_trait_logprob=scores[1::2])


# --- A/B behaviour rate --------------------------------------------------------------------------


@dataclass
class ABResult:
    """Per-item next-token probabilities of the answer letters, and their summaries."""

    p_matching: list[float]
    p_not_matching: list[float]
    p_a: list[float]
    p_b: list[float]

    @property
    def rate(self) -> list[float]:
        """Per item, the matching letter's share of the two labelled letters' probability."""
        return [m / (m + n) if m + n > 0 else math.nan for m, n in zip(self.p_matching, self.p_not_matching)]

    @property
    def behavior_rate(self) -> float:
        return _mean(self.rate)

    @property
    def letter_bias(self) -> float:
        """Mean of ``p(A) / (p(A) + p(B))`` whatever the labels: 0.5 is no preference for a letter."""
        return _mean([a / (a + b) if a + b > 0 else math.nan for a, b in zip(self.p_a, self.p_b)])

    @property
    def mass(self) -> float:
        """Mean probability on the two labelled letters: low means the model is not answering A/B."""
        return _mean([m + n for m, n in zip(self.p_matching, self.p_not_matching)])

    def to_dict(self) -> dict:
        return {"n": len(self.p_matching), "behavior_rate": self.behavior_rate, "letter_bias": self.letter_bias,
                "mass": self.mass}


def letter_token_id(tokenizer, prefix: str, letter: str) -> int:
    """The token the tokenizer produces for ``letter`` right after ``prefix`` (which ends in "(")."""
    before = encode(tokenizer, [prefix])[0]
    after = encode(tokenizer, [prefix + letter])[0]
    if len(after) == len(before) + 1 and after[:len(before)] == before:
        return after[-1]
    # The letter merged with what precedes it; fall back to the letter's token after a bare "(".
    return tokenizer("(" + letter, add_special_tokens=False)["input_ids"][-1]


@torch.inference_mode()
def ab_behavior_rate(model, tokenizer, items: Sequence[ABItem], *, system: str | None = None, steering=None,
                     batch_size: int = 16, progress: bool = False) -> ABResult:
    """Probability of the behaviour-matching letter after ``"("`` for every item.

    Softmax over the whole vocabulary, so ``mass`` shows how much of it goes to the answer
    letters at all. Under a "response" steering the prefilled ``"("`` (and the token before it)
    are steered.

    Args:
        model, tokenizer: the model measured and its tokenizer.
        items: the :class:`ABItem` questions with their matching and not-matching letters.
        system: a system prompt for every question (None: none).
        steering: a :class:`~guard.core.steering.Steering` applied while reading, or None.
        batch_size: items per forward.
        progress: show a progress bar.
    """
    if not items:
        raise ValueError("no A/B items given")
    texts = [format_prompt(tokenizer, item.question, system) + "(" for item in items]
    sequences = encode(tokenizer, texts)
    letter_ids: dict[str, int] = {}  # one lookup per letter; the token after "(" does not vary

    def token_of(letter: str, text: str) -> int:
        if letter not in letter_ids:
            letter_ids[letter] = letter_token_id(tokenizer, text, letter)
        return letter_ids[letter]

    wanted = [[token_of(letter, text) for letter in (item.matching, item.not_matching, "A", "B")]
              for item, text in zip(items, texts)]
    last = [(len(s) - 1, len(s)) for s in sequences]  # the "(" is the one "response" position
    probs = [[0.0] * 4 for _ in items]
    with eval_mode(model):
        for batch in _batches(sequences, batch_size, progress, "A/B"):
            logits = _forward(model, [sequences[i] for i in batch], [last[i] for i in batch], steering)
            rows = torch.arange(len(batch), device=logits.device)
            ends = torch.tensor([last[i][0] for i in batch], device=logits.device)
            dist = logits[rows, ends].float().softmax(dim=-1)
            ids = torch.tensor([wanted[i] for i in batch], device=logits.device)
            for row, i in enumerate(batch):
                probs[i] = dist[row, ids[row]].tolist()
    matching, not_matching, a, b = (list(column) for column in zip(*probs))
    return ABResult(p_matching=matching, p_not_matching=not_matching, p_a=a, p_b=b)
