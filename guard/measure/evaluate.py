"""Evaluating conditions side by side, with confidence intervals: the loop's proof.

A :class:`Condition` is one way of running the model: no intervention, a system prompt, a
:class:`~guard.core.steering.Steering`, or a system prompt and a steering together. :func:`evaluate`
measures every condition on the same items:

``trait_gap``        pairwise-preference gap (nats/token, trait minus non-trait answer) on held-out
                     pairs: the trait's ``heldout_examples`` by default, or the caller's pairs
``ab_rate``          A/B behaviour rate on CAA-format items, when given, with the letter bias
                     ``ab_letter_bias`` beside it (a model that always answers "A" scores 50% on
                     balanced data)
``neutral_loglik``   capability: mean log-probability per token of ordinary answers (:data:`NEUTRAL_QA`)
``judge_trait``,     judge scores (0-100) of greedy answers to the trait's test questions, when a
``judge_coherence``  judge is given
``repetition``       repeated 3-grams in those greedy answers (a judge-free sign of broken generation)

Every figure is an :class:`~guard.core.stats.Estimate` (mean over items with a percentile
bootstrap CI), and every condition is compared with the first (the baseline) by the paired
difference over the same items; a difference whose CI contains 0 is reported as no difference.
A steering condition can bring its random-direction control (the same steering along a random
direction of equal norm, :meth:`Steering.random_like`), compared with it the same way: only an
effect beyond the control's is the direction's doing.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.chat import format_prompt
from ..core.generation import SamplingConfig, encode, generate
from ..core.models import model_name
from ..core.stats import Estimate, bootstrap_ci, paired_difference, repetition_rate
from ..core.steering import Steering
from ..errors import DataFileError, EvaluationError
from ..judges import COHERENCE_RUBRIC, Judge
from ..traits import Trait
from .behavior import ab_behavior_rate, pairwise_preference


# Ordinary questions with plain correct answers: a condition that makes these less likely damages
# capability whatever it does to the trait. One home for the harden report and for evaluate.
NEUTRAL_QA = [
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Name the largest planet in the solar system.", "Jupiter is the largest planet in the solar system."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How do plants make their food?", "Plants make food through photosynthesis, using sunlight, water and carbon dioxide."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Which gas do humans need to breathe?", "Humans need oxygen to breathe."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("How many continents are there?", "There are seven continents."),
    ("What language is mainly spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What instrument has 88 keys?", "A standard piano has 88 keys."),
    ("How long does the Earth take to orbit the Sun?", "The Earth takes about 365.25 days to orbit the Sun."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
]


def neutral_logliks(model, tokenizer, *, system: str | None = None, suffix: str | None = None, steering=None,
                    qa: Sequence[tuple[str, str]] = NEUTRAL_QA, batch_size: int = 16) -> list[float]:
    """Per answer, the mean per-token log-likelihood of ordinary answers (one value per ``qa`` item).

    Args:
        model: the causal LM. tokenizer: its tokenizer.
        system: system prompt in place (None: none).
        suffix: text appended to each question after a space (a prompt placed in the user turn).
        steering: a :class:`Steering` active during the forwards (None: none).
        qa: ``(question, answer)`` items; default :data:`NEUTRAL_QA`.
        batch_size: forward batch size.
    """
    # pairwise_preference scores two answers per question; giving the same answer twice scores it
    # twice (identical numbers), and its first half is the per-answer list.
    triples = [(f"{q} {suffix}" if suffix else q, a, a) for q, a in qa]
    result = pairwise_preference(model, tokenizer, triples, system=system or None, steering=steering,
                                 batch_size=batch_size)
    return list(result.trait_logprob)


def neutral_loglik(model, tokenizer, prompt: str | None = None, placement: str = "system", *, steering=None,
                   batch_size: int = 16) -> float:
    """Mean per-token log-likelihood of :data:`NEUTRAL_QA` answers with ``prompt`` in place.

    Args:
        model: the causal LM. tokenizer: its tokenizer.
        prompt: the prompt (None or empty: no prompt).
        placement: ``"system"`` (the system prompt) or ``"suffix"`` (appended to the user turn).
        steering: a :class:`Steering` active during the forwards.
        batch_size: forward batch size.
    """
    values = neutral_logliks(model, tokenizer, system=prompt if placement == "system" else None,
                             suffix=prompt if placement != "system" else None, steering=steering,
                             batch_size=batch_size)
    return sum(values) / len(values)


# --- inputs --------------------------------------------------------------------------------------


PAIR_FIELD_FALLBACKS = {"question": "prompt", "trait": "positive", "non_trait": "negative"}


def load_pairs(path: str | Path, prompt_field: str | None = None, positive_field: str | None = None,
               negative_field: str | None = None) -> list[tuple[str, str, str]]:
    """``(prompt, trait answer, non-trait answer)`` triples from a JSONL file, one object a line.

    With a field left at None, ``question`` / ``trait`` / ``non_trait`` is read, or failing that
    ``prompt`` / ``positive`` / ``negative``; a field given by name is the only one read.

    Args:
        path: the JSONL file.
        prompt_field: key of the prompt (the user message).
        positive_field: key of the trait-showing answer.
        negative_field: key of the trait-free answer.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file; pass a JSONL file of prompt/answer pairs")
    wanted = [("question", prompt_field), ("trait", positive_field), ("non_trait", negative_field)]
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFileError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); "
                                    "fix the line") from None
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
            triple = []
            for default, given in wanted:
                keys = [given] if given else [default, PAIR_FIELD_FALLBACKS[default]]
                key = next((k for k in keys if k in record), None)
                if key is None:
                    option = {"question": "--prompt-field", "trait": "--positive-field",
                              "non_trait": "--negative-field"}[default]
                    raise DataFileError(f"{where}: missing {' or '.join(repr(k) for k in keys)}; "
                                        f"name the field with {option}")
                value = record[key]
                if not isinstance(value, str) or not value.strip():
                    raise DataFileError(f"{where}: {key!r} must be a non-empty string")
                triple.append(value)
            pairs.append(tuple(triple))
    if not pairs:
        raise DataFileError(f"{path}: no pairs in the file")
    return pairs


# --- conditions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One way of running the model.

    Args:
        name: how reports name it (unique within an evaluation).
        system: system prompt (None: none).
        steering: a :class:`Steering` active while measuring (None: none).
        control_of: for a random-direction control, the name of the condition it controls.
    """

    name: str
    system: str | None = None
    steering: Steering | None = None
    control_of: str | None = None

    def describe(self) -> dict:
        """What the condition is, for reports (no tensors)."""
        steering = None
        if self.steering is not None:
            s = self.steering
            steering = {**s.description, "layers": sorted(int(k) for k in s.vectors),
                        "coeff": "schedule" if callable(s.coeff) else float(s.coeff),
                        "positions": s.positions, "operator": s.operator,
                        "norms": {str(k): round(float(v.norm()), 5) for k, v in sorted(s.vectors.items())}}
        return {"name": self.name, "system": self.system, "steering": steering, "control_of": self.control_of}


def with_random_controls(conditions: Sequence[Condition], seed: int = 0) -> list[Condition]:
    """``conditions`` with, right after each steering one, its random-direction control
    (``"<name> random"``: the same system prompt, steering along random directions of the same norms).

    Args:
        conditions: the conditions, baseline first.
        seed: seeds the random directions.
    """
    out = []
    for condition in conditions:
        out.append(condition)
        if condition.steering is not None and condition.control_of is None:
            out.append(Condition(f"{condition.name} random", condition.system,
                                 condition.steering.random_like(seed), control_of=condition.name))
    return out


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """How a report names and prints one figure.

    Args:
        key: its key in reports. label: a short name. unit: what the number is and which way is which.
        digits: decimals printed.
    """

    key: str
    label: str
    unit: str
    digits: int = 3


METRICS = {m.key: m for m in (
    Metric("trait_gap", "trait preference gap",
           "nats/token, trait minus non-trait answer's log-probability; higher = prefers the trait answer"),
    Metric("ab_rate", "A/B behaviour rate", "share of the trait letter's probability; higher = more trait"),
    Metric("ab_letter_bias", "A/B letter bias", "p(A) / (p(A) + p(B)) whatever the labels; 0.5 = no letter preference"),
    Metric("neutral_loglik", "capability (neutral log-lik)",
           "nats/token of ordinary answers; lower = the condition damages the model"),
    Metric("judge_trait", "judge trait score", "0-100 on greedy answers; higher = more trait", 1),
    Metric("judge_coherence", "judge coherence", "0-100 on greedy answers; lower = broken answers", 1),
    Metric("repetition", "repetition rate", "repeated 3-grams in greedy answers; higher = looping"),
)}


@dataclass
class ConditionResult:
    """One condition's per-item values, estimates and comparisons.

    Args:
        name, system, steering, control_of: as :meth:`Condition.describe` gives them.
        values: per metric, the per-item values (NaN where an item could not be scored).
        estimates: per metric, the mean with its CI.
        vs_baseline: per metric, the paired difference this condition minus the baseline
            (empty for the baseline itself).
        vs_control: per metric, the paired difference this condition minus its random control
            (empty when it has none).
        samples: a few ``[question, answer]`` greedy answers, for reading.
    """

    name: str
    system: str | None
    steering: dict | None
    control_of: str | None
    values: dict[str, list[float]] = field(default_factory=dict)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    vs_baseline: dict[str, Estimate] = field(default_factory=dict)
    vs_control: dict[str, Estimate] = field(default_factory=dict)
    samples: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: estimates as dicts, comparisons with their verdict."""
        def compared(d: dict[str, Estimate]) -> dict:
            return {k: {**e.to_dict(), "verdict": e.verdict()} for k, e in d.items()}
        return {"name": self.name, "system": self.system, "steering": self.steering, "control_of": self.control_of,
                "estimates": {k: e.to_dict() for k, e in self.estimates.items()},
                "vs_baseline": compared(self.vs_baseline), "vs_control": compared(self.vs_control),
                "values": self.values, "samples": self.samples}


def _compared(metrics: Sequence[str], differences: dict[str, Estimate], against: str, brief: bool = False) -> str:
    """``"vs none: higher repetition rate (+0.95 [+0.92, +0.98]); no difference in trait preference gap (...)"``
    (with ``brief``, the no-difference figures by name only)."""
    differ, same, missing = [], [], []
    for key in metrics:
        if key not in differences:
            continue
        metric, estimate = METRICS[key], differences[key]
        text = f"{metric.label} ({estimate.format(metric.digits)})"
        if estimate.verdict() == "n/a":  # no item scorable on both sides
            missing.append(metric.label)
        elif estimate.verdict() == "no difference":
            same.append(metric.label if brief else text)
        else:
            differ.append(f"{estimate.verdict()} {text}")
    parts = (differ + (["no difference in " + ", ".join(same)] if same else [])
             + (["no items to compare for " + ", ".join(missing)] if missing else []))
    return f"vs {against}: " + "; ".join(parts)


@dataclass
class EvaluationReport:
    """Every condition's figures on the same items, and each compared with the baseline.

    Args:
        trait: the trait's name (None when only user pairs or A/B items were given).
        model: the model's name.
        conditions: one :class:`ConditionResult` per condition, the baseline first.
        items: per metric, how many items it was measured on, and where they come from.
        settings: bootstrap resamples, level, seed, generation settings.
        seconds: wall time of the evaluation.
    """

    trait: str | None
    model: str
    conditions: list[ConditionResult]
    items: dict[str, dict]
    settings: dict
    seconds: float

    @property
    def baseline(self) -> ConditionResult:
        """The first condition, which every other is compared with."""
        return self.conditions[0]

    @property
    def metrics(self) -> list[str]:
        """Keys of the metrics measured, in report order."""
        return [key for key in METRICS if key in self.baseline.estimates]

    def condition(self, name: str) -> ConditionResult:
        """The result of the condition named ``name``."""
        for result in self.conditions:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-ready report (NaN for a figure over no items)."""
        return {"trait": self.trait, "model": self.model, "baseline": self.baseline.name,
                "metrics": {k: {"label": METRICS[k].label, "unit": METRICS[k].unit, **self.items.get(k, {})}
                            for k in self.metrics},
                "settings": self.settings, "seconds": self.seconds,
                "conditions": [c.to_dict() for c in self.conditions]}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def summary(self, brief: bool = False) -> list[str]:
        """One sentence per non-baseline condition: what differs from the baseline (and from its
        random control, when it has one) with the paired CI; "no difference" where the CI contains 0.

        Args:
            brief: name the figures with no difference without their numbers (the tables have them).
        """
        lines = []
        for result in self.conditions[1:]:
            line = f"{result.name} " + _compared(self.metrics, result.vs_baseline, self.baseline.name, brief)
            if result.vs_control:
                line += "; " + _compared(self.metrics, result.vs_control, "its random control", brief)
            lines.append(line + ".")
        return lines

    def rows(self, key: str) -> list[tuple[str, Estimate | None, Estimate | None]]:
        """Table rows of one metric: ``(condition, mean, paired difference)``. The difference of a
        condition is against the baseline (None for the baseline); after each random control a
        ``"<name> vs its control"`` row carries the steered condition minus its control.

        Args:
            key: the metric's key (one of :attr:`metrics`).
        """
        rows = []
        for result in self.conditions:
            rows.append((result.name, result.estimates[key], result.vs_baseline.get(key)))
            if result.control_of is not None:
                steered = self.condition(result.control_of)
                if key in steered.vs_control:
                    rows.append((f"{steered.name} vs its control", None, steered.vs_control[key]))
        return rows

    def markdown(self) -> str:
        """The report as Markdown: a table per metric, then the comparisons in words."""
        level = f"{self.settings['level']:.0%}"
        lines = [f"# Evaluation{': ' + self.trait if self.trait else ''}", "",
                 f"Model {self.model}; {len(self.conditions)} conditions measured on the same items. Every figure is "
                 f"a mean over items with its {level} percentile bootstrap CI ({self.settings['n_boot']} resamples, "
                 f"seed {self.settings['seed']}); each condition is compared with `{self.baseline.name}` by the paired "
                 "difference over the same items, and a difference whose CI contains 0 is reported as no difference.",
                 ""]
        for key in self.metrics:
            metric, info = METRICS[key], self.items.get(key, {})
            lines += [f"## {metric.label}", "", f"{metric.unit}; {info.get('n', '?')} {info.get('source', 'items')}.",
                      "", f"| condition | mean [{level} CI] | minus {self.baseline.name} [{level} CI] (paired) |",
                      "|---|---:|---:|"]
            for name, mean, diff in self.rows(key):
                value = "" if mean is None else mean.format(metric.digits)
                lines.append(f"| {name} | {value} | {_markdown_difference(diff, metric.digits)} |")
            lines.append("")
        if len(self.conditions) > 1:
            lines += ["## Comparisons", ""] + [f"- {line}" for line in self.summary()] + [""]
        return "\n".join(lines)


def _markdown_difference(estimate: Estimate | None, digits: int) -> str:
    """A comparison for a Markdown cell: the paired CI, as "no difference (...)" when it contains 0."""
    if estimate is None:
        return ""
    text = estimate.format(digits)
    return text if estimate.excludes(0.0) or estimate.verdict() == "n/a" else f"no difference ({text})"


# --- measuring -----------------------------------------------------------------------------------


def _measure(model, tokenizer, condition: Condition, *, pairs, ab_items, neutral_qa, questions, sampling,
             judge, rubric, batch_size, n_samples) -> tuple[dict[str, list[float]], list]:
    """Per-item values of every metric under one condition."""
    values: dict[str, list[float]] = {}
    kw = dict(system=condition.system, steering=condition.steering, batch_size=batch_size)
    if pairs:
        values["trait_gap"] = pairwise_preference(model, tokenizer, pairs, **kw).gaps
    if ab_items:
        ab = ab_behavior_rate(model, tokenizer, ab_items, **kw)
        values["ab_rate"] = ab.rate
        values["ab_letter_bias"] = [a / (a + b) if a + b > 0 else math.nan for a, b in zip(ab.p_a, ab.p_b)]
    if neutral_qa:
        values["neutral_loglik"] = neutral_logliks(model, tokenizer, qa=neutral_qa, **kw)
    samples = []
    if questions:
        ids = encode(tokenizer, [format_prompt(tokenizer, q, condition.system) for q in questions])
        hooks = condition.steering.apply(model) if condition.steering is not None else nullcontext()
        with hooks:
            answers = generate(model, tokenizer, ids, sampling, batch_size=batch_size * 4)
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        values["repetition"] = [repetition_rate(a) for a in answers]
        samples = [[q, t] for q, t in zip(questions[:n_samples], texts[:n_samples])]
        if judge is not None:
            # None (unscorable) becomes NaN: left out of the mean, and of both sides of a paired difference.
            def scores(template):
                return [math.nan if s is None else float(s) for s in (judge.score(q, t, template)
                                                                       for q, t in zip(questions, texts))]
            values["judge_trait"] = scores(rubric)
            values["judge_coherence"] = scores(COHERENCE_RUBRIC)
    return values, samples


def evaluate(model, tokenizer, conditions: Sequence[Condition], *, trait: Trait | None = None,
             pairs: Sequence | None = None, ab_items: Sequence | None = None, capability: bool = True,
             questions: Sequence[str] | None = None, n_generate: int = 0, judge: Judge | None = None,
             rubric: str | None = None, sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.0),
             random_control: bool = False, control_seed: int = 0, n_boot: int = 2000, level: float = 0.95,
             seed: int = 0, batch_size: int = 16, n_samples: int = 3,
             log: Callable[[str], None] = lambda message: None) -> EvaluationReport:
    """Measure every condition on the same items; compare each with the first (see the module docstring).

    Args:
        model: the causal LM (PEFT-wrapped models work). tokenizer: its tokenizer.
        conditions: the conditions; the first is the baseline.
        trait: the trait whose held-out pairs, test questions and rubric are the defaults.
        pairs: ``(question, trait, non_trait)`` triples or :class:`~guard.traits.Example` objects
            instead of the trait's ``heldout_examples``.
        ab_items: A/B items (:func:`guard.core.data.load_ab_items`) for the behaviour rate.
        capability: measure the log-likelihood of :data:`NEUTRAL_QA` answers.
        questions: questions to answer greedily (repetition, judge) instead of the trait's test questions.
        n_generate: with ``questions`` None, answer the first ``n_generate`` of the trait's ``test_questions``.
        judge: scores the answers for the trait (``rubric``) and for coherence.
        rubric: the trait rubric (default the trait's ``judge_rubric``).
        sampling: generation settings (greedy by default).
        random_control: add each steering condition's random-direction control after it.
        control_seed: seeds the random directions.
        n_boot: bootstrap resamples. level: CI coverage. seed: bootstrap seed.
        batch_size: forward batch size. n_samples: answers kept per condition for reading.
        log: progress messages.
    """
    started = time.perf_counter()
    conditions = list(conditions)
    if not conditions:
        raise EvaluationError("no conditions to evaluate; give at least the baseline (Condition('none'))")
    if random_control:
        conditions = with_random_controls(conditions, control_seed)
    names = [c.name for c in conditions]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise EvaluationError(f"condition names must be unique; repeated: {', '.join(clashes)}")

    items: dict[str, dict] = {}
    if pairs is None and trait is not None:
        split = trait.split()
        pairs = list(split.heldout_examples)
        source = "held-out pairs" + (" (the trait has under 4 pairs: they are also the selection pairs)"
                                     if split.overlap else "")
    else:
        source = "given pairs"
    pairs = list(pairs or [])
    if pairs:
        items["trait_gap"] = {"n": len(pairs), "source": source}
    ab_items = list(ab_items or [])
    if ab_items:
        items["ab_rate"] = items["ab_letter_bias"] = {"n": len(ab_items), "source": "A/B items"}
    neutral_qa = list(NEUTRAL_QA) if capability else []
    if neutral_qa:
        items["neutral_loglik"] = {"n": len(neutral_qa), "source": "ordinary answers"}
    asked = "given questions"
    if questions is None and n_generate:
        if trait is None:
            raise EvaluationError("generating answers needs questions: give a trait (its test questions) or questions")
        questions, asked = list(trait.split().test_questions[:n_generate]), "the trait's test questions"
    questions = list(questions or [])
    rubric = rubric or (trait.judge_rubric if trait is not None else None)
    if judge is not None and (not questions or rubric is None):
        raise EvaluationError("a judge scores generated answers: give questions (or n_generate with a trait) "
                              "and a rubric (or a trait)")
    if questions:
        items["repetition"] = {"n": len(questions), "source": f"greedy answers to {asked}"}
        if judge is not None:
            items["judge_trait"] = items["judge_coherence"] = dict(items["repetition"])
    if not items:
        raise EvaluationError("nothing to measure: give a trait or pairs, A/B items, questions, or keep capability on")

    results = []
    for condition in conditions:
        log(f"measuring {condition.name}")
        values, samples = _measure(model, tokenizer, condition, pairs=pairs, ab_items=ab_items, neutral_qa=neutral_qa,
                                   questions=questions, sampling=sampling, judge=judge, rubric=rubric,
                                   batch_size=batch_size, n_samples=n_samples)
        described = condition.describe()
        results.append(ConditionResult(described["name"], described["system"], described["steering"],
                                       described["control_of"], values=values, samples=samples))

    stats = dict(n_boot=n_boot, level=level, seed=seed)
    by_name = {r.name: r for r in results}
    base = results[0]
    for result in results:
        result.estimates = {k: bootstrap_ci(v, **stats) for k, v in result.values.items()}
        if result is not base:
            result.vs_baseline = {k: paired_difference(v, base.values[k], **stats) for k, v in result.values.items()}
        if result.control_of is not None:
            steered = by_name[result.control_of]
            steered.vs_control = {k: paired_difference(steered.values[k], v, **stats) for k, v in result.values.items()}
    settings = {**stats, "random_control": random_control, "control_seed": control_seed,
                "sampling": sampling.to_dict() if questions else None, "judge": getattr(judge, "name", None)}
    return EvaluationReport(trait.name if trait is not None else None, model_name(model), results, items, settings,
                            time.perf_counter() - started)


__all__ = ["Condition", "ConditionResult", "EvaluationError", "EvaluationReport", "METRICS", "Metric", "NEUTRAL_QA",
           "evaluate", "load_pairs", "neutral_loglik", "neutral_logliks", "with_random_controls"]
