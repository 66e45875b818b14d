"""The round-robin stability check of asynchronous EASGD: its closed form, a failing configuration."""

from __future__ import annotations

import pytest
import torch

from lightning_optsurvey.averaging.center import CenterState
from lightning_optsurvey.strategies.easgd import easgd_is_stable
from lightning_optsurvey.theory import get_result
from lightning_optsurvey.theory.easgd_async import (
    AsyncEASGDStability,
    round_robin_easgd_matrix,
    round_robin_spectral_radius,
)


def test_round_map_is_the_center_servers_exchange_then_gradient_steps() -> None:
    eta_h, alpha, p = 0.7, 0.3, 3
    matrix = round_robin_easgd_matrix(eta_h, alpha, p)
    for j in range(p + 1):  # column j: the image of the j-th unit state under one round
        state = torch.zeros(p + 1, dtype=torch.float64)
        state[j] = 1.0
        workers = [state[i : i + 1].clone() for i in range(p)]
        center = CenterState([state[p:].clone()], [[1]], world_size=p)
        for i in range(p):
            (move,), _, _ = center.exchange(i, [workers[i]], [alpha])
            workers[i] = workers[i] - move
            workers = [x * (1 - eta_h) for x in workers]
        column = torch.cat([*workers, center.buffers[0]])
        assert torch.allclose(matrix[:, j], column, rtol=0, atol=1e-15)


def test_stable_inside_the_papers_condition_and_where_synchronous_easgd_diverges() -> None:
    for p in (1, 2, 4, 8):
        for eta_h in torch.linspace(0.05, 1.95, 12).tolist():
            for alpha in torch.linspace(0.05, 0.95, 10).tolist():
                assert round_robin_spectral_radius(eta_h, alpha, p) < 1.0, (p, eta_h, alpha)
    assert not easgd_is_stable(0.5, 0.45, 4) and round_robin_spectral_radius(0.5, 0.45, 4) < 1.0


@pytest.mark.parametrize(
    "config",
    [AsyncEASGDStability(eta_h_max=2.3), AsyncEASGDStability(alphas=(2.5,))],
    ids=["eta_h_beyond_2", "alpha_beyond_1"],
)
def test_the_check_fails_outside_the_condition(config: AsyncEASGDStability) -> None:
    assert not config.check(seed=0).holds


def test_holds_and_rejects_bad_configurations() -> None:
    assert get_result("easgd_async_stability").check(seed=1).holds
    for kwargs in ({"workers": 0}, {"alphas": ()}, {"alphas": (-0.1,)}, {"grid": 1}, {"rounds": 3}):
        with pytest.raises(ValueError):
            AsyncEASGDStability(**kwargs)
    with pytest.raises(ValueError, match="workers"):
        round_robin_easgd_matrix(0.5, 0.1, 0)
