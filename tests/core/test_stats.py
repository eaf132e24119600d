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
