import itertools

import pytest
import torch

from guard.core.stats import auroc, random_directions


def test_auroc_matches_pair_counting():
    pos, neg = [0.9, 0.4, 0.4, 2.0], [0.4, 0.1, 1.0]
    pairs = list(itertools.product(pos, neg))
    want = sum((p > q) + 0.5 * (p == q) for p, q in pairs) / len(pairs)
    assert auroc(pos, neg) == pytest.approx(want)
    assert auroc([1, 2], [3, 4]) == 0.0 and auroc([3, 4], [1, 2]) == 1.0


def test_random_directions_have_the_asked_norm():
    dirs = random_directions(5, 16, norm=3.0, seed=2)
    assert torch.allclose(dirs.norm(dim=-1), torch.full((5,), 3.0))
    assert torch.equal(dirs, random_directions(5, 16, norm=3.0, seed=2))


# --- bootstrap confidence intervals --------------------------------------------------------------

import numpy as np  # noqa: E402

from guard.core.stats import (Estimate, auroc_ci, bootstrap_ci, independent_difference,  # noqa: E402
                              paired_difference)


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    hits = 0
    for rep in range(200):
        draws = rng.normal(loc=1.5, scale=2.0, size=50)
        estimate = bootstrap_ci(draws, n_boot=1000, seed=rep)
        assert estimate.value == pytest.approx(draws.mean()) and estimate.n == 50
        hits += estimate.low <= 1.5 <= estimate.high
    assert 0.90 <= hits / 200 <= 0.99, hits


def test_bootstrap_is_deterministic_and_takes_numpy_torch_and_lists():
    values = [0.3, -1.2, 2.5, 0.7, 0.1, 1.9]
    a = bootstrap_ci(values, seed=4)
    assert a == bootstrap_ci(np.array(values), seed=4)
    assert a == bootstrap_ci(torch.tensor(values, dtype=torch.float64), seed=4)
    assert bootstrap_ci(values, seed=5) != a  # another seed, other resamples
    assert a.low <= a.value <= a.high and a.level == 0.95
    wide = bootstrap_ci(values, level=0.99, seed=4)
    assert wide.low <= a.low and wide.high >= a.high
    median = bootstrap_ci([1.0, 2.0, 3.0, 10.0], statistic=np.median)
    assert median.value == 2.5


def test_paired_difference_is_the_mean_of_per_item_differences_and_narrower_when_items_correlate():
    rng = np.random.default_rng(0)
    item = rng.normal(scale=3.0, size=40)  # a large per-item effect shared by both conditions
    a = item + rng.normal(scale=0.3, size=40) + 0.5
    b = item + rng.normal(scale=0.3, size=40)
    paired = paired_difference(a, b)
    assert paired.value == float(np.mean(a - b)) and paired.n == 40
    unpaired = independent_difference(a, b)
    assert unpaired.value == pytest.approx(paired.value)
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)
    assert paired.excludes(0.0) and not unpaired.excludes(0.0)
    assert paired.verdict() == "higher" and unpaired.verdict() == "no difference"
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 2.0], [1.0])


def test_paired_difference_drops_items_missing_on_either_side():
    d = paired_difference([1.0, float("nan"), 3.0, 4.0], [0.0, 1.0, None, 1.0])
    assert d.n == 2 and d.value == pytest.approx(2.0)


def test_degenerate_inputs_give_degenerate_intervals():
    one = bootstrap_ci([0.25])
    assert (one.value, one.low, one.high, one.n) == (0.25, 0.25, 0.25, 1)
    constant = bootstrap_ci([2.0] * 7)
    assert constant.low == constant.high == constant.value == 2.0 and not constant.excludes(2.0)
    zero = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (zero.value, zero.low, zero.high) == (0.0, 0.0, 0.0) and zero.verdict() == "no difference"
    empty = bootstrap_ci([])
    assert empty.n == 0 and np.isnan(empty.value) and not empty.excludes(0.0) and empty.format() == "n/a"
    assert empty.verdict() == "n/a"
    assert auroc_ci([1.0], [0.0]) == Estimate(1.0, 1.0, 1.0, 2)


def test_estimate_formats_and_round_trips():
    e = Estimate(0.1712, 0.1498, 0.1903, 12)
    assert e.format() == "+0.171 [+0.150, +0.190]" and e.format(1) == "+0.2 [+0.1, +0.2]"
    assert e.excludes() and not e.excludes(0.16) and e.verdict(0.2) == "lower"
    assert Estimate.from_dict(e.to_dict()) == e
    assert e.to_dict() == {"value": 0.1712, "low": 0.1498, "high": 0.1903, "n": 12, "level": 0.95}


def test_auroc_ci_matches_auroc_and_stratifies():
    pos, neg = [0.9, 0.4, 0.4, 2.0, 1.3], [0.4, 0.1, 1.0, -0.2]
    estimate = auroc_ci(pos, neg)
    assert estimate.value == pytest.approx(auroc(pos, neg)) and estimate.n == 9
    assert 0.0 <= estimate.low <= estimate.value <= estimate.high <= 1.0
    rng = np.random.default_rng(2)
    separated = auroc_ci(rng.normal(2.0, 1.0, 60), rng.normal(0.0, 1.0, 60))
    assert separated.excludes(0.5) and separated.low > 0.8
    with pytest.raises(ValueError):
        auroc_ci([], [1.0])
