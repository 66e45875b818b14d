"""LSGD's leader choice and pull, GRAWA's weights and center, as pure functions; argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optsurvey.strategies import LSGDStrategy
from lightning_optsurvey.strategies.lsgd import grawa_center, grawa_weights, leader_pull, select_leader

EXACT_TOL = 1e-15  # a few float64 roundings of O(1) numbers


def test_select_leader_lowest_mean_ties_and_nan() -> None:
    assert select_leader(torch.tensor([3.0, 2.5, 2.0, 2.5])) == 2
    assert select_leader(torch.tensor([1.0, 0.5, 0.5])) == 1  # a tie goes to the lowest rank
    assert select_leader(torch.tensor([math.nan, 4.0, 3.0])) == 2  # NaN never leads
    assert select_leader(torch.tensor([math.nan, math.inf])) == 0
    with pytest.raises(ValueError, match="non-empty vector"):
        select_leader(torch.zeros(0))
    with pytest.raises(ValueError, match="non-empty vector"):
        select_leader(torch.zeros(2, 2))


def test_leader_pull_is_exact() -> None:
    x = torch.tensor([4.0, -2.0, 0.5])
    leader = torch.tensor([0.0, 2.0, 0.5])
    assert torch.equal(leader_pull(x, leader, 0.25), torch.tensor([3.0, -1.0, 0.5]))
    assert torch.equal(leader_pull(x, leader, 1.0), leader)


def test_grawa_weights_are_normalized_inverse_norms() -> None:
    weights = grawa_weights(torch.tensor([1.0, 2.0, 4.0]))
    assert weights.dtype == torch.float64
    assert torch.allclose(weights, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64) / 7.0, rtol=0, atol=EXACT_TOL)
    # Limits: a zero gradient takes all the weight (shared between several); non-finite norms get none.
    assert torch.equal(grawa_weights(torch.tensor([0.0, 1.0, 0.0])), torch.tensor([0.5, 0.0, 0.5],
                                                                                  dtype=torch.float64))
    assert torch.equal(grawa_weights(torch.tensor([math.inf, 2.0, 2.0])), torch.tensor([0.0, 0.5, 0.5],
                                                                                       dtype=torch.float64))
    assert torch.equal(grawa_weights(torch.tensor([math.nan, math.inf])), torch.tensor([0.5, 0.5],
                                                                                       dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        grawa_weights(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="non-empty vector"):
        grawa_weights(torch.zeros(0))


def test_grawa_center_weights_flat_workers_more() -> None:
    workers = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    center = grawa_center(workers, torch.tensor([3.0, 1.0]))  # the second worker is 3x flatter
    assert center.shape == (1, 2) and center.dtype == torch.float32
    assert torch.allclose(center, torch.tensor([[0.25, 0.75]]), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="2 workers"):
        grawa_center(workers, torch.tensor([1.0, 2.0, 3.0]))


def test_invalid_arguments() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="pull_strength"):
            LSGDStrategy(pull_strength=bad)
    with pytest.raises(TypeError, match="pull_strength"):
        LSGDStrategy(pull_strength=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leader must be one of .*got 'best'"):
        LSGDStrategy(leader="best")
    with pytest.raises(ValueError, match="sync_every"):
        LSGDStrategy(sync_every=0)
    with pytest.raises(TypeError, match="ddp_comm_hook"):
        LSGDStrategy(ddp_comm_hook=None)
