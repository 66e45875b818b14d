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
        (("star", 4), {}, ValueError, "kind must be one of 'ring', .*, got 'star'"),
        ((3, 4), {}, TypeError, "kind must be one of"),
        (("ring", 0), {}, ValueError, "world_size must be an integer >= 1, got 0"),
        (("ring", 2.0), {}, TypeError, "world_size must be an integer"),
        (("torus", 7), {}, ValueError, "got 7 \\(a prime\\)"),
        (("torus", 2), {}, ValueError, "rows x cols"),
        (("ring", 4), {"p": 0.5}, ValueError, "does not take p"),
        (("erdos_renyi", 4), {"p": 0.0}, ValueError, "p must be in \\(0.0, 1.0\\]"),
        (("erdos_renyi", 4), {"p": 1.5}, ValueError, "p must be in"),
        (("erdos_renyi", 4), {"p": "0.5"}, TypeError, "p must be a real number"),
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
    with pytest.raises(TypeError, match="rank must be"):
        topology.peers(0.0)


@pytest.mark.parametrize("kind", ["ring", "one_peer_exponential"])
def test_every_round_method_rejects_a_bad_step_or_rank(kind: str) -> None:
    topology = Topology(kind, 4)
    for method in (topology.mixing_matrix, topology.push_sum_matrix, topology.out_neighbours):
        for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
            with pytest.raises(error, match=f"step must be an integer >= 0, got {bad!r}"):
                method(bad)
    for bad, error in ((-1, ValueError), (4, ValueError), (0.0, TypeError)):
        with pytest.raises(error, match=f"rank must be an integer in \\[0, 3\\], got {bad!r}"):
            topology.bytes_per_round(100, rank=bad)
    with pytest.raises(ValueError, match="step must be"):
        topology.bytes_per_round(100, rank=0, step=-1)


@pytest.mark.parametrize(("kind", "n", "sends"), [("ring", 8, 2), ("exponential", 8, 3), ("exponential", 5, 3),
                                                  ("one_peer_exponential", 8, 1), ("complete", 5, 4)])
def test_bytes_per_round_is_one_model_per_peer(kind: str, n: int, sends: int) -> None:
    topology = Topology(kind, n)
    for step in range(topology.period):
        assert [topology.bytes_per_round(1000, rank, step) for rank in range(n)] == [1000 * sends] * n


# --------------------------------------------------------------------------------------------------------------
# Your own graph or weights
# --------------------------------------------------------------------------------------------------------------
def test_built_in_constructors_are_the_kinds() -> None:
    assert Topology.ring(8) == Topology("ring", 8)
    assert Topology.torus(12) == Topology("torus", 12)
    assert Topology.exponential(8) == Topology("exponential", 8)
    assert Topology.one_peer_exponential(8) == Topology("one_peer_exponential", 8)
    assert Topology.complete(5) == Topology("complete", 5)
    assert Topology.erdos_renyi(10, seed=3) == Topology("erdos_renyi", 10, seed=3)
    assert Topology.erdos_renyi(10, seed=3) != Topology("erdos_renyi", 10, seed=4)


@pytest.mark.parametrize(("kind", "n"), [("ring", 6), ("torus", 9), ("exponential", 8), ("one_peer_exponential", 8),
                                         ("complete", 5), ("erdos_renyi", 7)])
def test_a_built_in_graph_given_as_neighbours_gets_the_same_weights(kind: str, n: int) -> None:
    built_in = Topology(kind, n, seed=2)
    mine = Topology.from_neighbours(n, lambda rank, step: built_in.out_neighbours(step)[rank], period=built_in.period)
    assert (mine.is_directed, mine.is_time_varying, mine.period) == (
        built_in.is_directed, built_in.is_time_varying, built_in.period)
    for step in range(built_in.period):
        assert torch.equal(mine.mixing_matrix(step), built_in.mixing_matrix(step))
        assert torch.equal(mine.push_sum_matrix(step), built_in.push_sum_matrix(step))
        assert [mine.peers(r, step) for r in range(n)] == [built_in.peers(r, step) for r in range(n)]
    assert mine.spectral_gap() == built_in.spectral_gap()


def test_a_star_from_a_neighbour_table_gets_metropolis_weights() -> None:
    star = Topology.from_neighbours(4, [[1, 2, 3], [0], [0], [0]], name="star")
    # Closed form: hub degree 3, leaves 1: W_0j = 1/(1 + 3) on every edge, leaves keep 3/4.
    expected = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 0, 0], [0.25, 0, 0.75, 0], [0.25, 0, 0, 0.75]],
                            dtype=torch.float64)
    assert torch.equal(star.mixing_matrix(), expected)
    assert star.kind == "star" and not star.is_directed and star.period == 1
    assert star.spectral_gap() == pytest.approx(1 - 0.75, abs=GAP_TOL)  # eigenvalues 1, 3/4, 3/4, 0


def test_a_user_matrix_is_used_as_given_and_defines_the_peers() -> None:
    # Directed circulant weights 0.5 I + 0.3 S + 0.2 S^2 (S: receive from the next rank): doubly stochastic.
    n = 5
    shift = torch.roll(torch.eye(n, dtype=torch.float64), 1, dims=1)
    w = 0.5 * torch.eye(n, dtype=torch.float64) + 0.3 * shift + 0.2 * shift @ shift
    topology = Topology.from_matrix(w, name="circulant")
    assert torch.equal(topology.mixing_matrix(), w) and torch.equal(topology.push_sum_matrix(), w)
    assert topology.is_directed and not topology.is_time_varying
    assert topology.peers(0) == ([3, 4], [1, 2])
    # Circulant: the eigenvalues are 0.5 + 0.3 z + 0.2 z^2 over the 5th roots of unity z.
    z = [complex(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(1, n)]
    assert topology.spectral_gap() == pytest.approx(1 - max(abs(0.5 + 0.3 * c + 0.2 * c * c) for c in z), abs=GAP_TOL)
    w[0, 0] = 0.7  # the topology keeps its own copy
    assert topology.mixing_matrix()[0, 0] == 0.5


def test_a_time_varying_user_matrix_schedule() -> None:
    pairs_a = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]],
                           dtype=torch.float64)
    pairs_b = pairs_a[[1, 2, 3, 0]][:, [1, 2, 3, 0]]  # pairs (1, 2) and (3, 0)
    topology = Topology.from_matrix([pairs_a, pairs_b])
    assert topology.is_time_varying and topology.period == 2
    assert topology.peers(0, 0) == ([1], [1]) and topology.peers(0, 1) == ([3], [3]) and topology.peers(0, 2)[0] == [1]
    assert torch.equal(topology.mixing_matrix(3), pairs_b)
    assert topology.spectral_gap() == pytest.approx(1.0, abs=GAP_TOL)  # the two pairings average exactly


def test_a_column_stochastic_matrix_serves_push_sum_and_is_refused_for_mixing() -> None:
    p = torch.tensor([[0.5, 0.0, 1 / 3], [0.5, 0.5, 1 / 3], [0.0, 0.5, 1 / 3]], dtype=torch.float64)
    topology = Topology.from_matrix(p)
    assert torch.equal(topology.push_sum_matrix(), p)
    assert topology.matrices(push_sum=True)[0] is not p
    with pytest.raises(ValueError, match=r"not doubly stochastic \(rows \[0, 1, 2\].*algorithm='push_sum'"):
        topology.mixing_matrix()
    with pytest.raises(ValueError, match="not doubly stochastic"):
        topology.matrices()
    moduli = torch.linalg.eigvals(p).abs().sort(descending=True).values
    assert topology.spectral_gap() == pytest.approx(float(1 - moduli[1]), abs=GAP_TOL)


def test_a_directed_user_graph_whose_in_degrees_do_not_balance_is_refused_for_mixing_only() -> None:
    topology = Topology.from_neighbours(3, [[1, 2], [2], [0]])  # in-degrees 1, 1, 2
    assert topology.is_directed
    with pytest.raises(ValueError, match="not doubly stochastic .*Topology.from_matrix.*push_sum"):
        topology.mixing_matrix()
    p = topology.push_sum_matrix()
    torch.testing.assert_close(p.sum(0), torch.ones(3, dtype=torch.float64), atol=STOCHASTIC_TOL, rtol=0)
    assert p[1, 0] == pytest.approx(1 / 3) and p[2, 1] == pytest.approx(1 / 2)
    moduli = torch.linalg.eigvals(p).abs().sort(descending=True).values
    assert topology.spectral_gap() == pytest.approx(float(1 - moduli[1]), abs=GAP_TOL)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Topology.from_neighbours(3, "ring"), TypeError, "neighbours must be callable"),
        (lambda: Topology.from_neighbours(3, [[1], [2]]), ValueError, "one sequence of ranks per rank \\(3\\), got 2"),
        (lambda: Topology.from_neighbours(3, lambda r, t: [3]), ValueError, "neighbours\\(0, 0\\)\\[0\\] must be"),
        (lambda: Topology.from_neighbours(3, lambda r, t: [1.0]), TypeError, "neighbours\\(0, 0\\)\\[0\\]"),
        (lambda: Topology.from_neighbours(3, lambda r, t: [r]), ValueError, "names rank 0 itself"),
        (lambda: Topology.from_neighbours(3, lambda r, t: [(r + 1) % 3] * 2), ValueError, "repeats a rank"),
        (lambda: Topology.from_neighbours(3, lambda r, t: 1), TypeError, "must return the ranks"),
        (lambda: Topology.from_neighbours(3, [[1], [2], [0]], period=0), ValueError, "period must be"),
        (lambda: Topology.from_neighbours(3, [[1], [2], [0]], name=1), TypeError, "name must be"),
        (lambda: Topology.from_matrix("W"), TypeError, "matrix must be an N x N matrix"),
        (lambda: Topology.from_matrix(torch.ones(2, 2, dtype=torch.bool)), TypeError, "real weights"),
        (lambda: Topology.from_matrix(torch.ones(2, 3) / 2), ValueError, "square"),
        (lambda: Topology.from_matrix([[0.5, 0.5], [0.5, float("nan")]]), ValueError, "non-finite weight W\\[1, 1\\]"),
        (lambda: Topology.from_matrix([[1.5, 0.5], [-0.5, 0.5]]), ValueError, "negative weight W\\[1, 0\\] = -0.5"),
        (lambda: Topology.from_matrix([[0.5, 0.5], [0.6, 0.5]]), ValueError, "not column stochastic: columns \\[0\\]"),
        (lambda: Topology.from_matrix(torch.full((3, 3), 1 / 3)), ValueError, "column stochastic"),  # float32 thirds
    ],
)
def test_a_user_topology_with_bad_input_is_refused_naming_what_is_wrong(build, error, match) -> None:
    with pytest.raises(error, match=match):
        build()


def test_gossip_strategy_refuses_weights_its_algorithm_cannot_use_when_the_trainer_is_built() -> None:
    from lightning.pytorch import Trainer

    from lightning_optsurvey.strategies import GossipStrategy

    p = torch.tensor([[0.5, 0.0, 1 / 3], [0.5, 0.5, 1 / 3], [0.0, 0.5, 1 / 3]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not doubly stochastic"):
        Trainer(accelerator="cpu", devices=3, strategy=GossipStrategy(Topology.from_matrix(p)), logger=False)
    trainer = Trainer(accelerator="cpu", devices=3, logger=False,
                      strategy=GossipStrategy(Topology.from_matrix(p, name="mine"), algorithm="push_sum"))
    assert trainer.strategy.topology_kind == "mine" and torch.equal(trainer.strategy.topology.push_sum_matrix(), p)
