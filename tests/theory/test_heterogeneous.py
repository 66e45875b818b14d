"""The heterogeneous-data and compressed-gossip checks: they fail outside their assumptions, and their
predictions agree with independent computations (closed-form ring spectra, the strategies' stability test)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optsurvey.strategies import Topology
from lightning_optsurvey.strategies.gossip_algorithms import d2_is_stable
from lightning_optsurvey.theory import get_result
from lightning_optsurvey.theory.heterogeneous import (
    ChocoGossipConsensus,
    D2ExactConvergence,
    DPSGDHeterogeneityBias,
    GradientTrackingExactConvergence,
)

FAILING = [
    DPSGDHeterogeneityBias(lr=2.5),  # |1 - alpha a_i| > 1: diverges instead of stalling
    D2ExactConvergence(lr=2.5),  # companion matrix spectral radius > 1
    GradientTrackingExactConvergence(lr=1.0),  # beyond DIGing's step-size range on this graph
    ChocoGossipConsensus(consensus_lr=1.0),  # gamma far above the theorem's step: e_t grows
]


@pytest.mark.parametrize("result", FAILING, ids=[f"{r.name}" for r in FAILING])
def test_a_check_can_fail(result) -> None:
    assert not result.check(seed=0).holds


def test_the_results_are_registered() -> None:
    for name in ("dpsgd_heterogeneity_bias", "d2_exact_convergence", "gradient_tracking_exact_convergence",
                 "choco_gossip_consensus"):
        assert get_result(name).name == name


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (DPSGDHeterogeneityBias, {"kind": "one_peer_exponential"}),
        (DPSGDHeterogeneityBias, {"world_size": 2}),
        (GradientTrackingExactConvergence, {"lr": -0.1}),
        (ChocoGossipConsensus, {"compressor": "randomk"}),  # random: the check is for deterministic ones
        (ChocoGossipConsensus, {"kind": "exponential"}),  # directed: W not symmetric
        (ChocoGossipConsensus, {"ratio": 0.0}),
    ],
)
def test_bad_configuration_is_rejected(cls, kwargs) -> None:
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_dpsgd_bias_vanishes_with_homogeneous_targets_and_shrinks_with_the_step() -> None:
    check = DPSGDHeterogeneityBias()
    problem = check.problem(0)
    same = type(problem)(problem.w, problem.curvatures, problem.targets[:1].repeat(8, 1))
    assert check.predict(same, 0) == pytest.approx(0.0, abs=1e-12)
    smaller = DPSGDHeterogeneityBias(lr=0.02)
    assert smaller.predict(problem, 0) < check.predict(problem, 0) / 5  # O(alpha) bias


def test_d2_rate_without_gradients_matches_the_ring_spectrum_closed_form() -> None:
    """alpha -> 0: D²'s non-consensus roots solve z^2 - 2 mu z + mu = 0, mu = (1 + lambda)/2 of the lazy ring."""
    check = D2ExactConvergence(lr=1e-12)
    problem = check.problem(0)
    lambdas = [(1 + 2 * math.cos(2 * math.pi * k / 8)) / 3 for k in range(1, 8)]
    roots = []
    for lam in lambdas:
        mu = (1 + lam) / 2
        disc = complex(mu * mu - mu) ** 0.5
        roots += [abs(mu + disc), abs(mu - disc)]
    # The mean mode's 1 - alpha a is ~1 here, so compare the non-mean spectrum: the largest root below 1 - 1e-6.
    companion = check.iteration_matrix(problem)
    moduli = sorted(float(m) for m in torch.linalg.eigvals(companion).abs() if m < 1 - 1e-6)
    assert moduli[-1] == pytest.approx(max(roots), rel=1e-6)
    assert not d2_is_stable(Topology("ring", 8).mixing_matrix())  # why the lazy matrix is the default


def test_choco_constants_match_the_ring_closed_form() -> None:
    check = ChocoGossipConsensus()
    w, _ = check.problem(0)
    delta, rho, beta, _ = check.constants(w)
    assert delta == 0.25  # top-5 of 20
    assert rho == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / 8)) / 3, rel=1e-12)
    assert beta == pytest.approx(4 / 3, rel=1e-12)  # 1 - lambda_min, lambda_min = -1/3 on an even ring
    assert check.predict((w, None), 0) == pytest.approx(1 - delta**2 * rho / 82, rel=1e-15)
