"""Small statistics shared by every report: AUROC, projections, random baselines."""

from __future__ import annotations

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
    """``(n, hidden)`` isotropic random directions of the given norm (a noise floor for projections)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, hidden, generator=g)
    return dirs / dirs.norm(dim=-1, keepdim=True) * norm


def repetition_rate(tokens, n: int = 3) -> float:
    """Fraction of a text's token n-grams that already occurred earlier in it.

    A judge-free sign of broken generation: steering too hard makes small models loop
    ("I'm glad, I'm glad, ..."). 0 for text with no repeated n-gram; near 1 for a loop.
    """
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
