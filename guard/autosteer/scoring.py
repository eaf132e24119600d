"""Scoring one way of running the model (a system prompt, a steering, both) on a contrastive set:
per prompt a concept, a fluency and a relevance score in [0, 1], and their harmonic mean (0 when
any is 0, as AxBench scores).

``concept``    judge-free: ``sigmoid(gap / concept_temperature)``, with ``gap`` the pairwise
               preference (mean log-probability per token) of the answer the *prompted* model wrote
               over the one the unprompted model wrote, under the condition. With a judge: its 0-100
               score of the condition's greedy answer under a rubric written from the description, / 100.
``fluency``    ``min(1, exp(l - l_ref)) * (1 - repetition)``: ``l`` is the mean log-probability per
               token of the condition's greedy answer under the *unsteered* model with the neutral
               system prompt, ``l_ref`` the same for the prompted model's answers (fluent text that
               shows the concept scores 1); ``repetition`` is the 3-gram repetition rate. An empty
               answer scores 0.
``relevance``  ``min(1, exp(l_n - l_n_ref))``: the log-probability per token of the neutral answer to
               the prompt under the condition, against the unsteered model's (an answer that still
               addresses the prompt stays likely).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.stats import repetition_rate
from ..measure.behavior import pairwise_preference
from .data import ContrastiveSet, greedy_answers
from .search import harmonic_mean

SCORES = ("concept", "fluency", "relevance", "harmonic")

CONCEPT_RUBRIC = """I am evaluating whether a language model's answer shows a behaviour.

The behaviour: {description}

Here is the question the user asked:
[QUESTION START]
{{question}}
[QUESTION END]

Here is the model's answer:
[ANSWER START]
{{answer}}
[ANSWER END]

Rate from 0 to 100 how strongly the answer shows the behaviour. 0 means not at all, 100 means
clearly and throughout. Judge only the behaviour, not correctness or fluency.

Respond with a number between 0 and 100. Don't say anything else, just the number."""


def concept_rubric(description: str) -> str:
    """The judge rubric of the concept score, written from the description (``{question}`` and
    ``{answer}`` placeholders left for the judge).

    Args:
        description: the behaviour, in one sentence.
    """
    return CONCEPT_RUBRIC.format(description=description.replace("{", "{{").replace("}", "}}"))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Reference:
    """The unsteered model's figures the scores are relative to, on one contrastive set.

    Args:
        prompted_loglik: mean log-probability per token of the prompted answers under the unsteered
            model with the neutral system prompt (``l_ref`` of fluency).
        neutral_logliks: per prompt, that of the neutral answer (``l_n_ref`` of relevance).
    """

    prompted_loglik: float
    neutral_logliks: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"prompted_loglik": self.prompted_loglik, "neutral_logliks": list(self.neutral_logliks)}


def reference(model, tokenizer, data: ContrastiveSet, neutral_system: str | None, *, batch_size: int = 16) -> Reference:
    """The unsteered figures of ``data`` (see :class:`Reference`).

    Args:
        model, tokenizer: the model and its tokenizer.
        data: the contrastive set.
        neutral_system: the neutral system prompt (empty: none).
        batch_size: sequences per forward.
    """
    result = pairwise_preference(model, tokenizer, data.pairs(), system=neutral_system or None, batch_size=batch_size)
    return Reference(sum(result.trait_logprob) / len(result.trait_logprob), tuple(result.non_trait_logprob))


@dataclass
class ConditionScores:
    """Per-prompt scores of one condition on one contrastive set.

    Args:
        values: per score name (:data:`SCORES`, plus ``gap``, ``generation_loglik``, ``repetition``),
            one value per prompt (NaN where a judge gave no score).
        answers: the condition's greedy answers, in prompt order.
    """

    values: dict[str, list[float]]
    answers: list[str]

    def mean(self, key: str) -> float:
        """The mean of one score over prompts, NaN items left out (NaN when none is left)."""
        finite = [v for v in self.values[key] if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def summary(self) -> dict:
        """The mean of every score."""
        return {key: self.mean(key) for key in self.values}


def score_condition(model, tokenizer, data: ContrastiveSet, ref: Reference, *, system: str | None = None,
                    steering=None, neutral_system: str | None = None, max_new_tokens: int = 48,
                    concept_temperature: float = 0.5, judge=None, rubric: str | None = None,
                    batch_size: int = 16) -> ConditionScores:
    """Concept, fluency, relevance and their harmonic mean per prompt of ``data`` under one
    condition (see the module docstring).

    Args:
        model, tokenizer: the model and its tokenizer.
        data: the contrastive set scored.
        ref: the unsteered figures of ``data`` (:func:`reference`).
        system: the condition's system prompt (None: none).
        steering: the condition's :class:`~guard.core.steering.Steering` (None: none).
        neutral_system: the system prompt the unsteered model reads when it scores fluency.
        max_new_tokens: the greedy answers' length cap.
        concept_temperature: nats/token of preference gap that move the judge-free concept score
            from 0.5 to 0.73.
        judge: scores the concept of the greedy answers (None: judge-free).
        rubric: the judge's rubric (default :func:`concept_rubric` cannot be built here: pass it).
        batch_size: sequences per forward.
    """
    if judge is not None and rubric is None:
        raise ValueError("a judge needs the concept rubric (concept_rubric(description))")
    preference = pairwise_preference(model, tokenizer, data.pairs(), system=system, steering=steering,
                                     batch_size=batch_size)
    answers_ids = greedy_answers(model, tokenizer, data.prompts, system, max_new_tokens, steering=steering,
                                 batch_size=batch_size)
    answers = [tokenizer.decode(a, skip_special_tokens=True) for a in answers_ids]
    scorable = [i for i, text in enumerate(answers)
                if text.strip() and tokenizer(text, add_special_tokens=False)["input_ids"]]
    generation_loglik = [math.nan] * len(answers)
    if scorable:
        triples = [(data.prompts[i], answers[i], answers[i]) for i in scorable]
        scored = pairwise_preference(model, tokenizer, triples, system=neutral_system or None, batch_size=batch_size)
        for i, value in zip(scorable, scored.trait_logprob):
            generation_loglik[i] = value
    repetition = [repetition_rate(a) for a in answers_ids]
    fluency = [0.0 if math.isnan(ll) else min(1.0, math.exp(ll - ref.prompted_loglik)) * (1.0 - rep)
               for ll, rep in zip(generation_loglik, repetition)]
    relevance = [min(1.0, math.exp(now - before))
                 for now, before in zip(preference.non_trait_logprob, ref.neutral_logliks)]
    if judge is None:
        concept = [_sigmoid(g / concept_temperature) for g in preference.gaps]
    else:
        concept = []
        for prompt, text in zip(data.prompts, answers):
            score = judge.score(prompt, text, rubric) if text.strip() else 0.0
            concept.append(math.nan if score is None else float(score) / 100.0)
    harmonic = [harmonic_mean([c, f, r]) for c, f, r in zip(concept, fluency, relevance)]
    values = {"concept": concept, "fluency": fluency, "relevance": relevance, "harmonic": harmonic,
              "gap": list(preference.gaps), "generation_loglik": generation_loglik, "repetition": repetition}
    return ConditionScores(values, answers)


def mean_score(scores: ConditionScores, keys: Sequence[str] = SCORES) -> tuple[float, dict]:
    """The search objective: the mean harmonic score over prompts, with the means of ``keys`` beside it.

    Args:
        scores: a condition's scores.
        keys: the components reported beside the objective.
    """
    summary = {key: scores.mean(key) for key in keys}
    return summary["harmonic"], summary
