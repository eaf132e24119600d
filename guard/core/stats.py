"""Small statistics shared by every report: AUROC, projections, random baselines, and bootstrap
confidence intervals (:class:`Estimate`, :func:`bootstrap_ci`, :func:`paired_difference`,
:func:`auroc_ci`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def auroc(positive, negative) -> float:
    """P(score of a random positive > score of a random negative), ties counting half.

    0.5 is chance; 1.0 is perfect separation in the expected direction; below 0.5 the scores
    separate the other way round.
    """
    pos = torch.as_tensor(positive, dtype=torch.float64).reshape(-1)
    neg = torch.as_tensor(negative, dtype=torch.float64).reshape(-1)
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def random_directions(n: int, hidden: int, norm: float = 1.0, seed: int = 0) -> torch.Tensor:
    """``(n, hidden)`` isotropic random directions of the given norm (a noise floor for projections).

    Args:
        n: how many directions.
        hidden: their dimension.
        norm: each direction's length.
        seed: seeds a private generator, so the directions are reproducible.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, hidden, generator=g)
    return dirs / dirs.norm(dim=-1, keepdim=True) * norm


def repetition_rate(tokens, n: int = 3) -> float:
    """Fraction of a text's token n-grams that already occurred earlier in it.

    A judge-free sign of broken generation: steering too hard makes small models loop
    ("I'm glad, I'm glad, ..."). 0 for text with no repeated n-gram; near 1 for a loop.

    Args:
        tokens: the text's token ids (any sequence of hashable items); fewer than ``n``: 0.
        n: the n-gram length.
    """
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# --- bootstrap confidence intervals --------------------------------------------------------------
#
# Every comparison in a report carries one of these: a percentile bootstrap over items (prompts,
# pairs, answers), paired when two conditions were measured on the same items. numpy, seeded, so
# a report is reproducible to the digit.

_CHUNK_CELLS = 2_000_000  # resample indices drawn per block, so large n does not allocate n_boot x n at once


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval.

    Args:
        value: the statistic on all items.
        low: lower end of the interval.
        high: upper end of the interval.
        n: number of items it rests on (for a paired difference, complete pairs).
        level: the interval's coverage, e.g. 0.95.
    """

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def to_dict(self) -> dict:
        """``{"value", "low", "high", "n", "level"}`` (NaN for an estimate over no items)."""
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level}

    @classmethod
    def from_dict(cls, data: dict) -> "Estimate":
        """The inverse of :meth:`to_dict` (extra keys ignored)."""
        return cls(float(data["value"]), float(data["low"]), float(data["high"]), int(data["n"]),
                   float(data.get("level", 0.95)))

    def format(self, digits: int = 3) -> str:
        """``"+0.171 [+0.150, +0.190]"``; ``"n/a"`` for an estimate over no items.

        Args:
            digits: decimals of every number.
        """
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    def excludes(self, x: float = 0.0) -> bool:
        """Whether the interval leaves out ``x`` (False for an estimate over no items).

        Args:
            x: the value to test, 0 for a difference.
        """
        return bool(x < self.low or x > self.high)

    def verdict(self, x: float = 0.0) -> str:
        """``"higher"`` / ``"lower"`` when the interval lies above / below ``x``, else ``"no difference"``
        (``"n/a"`` for an estimate over no items).

        Args:
            x: the reference value, 0 for a difference.
        """
        if math.isnan(self.value):
            return "n/a"
        if not self.excludes(x):
            return "no difference"
        return "higher" if self.low > x else "lower"

    def __str__(self) -> str:
        return self.format()


def _as_array(values) -> np.ndarray:
    """A flat float64 numpy array of numbers, torch tensors (any device) or lists; None -> NaN."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy().reshape(-1)
    if isinstance(values, np.ndarray):
        return values.astype(np.float64).reshape(-1)
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _resampled(stat_of_rows: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int,
               rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` values of ``stat_of_rows(indices)`` for ``(rows, n)`` blocks of resampled indices."""
    per_block = max(1, _CHUNK_CELLS // max(n, 1))
    out = []
    for start in range(0, n_boot, per_block):
        rows = min(per_block, n_boot - start)
        out.append(stat_of_rows(rng.integers(0, n, size=(rows, n))))
    return np.concatenate(out)


def _row_statistic(statistic: Callable) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic applied to every row of a 2-D array (vectorised for the mean and median)."""
    if statistic is np.mean:
        return lambda rows: rows.mean(axis=1)
    if statistic is np.median:
        return lambda rows: np.median(rows, axis=1)
    return lambda rows: np.array([float(statistic(row)) for row in rows])


def _interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")


def bootstrap_ci(values, statistic: Callable = np.mean, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> Estimate:
    """Percentile bootstrap interval of ``statistic`` over items.

    Non-finite values (NaN, for an item that could not be scored) are left out; with none left
    the estimate is NaN over 0 items. One item, or identical values, give a degenerate interval
    ``[value, value]``.

    Args:
        values: per-item numbers (list, numpy array or torch tensor).
        statistic: function of a 1-D numpy array to a number (default the mean).
        n_boot: bootstrap resamples.
        level: coverage of the interval.
        seed: seeds the resampling; the same inputs and seed give the same interval.
    """
    _check_level(level, n_boot)
    x = _as_array(values)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    value = float(statistic(x))
    rows = _row_statistic(statistic)
    boot = _resampled(lambda idx: rows(x[idx]), x.size, n_boot, np.random.default_rng(seed))
    low, high = _interval(boot, level)
    return Estimate(value, low, high, int(x.size), level)


def paired_difference(a, b, statistic: Callable = np.mean, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> Estimate:
    """``statistic`` of the per-item differences ``a[i] - b[i]``, items resampled jointly.

    The paired interval: when both conditions were measured on the same items, item-to-item
    variation cancels and the interval is narrower than one resampling the two sides apart.
    Items where either side is non-finite are left out of both.

    Args:
        a: per-item values of one condition.
        b: per-item values of the other, in the same item order.
        statistic, n_boot, level, seed: as in :func:`bootstrap_ci`.
    """
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"a paired difference needs the same items on both sides; got {x.size} and {y.size} values")
    keep = np.isfinite(x) & np.isfinite(y)
    return bootstrap_ci(x[keep] - y[keep], statistic, n_boot, level, seed)


def independent_difference(a, b, statistic: Callable = np.mean, n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> Estimate:
    """``statistic(a) - statistic(b)`` with ``a`` and ``b`` resampled apart (different items on each side).

    Use :func:`paired_difference` when the items are shared; this one is for two unrelated samples.

    Args:
        a: values of one sample. b: values of the other.
        statistic, n_boot, level, seed: as in :func:`bootstrap_ci`.
    """
    _check_level(level, n_boot)
    x, y = _as_array(a), _as_array(b)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if x.size == 0 or y.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    rng = np.random.default_rng(seed)
    rows = _row_statistic(statistic)
    boot = (_resampled(lambda idx: rows(x[idx]), x.size, n_boot, rng)
            - _resampled(lambda idx: rows(y[idx]), y.size, n_boot, rng))
    low, high = _interval(boot, level)
    return Estimate(float(statistic(x)) - float(statistic(y)), low, high, int(x.size + y.size), level)


def _auroc_np(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC by sorted counting (ties half), O((P + N) log N): the same number as :func:`auroc`."""
    ordered = np.sort(neg)
    below = np.searchsorted(ordered, pos, side="left")
    not_above = np.searchsorted(ordered, pos, side="right")
    return float((below.sum() + 0.5 * (not_above - below).sum()) / (pos.size * neg.size))


def auroc_ci(positive, negative, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """AUROC with a stratified bootstrap interval: positives and negatives resampled separately,
    so every resample keeps the class sizes.

    Args:
        positive: scores of the positive class. negative: scores of the negative class.
        n_boot, level, seed: as in :func:`bootstrap_ci`.
    """
    _check_level(level, n_boot)
    pos, neg = _as_array(positive), _as_array(negative)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        boot[i] = _auroc_np(pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)])
    low, high = _interval(boot, level)
    return Estimate(_auroc_np(pos, neg), low, high, int(pos.size + neg.size), level)
