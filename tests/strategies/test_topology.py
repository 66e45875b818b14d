"""Topology: graphs, mixing matrices and spectral gaps against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optsurvey.strategies import TOPOLOGY_KINDS, Topology

STOCHASTIC_TOL = 1e-12  # row/column sums of float64 matrices with at most a few dozen terms
GAP_TOL = 1e-10  # eigenvalues of small symmetric float64 matrices
SIZES = (2, 3, 4, 5, 6, 8, 9, 12, 16)


def _topologies():
    for kind in TOPOLOGY_KINDS:
        for n in SIZES:
            if kind == "torus" and not any(n % r == 0 for r in range(2, math.isqrt(n) + 1)):
                continue
            yield kind, n


@pytest.mark.parametrize(("kind", "n"), list(_topologies()))
def test_mixing_matrices_are_doubly_stochastic_and_match_peers(kind: str, n: int) -> None:
    topology = Topology(kind, n, seed=3)
    for step in range(topology.period + 1):
        w = topology.mixing_matrix(step)
        assert w.dtype == torch.float64 and w.shape == (n, n)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(0), torch.ones(n, dtype=torch.float64), atol=STOCHASTIC_TOL, rtol=0)
        torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=torch.float64), atol=STOCHASTIC_TOL, rtol=0)
        if not topology.is_directed:
            assert torch.equal(w, w.T)
        p = topology.push_sum_matrix(step)
        torch.testing.assert_close(p.sum(0), torch.ones(n, dtype=torch.float64), atol=STOCHASTIC_TOL, rtol=0)
        sends = 0
        for rank in range(n):
            send_to, recv_from = topology.peers(rank, step)
            # Non-zero off-diagonal weights of row `rank` are exactly the ranks it receives from.
            nonzero = [j for j in range(n) if j != rank and w[rank, j] > 0]
            assert nonzero == recv_from
            assert rank not in send_to and rank not in recv_from
            for peer in send_to:  # every send is matched by a receive on the peer
                assert rank in topology.peers(peer, step)[1]
            if not topology.is_directed:
                assert send_to == recv_from
            sends += len(send_to)
        assert sends == sum(len(topology.peers(r, step)[1]) for r in range(n))


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9, 16])
def test_ring_spectral_gap_closed_form(n: int) -> None:
    # Uniform weights 1/3 on the cycle: eigenvalues (1 + 2 cos(2 pi k / n)) / 3, k = 0..n-1.
    lambda_2 = max(abs(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(1, n))
    topology = Topology("ring", n)
    assert topology.spectral_gap() == pytest.approx(1 - lambda_2, abs=GAP_TOL)
    w = topology.mixing_matrix()
    assert torch.allclose(w[0, [1, n - 1]], torch.full((2,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("n", [2, 3, 4, 7, 16])
def test_complete_graph_is_exact_averaging(n: int) -> None:
    topology = Topology("complete", n)
    torch.testing.assert_close(topology.mixing_matrix(), torch.full((n, n), 1 / n, dtype=torch.float64))
    assert topology.spectral_gap() == pytest.approx(1.0, abs=GAP_TOL)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_one_peer_exponential_averages_exactly_in_one_period(n: int) -> None:
    topology = Topology("one_peer_exponential", n)
    assert topology.is_time_varying and topology.period == int(math.log2(n))
    product = torch.eye(n, dtype=torch.float64)
    for step in range(topology.period):
        assert [len(topology.peers(r, step)[0]) for r in range(n)] == [1] * n
        product = topology.mixing_matrix(step) @ product
    assert torch.equal(product, torch.full((n, n), 1 / n, dtype=torch.float64))  # dyadic: exact
    assert topology.spectral_gap() == pytest.approx(1.0, abs=GAP_TOL)
    # The schedule repeats with the period.
    assert torch.equal(topology.mixing_matrix(topology.period + 1), topology.mixing_matrix(1))


def test_exponential_graph_peers_and_weights() -> None:
    topology = Topology("exponential", 8)
    assert topology.peers(0) == ([1, 2, 4], [4, 6, 7])
    assert topology.peers(5) == ([1, 6, 7], [1, 3, 4])
    assert torch.allclose(topology.mixing_matrix()[0, [0, 4, 6, 7]], torch.full((4,), 0.25, dtype=torch.float64))


def test_torus_neighbours() -> None:
    topology = Topology("torus", 12)  # 3 x 4
    assert topology.peers(0)[0] == [1, 3, 4, 8]
    # 4-regular: Metropolis-Hastings weights are uniform 1/5.
    assert torch.allclose(topology.mixing_matrix()[0, [0, 1, 3, 4, 8]], torch.full((5,), 0.2, dtype=torch.float64))


def test_metropolis_hastings_on_irregular_graph() -> None:
    topology = Topology("erdos_renyi", 4, seed=0)
    assert topology.out_neighbours() == [[2, 3], [2], [0, 1, 3], [0, 2]]
    w = topology.mixing_matrix()
    degree = [2, 1, 3, 2]
    for i, neighbours in enumerate(topology.out_neighbours()):
        for j in neighbours:
            assert w[i, j] == pytest.approx(1 / (1 + max(degree[i], degree[j])))
    p = topology.push_sum_matrix()
    assert p[0, 2] == pytest.approx(1 / 4) and p[2, 1] == pytest.approx(1 / 2)
    assert not torch.allclose(p.sum(1), torch.ones(4, dtype=torch.float64))  # only column-stochastic


def test_erdos_renyi_is_seeded_and_connected() -> None:
    for seed in range(5):
        a, b = Topology("erdos_renyi", 10, seed=seed), Topology("erdos_renyi", 10, seed=seed)
        assert a.out_neighbours() == b.out_neighbours()
        assert a.spectral_gap() > 0  # connected <=> lambda_2 < 1 for Metropolis-Hastings weights
    assert Topology("erdos_renyi", 10, seed=0).out_neighbours() != Topology("erdos_renyi", 10, seed=1).out_neighbours()
    assert Topology("erdos_renyi", 6, p=1.0).out_neighbours() == Topology("complete", 6).out_neighbours()


def test_single_rank_is_trivial() -> None:
    for kind in ("ring", "exponential", "one_peer_exponential", "complete", "erdos_renyi"):
        topology = Topology(kind, 1)
        assert topology.peers(0) == ([], [])
        assert torch.equal(topology.mixing_matrix(), torch.ones(1, 1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("star", 4), {}, ValueError, "unknown topology kind 'star'"),
        (("ring", 0), {}, ValueError, "world_size must be at least 1"),
        (("ring", 2.0), {}, TypeError, "world_size must be an integer"),
        (("torus", 7), {}, ValueError, "got 7 \\(a prime\\)"),
        (("torus", 2), {}, ValueError, "rows x cols"),
        (("ring", 4), {"p": 0.5}, ValueError, "does not take p"),
        (("erdos_renyi", 4), {"p": 0.0}, ValueError, "p must be a probability"),
        (("erdos_renyi", 4), {"p": 1.5}, ValueError, "p must be a probability"),
        (("erdos_renyi", 40), {"p": 0.001}, ValueError, "connected"),
        (("ring", 4), {"seed": 1.5}, TypeError, "seed must be an integer"),
    ],
)
def test_bad_arguments(args, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        Topology(*args, **kwargs)


def test_peers_rejects_out_of_range() -> None:
    topology = Topology("ring", 4)
    with pytest.raises(ValueError, match="rank must be"):
        topology.peers(4)
    with pytest.raises(ValueError, match="step must be"):
        topology.peers(0, -1)


@pytest.mark.parametrize("kind", ["ring", "one_peer_exponential"])
def test_every_round_method_rejects_a_bad_step_or_rank(kind: str) -> None:
    topology = Topology(kind, 4)
    for method in (topology.mixing_matrix, topology.push_sum_matrix, topology.out_neighbours):
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match=f"step must be a non-negative integer, got {bad!r}"):
                method(bad)
    for bad in (-1, 4, 0.0):
        with pytest.raises(ValueError, match=f"rank must be an integer in \\[0, 4\\), got {bad!r}"):
            topology.bytes_per_round(100, rank=bad)
    with pytest.raises(ValueError, match="step must be"):
        topology.bytes_per_round(100, rank=0, step=-1)


@pytest.mark.parametrize(("kind", "n", "sends"), [("ring", 8, 2), ("exponential", 8, 3), ("exponential", 5, 3),
                                                  ("one_peer_exponential", 8, 1), ("complete", 5, 4)])
def test_bytes_per_round_is_one_model_per_peer(kind: str, n: int, sends: int) -> None:
    topology = Topology(kind, n)
    for step in range(topology.period):
        assert [topology.bytes_per_round(1000, rank, step) for rank in range(n)] == [1000 * sends] * n
