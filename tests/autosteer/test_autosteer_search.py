"""The strength search keeps the best judged point, within its budget, on scripted objectives."""

import math

import pytest

from guard.autosteer import (
    AutosteerError,
    harmonic_mean,
    search_one_strength,
    search_strengths,
)


def test_best_strengths_are_kept_not_the_last_ones():
    # The first coordinate move (latent 0 at 0) is the best point; every later trial is worse.
    def objective(strengths):
        return (10.0 if strengths == (0.0, 0.5) else -sum(strengths)), {"concept": strengths[0]}

    result = search_strengths(objective, 2, budget=12, seed=1)
    assert len(result.trials) == 12
    assert result.best.strengths == (0.0, 0.5) and result.best.score == 10.0
    assert result.trials[-1].strengths != result.best.strengths and result.trials[-1].score < 10.0
    assert result.best.score == max(t.score for t in result.trials)
    assert result.best.components == {"concept": 0.0}


def test_budget_is_respected_and_points_are_not_evaluated_twice():
    calls = []

    def objective(strengths):
        calls.append(strengths)
        return -((strengths[0] - 0.3) ** 2) - (strengths[1] - 0.7) ** 2 - (strengths[2] - 0.1) ** 2

    result = search_strengths(objective, 3, budget=20, max_strength=1.0, seed=0)
    assert len(calls) == 20 == len(set(calls)) == len(result.trials)
    assert all(0.0 <= s <= 1.0 for point in calls for s in point)
    assert [t.step for t in result.trials] == list(range(20))
    assert result.best.score > objective((0.5, 0.5, 0.5)) - 1e-12  # it improved on the start
    again = search_strengths(objective, 3, budget=20, max_strength=1.0, seed=0)
    assert again.to_dict() == result.to_dict()  # reproducible


def test_nan_never_wins_and_one_strength_search():
    result = search_strengths(lambda s: math.nan if s[0] > 0.4 else s[0], 1, budget=6)
    assert result.best.strengths == (0.25,) and not math.isnan(result.best.score)
    single = search_one_strength(lambda s: -abs(s - 0.375), budget=10, max_strength=1.0)
    assert single.best.strengths == (0.375,)
    with pytest.raises(AutosteerError):
        search_strengths(lambda s: 0.0, 0)
    with pytest.raises(AutosteerError):
        search_strengths(lambda s: 0.0, 1, budget=0)


def test_harmonic_mean_is_zero_when_any_score_is_zero():
    assert harmonic_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([1.0, 0.5, 0.0]) == 0.0
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert math.isnan(harmonic_mean([math.nan, 1.0, 1.0]))
