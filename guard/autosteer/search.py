"""Black-box search over latent strengths: coordinate search on a grid, then random perturbations
of the best point, within a fixed budget of objective evaluations. The best judged strengths are
kept, never merely the last ones tried (the hackathon loop's off-by-one).

The objective is any function of a strength vector returning a number (higher is better) and,
optionally, a dict of the components behind it; the search knows nothing about models, so it is
tested with scripted objectives.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .data import AutosteerError

Objective = Callable[[tuple[float, ...]], "float | tuple[float, dict]"]
Propose = Callable[[list["Trial"]], Sequence[float]]  # the trials so far -> the next strengths


class ProposalError(AutosteerError):
    """A proposer gave no usable strengths (the search falls back to a random move)."""


@dataclass(frozen=True)
class Trial:
    """One evaluated strength vector.

    Args:
        strengths: one strength per latent.
        score: the objective's value (higher is better).
        components: what the objective reported beside the score (concept, fluency, ...).
        step: the evaluation's number, from 0.
        move: how the search reached it (``"start"``, ``"coordinate"``, ``"random"``).
    """

    strengths: tuple[float, ...]
    score: float
    components: dict = field(default_factory=dict)
    step: int = 0
    move: str = "start"

    def to_dict(self) -> dict:
        return {"strengths": list(self.strengths), "score": self.score, "components": self.components,
                "step": self.step, "move": self.move}

    @classmethod
    def from_dict(cls, data: dict) -> Trial:
        return cls(tuple(float(s) for s in data["strengths"]), float(data["score"]), dict(data.get("components") or {}),
                   int(data.get("step", 0)), str(data.get("move", "start")))


@dataclass
class SearchResult:
    """The search's history and its best trial.

    Args:
        trials: every evaluated strength vector, in evaluation order.
        best: the trial with the highest score (the first of equal scores).
    """

    trials: list[Trial]
    best: Trial

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "trials": [t.to_dict() for t in self.trials]}

    @classmethod
    def from_dict(cls, data: dict) -> SearchResult:
        return cls([Trial.from_dict(t) for t in data["trials"]], Trial.from_dict(data["best"]))


def _check_search(n: int, budget: int, max_strength: float) -> None:
    if n < 1:
        raise AutosteerError("the search needs at least one latent")
    if budget < 1:
        raise AutosteerError(f"the search budget must be at least 1 evaluation, got {budget}")
    if not max_strength > 0:
        raise AutosteerError(f"max_strength must be positive, got {max_strength}")


def _clip(values, max_strength: float) -> tuple[float, ...]:
    """Strengths within ``[0, max_strength]``, rounded so equal points compare equal."""
    return tuple(round(min(max(float(v), 0.0), max_strength), 6) for v in values)


def _call(objective: Objective, strengths: tuple[float, ...]) -> tuple[float, dict]:
    value = objective(strengths)
    score, components = value if isinstance(value, tuple) else (value, {})
    score = float(score)
    if math.isnan(score):
        score = -math.inf  # an unscorable point never wins
    return score, dict(components)


def search_strengths(objective: Objective, n: int, *, budget: int = 24, max_strength: float = 1.0,
                     start: Sequence[float] | None = None, grid: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
                     seed: int = 0, on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """Maximise ``objective`` over ``n`` strengths in ``[0, max_strength]`` with at most ``budget``
    evaluations (a point already evaluated is not evaluated again).

    Rounds of coordinate search: each latent in turn is set to every grid value (times
    ``max_strength``) with the others at the best point so far, and the best point moves whenever
    a trial beats it. When a full round improves nothing, the remaining budget goes to random
    perturbations of the best point (Gaussian, a quarter of the range, clipped).

    Args:
        objective: strengths -> score, or (score, components); higher is better.
        n: how many strengths.
        budget: objective evaluations at most (at least 1).
        max_strength: the upper end of every strength's range.
        start: the first point (default every strength at half the range).
        grid: the coordinate values tried, as fractions of ``max_strength``.
        seed: seeds the random perturbations.
        on_trial: called after every evaluation (progress bars).
    """
    _check_search(n, budget, max_strength)
    rng = random.Random(seed)
    trials: list[Trial] = []
    seen: dict[tuple[float, ...], Trial] = {}

    def clip(values) -> tuple[float, ...]:
        return _clip(values, max_strength)

    def evaluate(point: tuple[float, ...], move: str) -> Trial | None:
        if point in seen:
            return seen[point]
        if len(trials) >= budget:
            return None
        score, components = _call(objective, point)
        trial = Trial(point, score, components, len(trials), move)
        trials.append(trial)
        seen[point] = trial
        if on_trial is not None:
            on_trial(trial)
        return trial

    first = clip(start if start is not None else [max_strength / 2] * n)
    if len(first) != n:
        raise AutosteerError(f"the start point has {len(first)} strengths, expected {n}")
    best = evaluate(first, "start")
    assert best is not None
    improved = True
    while improved and len(trials) < budget:
        improved = False
        for i in range(n):
            for fraction in grid:
                point = list(best.strengths)
                point[i] = fraction * max_strength
                trial = evaluate(clip(point), "coordinate")
                if trial is None:
                    break
                if trial.score > best.score:
                    best, improved = trial, True
    stale = 0
    while len(trials) < budget and stale < 50 * budget:
        point = clip(s + rng.gauss(0.0, max_strength / 4) for s in best.strengths)
        if point in seen:
            stale += 1
            continue
        trial = evaluate(point, "random")
        if trial is not None and trial.score > best.score:
            best = trial
    return SearchResult(trials, best)


def search_with_proposer(objective: Objective, n: int, propose: Propose, *, budget: int = 24,
                         max_strength: float = 1.0, start: Sequence[float] | None = None, seed: int = 0,
                         on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """Maximise ``objective`` with strengths proposed by ``propose`` (an LLM reading the past
    trials, for instance), within ``budget`` evaluations; the best judged trial is kept, never the
    last one proposed.

    The first proposal is asked for with no history (an initial guess); when ``propose`` raises
    :class:`ProposalError`, or proposes a point already evaluated, that step is a random
    perturbation of the best point instead (``move`` says which), so a confused proposer costs
    trials but never stalls the search. Proposed values are clipped to ``[0, max_strength]``.

    Args:
        objective: strengths -> score, or (score, components); higher is better.
        n: how many strengths.
        propose: the trials so far -> the next ``n`` strengths.
        budget: objective evaluations (at least 1).
        max_strength: the upper end of every strength's range.
        start: the point used when the first proposal fails (default every strength at half the range).
        seed: seeds the fallback perturbations.
        on_trial: called after every evaluation.
    """
    _check_search(n, budget, max_strength)
    rng = random.Random(seed)
    trials: list[Trial] = []
    seen: set[tuple[float, ...]] = set()
    fallback = tuple(start) if start is not None else (max_strength / 2,) * n
    if len(fallback) != n:
        raise AutosteerError(f"the start point has {len(fallback)} strengths, expected {n}")

    def clip(values) -> tuple[float, ...]:
        return _clip(values, max_strength)

    def perturbed() -> tuple[float, ...]:
        best = max(trials, key=lambda t: t.score).strengths if trials else clip(fallback)
        for _ in range(200):
            point = clip(s + rng.gauss(0.0, max_strength / 4) for s in best) if trials else best
            if point not in seen:
                return point
        return point  # the range is exhausted at this resolution; evaluate a repeat rather than loop

    while len(trials) < budget:
        try:
            proposal = [float(v) for v in propose(list(trials))]
            if len(proposal) != n or not all(math.isfinite(v) for v in proposal):
                raise ProposalError(f"expected {n} finite strengths, got {proposal}")
            point, move = clip(proposal), "proposed"
            if point in seen:
                point, move = perturbed(), "random (proposer repeated a trial)"
        except ProposalError:
            point, move = perturbed(), "random (proposer failed)"
        score, components = _call(objective, point)
        trial = Trial(point, score, components, len(trials), move)
        trials.append(trial)
        seen.add(point)
        if on_trial is not None:
            on_trial(trial)
    best = max(trials, key=lambda t: t.score)  # max keeps the first of equal scores
    return SearchResult(trials, best)


def search_one_strength(objective: Callable[[float], float | tuple[float, dict]], *, budget: int = 24,
                        max_strength: float = 1.0, seed: int = 0,
                        on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """:func:`search_strengths` for a single strength (a DiffMean coefficient, say), same budget rules.

    Args:
        objective: strength -> score, or (score, components).
        budget, max_strength, seed, on_trial: as in :func:`search_strengths`.
    """
    grid = tuple(i / 8 for i in range(9))
    return search_strengths(lambda s: objective(s[0]), 1, budget=budget, max_strength=max_strength, grid=grid,
                            seed=seed, on_trial=on_trial)


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean of non-negative scores, 0 when any is 0 (AxBench's aggregate); NaN in, NaN out.

    Args:
        values: the scores (concept, fluency, relevance), each in [0, 1].
    """
    if any(math.isnan(v) for v in values):
        return math.nan
    if not values or any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
