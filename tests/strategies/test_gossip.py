"""GossipStrategy on 4 real gloo processes, emulating 2 nodes x 2 processes on loopback.

One launch (``tests/_dist/gossip_scenarios.py``) runs every scenario in the same process group, so the
process start-up is paid once; each test then checks what the ranks saved against a closed form, a
reference run (Lightning's "ddp") or an exact re-computation.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from _dist.launch import launched, load_ranks
from torch import nn

from lightning_optsurvey.strategies import Topology

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]

WORLD = 4
NODES = 2
SCENARIOS = (
    "ddp_equivalence", "one_peer", "float64_gossip", "linear_reference", "checkpoint_resume", "validation_logging"
)
DDP_TOL = 1e-6  # the bound: 20 float32 SGD steps, parameters vs gradients averaged
AVERAGE_TOL = 1e-6  # float32 average of 4 numbers of magnitude < 2, vs a float64 reference
FLOAT32_REL = 2e-7  # one float32 rounding (callback_metrics store float32), relative
CONTRACTION_REL = 1e-12  # float64 rounding in a ratio of sums of squares
REFERENCE_REL = 1e-12  # a few float64 steps, summed in another order than the reference
PUSH_SUM_REL = 1e-12  # 80 float64 rounds, in a different summation order than the dense reference


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launched(tmp_path_factory, "gossip_scenarios.py", *SCENARIOS, nodes=NODES, procs_per_node=WORLD // NODES,
                    timeout=360)


load = partial(load_ranks, world=WORLD)  # what each rank saved for a scenario


def test_complete_graph_equals_ddp(out_dir: Path) -> None:
    for rank, result in enumerate(load(out_dir, "ddp_equivalence")):
        for name, reference in result["ddp"].items():
            difference = (result["gossip"][name] - reference).abs().max().item()
            assert difference <= DDP_TOL, (rank, name, difference)
        # Complete graph: every rank sends its whole model to the 3 others, every step.
        assert result["bytes"] == [3.0 * result["model_bytes"]] * 20


def _pure_gossip_start(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.arange(5, dtype=torch.float32) * (rank + 1) ** 2 + 7 * rank
    stat = torch.tensor([1.0, -2.0, 4.0]) * (3 * rank + 1)
    return w, stat


def test_one_peer_exponential_reaches_exact_average_in_log2_rounds(out_dir: Path) -> None:
    results = load(out_dir, "one_peer")
    starts = [_pure_gossip_start(r) for r in range(WORLD)]
    mean_w = torch.stack([w for w, _ in starts]).mean(0)
    mean_stat = torch.stack([s for _, s in starts]).mean(0)
    assert int(math.log2(WORLD)) == 2
    model_bytes = (5 + 3) * 4  # the parameter and the float buffer, float32
    for variant, extra_bytes in (("dpsgd", 0), ("overlap", 0), ("push_sum", 8)):
        for rank, result in enumerate(results):
            params = result[variant]["params"]  # after steps 1..4
            assert not torch.equal(params[0], mean_w), (variant, rank)  # not averaged after 1 round
            for after in params[1:]:  # exact after log2(N) = 2 rounds, and stays there
                assert torch.equal(after, mean_w), (variant, rank)
            assert torch.equal(result[variant]["stat"], mean_stat), (variant, rank)  # float buffers too
            # One peer per round: one model's bytes per rank per step (+ the push-sum weight).
            assert result[variant]["bytes"] == [float(model_bytes + extra_bytes)] * 4
    for rank, result in enumerate(results):  # gossip_every=2: rounds after steps 2 and 4 only
        params = result["every2"]["params"]
        assert torch.equal(params[0], starts[rank][0])
        assert torch.equal(params[2], params[1]) and not torch.equal(params[1], mean_w)
        assert torch.equal(params[3], mean_w)
        assert result["every2"]["bytes"] == [0.0, float(model_bytes), 0.0, float(model_bytes)]


@pytest.mark.parametrize("kind", ["ring", "exponential"])
def test_consensus_distance_contracts_by_lambda2_squared(out_dir: Path, kind: str) -> None:
    # N = 4. Ring, weights 1/3: eigenvalues (1 + 2 cos(2 pi k / 4)) / 3 = 1, 1/3, -1/3, 1/3.
    # Exponential (receive from i-1, i-2, weights 1/3): (1 + w^-k + w^-2k) / 3 with w = i: 1, -i/3, 1/3, i/3.
    # Both normal (circulant), so ||W - 11^T/N||_2 = |lambda_2| = 1/3.
    lambda_2 = 1 / 3
    results = [r[kind] for r in load(out_dir, "float64_gossip")]
    gathered = results[0]["gathered"]  # independent: all_gather of every rank's parameters, float64
    assert gathered[0] > 1.0 and len(gathered) == 6
    for before, after in itertools.pairwise(gathered):
        assert after <= lambda_2**2 * before * (1 + CONTRACTION_REL)
    # ConsensusDistance logs the same numbers on every rank (after each step).
    for result in results:
        assert result["gathered"] == pytest.approx(gathered, rel=CONTRACTION_REL)
        assert result["logged"] == pytest.approx(gathered[1:], rel=FLOAT32_REL)


def test_push_sum_matches_dense_reference_and_debiases(out_dir: Path) -> None:
    results = [r["push_sum"] for r in load(out_dir, "float64_gossip")]
    topology = Topology("erdos_renyi", WORLD, seed=0)
    p = topology.push_sum_matrix()
    # Dense reference of pure push-sum: z <- P z, w <- P w, x = z / w, 80 rounds.
    z = torch.stack([r["init"] for r in results])
    w = torch.ones(WORLD, 1, dtype=torch.float64)
    for _ in range(80):
        z, w = p @ z, p @ w
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["final"], z[rank] / w[rank], rtol=PUSH_SUM_REL, atol=PUSH_SUM_REL)
        torch.testing.assert_close(result["weight"], w[rank], rtol=PUSH_SUM_REL, atol=0)
        # De-biased: the true average of the starts, although P is only column-stochastic.
        mean = torch.stack([r["init"] for r in results]).mean(0)
        torch.testing.assert_close(result["final"], mean, rtol=0, atol=PUSH_SUM_REL)
    assert not torch.allclose(w, torch.ones_like(w), atol=1e-3)  # the weights did move


def _user_mixing(variant: str, step: int) -> torch.Tensor:
    """The user topologies of the scenario, written out densely here (not through Topology)."""
    eye = torch.eye(WORLD, dtype=torch.float64)
    if variant == "user_matrix":  # 0.5 I + 0.3 S + 0.2 S^2, S[i, i + 1] = 1
        shift = torch.roll(eye, 1, dims=1)
        return 0.5 * eye + 0.3 * shift + 0.2 * shift @ shift
    if variant == "user_time_varying":  # pairs i <-> i xor 2^(t mod 2), Metropolis weights 1/2
        return 0.5 * (eye + eye[[i ^ (1 << (step % 2)) for i in range(WORLD)]])
    sends = [[1, 2], [2], [3], [0]]  # user_push_sum: P[i, j] = 1 / (1 + out-degree of j)
    p = eye.clone()
    for j, out in enumerate(sends):
        p[out, j] = 1.0
    return p / p.sum(0, keepdim=True)


@pytest.mark.parametrize("variant", ["dpsgd", "dpsgd_overlap", "push_sum", "push_sum_overlap", "user_matrix",
                                     "user_time_varying", "user_push_sum"])
def test_update_rules_match_a_dense_reference(out_dir: Path, variant: str) -> None:
    """Least squares, float64, plain SGD: each rank's trajectory against a dense simulation of all ranks.

    x_i + Delta_i with Delta_i = -lr grad_i(x_i), and W (ring) or P (push-sum, irregular graph):
    dpsgd: x <- W (x + Delta); overlap: x <- W x + Delta; push-sum: z <- P (w x + Delta), w <- P w,
    x = z / w; push-sum overlap: z <- P (w x) + Delta, w <- P w, x = z / w.
    """
    results = [r[variant] for r in load(out_dir, "linear_reference")]
    lr, steps = 0.1, 6
    push_sum = variant.startswith("push_sum") or variant == "user_push_sum"
    topology = Topology("erdos_renyi", WORLD, seed=0) if push_sum else Topology("ring", WORLD)
    mix = topology.push_sum_matrix() if push_sum else topology.mixing_matrix()
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).repeat(WORLD, 1)
    w = torch.ones(WORLD, 1, dtype=torch.float64)
    for step in range(steps):
        delta = torch.stack([
            -lr * (xb.T @ (xb @ x[r] - yb)) / len(yb) for r, (xb, yb) in
            ((r, results[r]["batches"][step]) for r in range(WORLD))
        ])
        if variant.startswith("user"):
            mix = _user_mixing(variant, step)
        if variant in ("dpsgd", "user_matrix", "user_time_varying"):
            x = mix @ (x + delta)
        elif variant == "dpsgd_overlap":
            x = mix @ x + delta
        elif variant in ("push_sum", "user_push_sum"):
            z, w = mix @ (w * x + delta), mix @ w
            x = z / w
        else:
            z, w = mix @ (w * x) + delta, mix @ w
            x = z / w
        for rank in range(WORLD):
            torch.testing.assert_close(results[rank]["params"][step], x[rank], rtol=REFERENCE_REL,
                                       atol=REFERENCE_REL)
    if push_sum:
        assert not torch.allclose(w, torch.ones_like(w), atol=1e-3)


def _regression_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("variant", ["ring", "push_sum"])
def test_checkpoint_holds_the_average_and_resume_is_exact(out_dir: Path, variant: str) -> None:
    results = [r[variant] for r in load(out_dir, "checkpoint_resume")]
    checkpoint = torch.load(out_dir / f"{variant}.ckpt", weights_only=False)
    weights = [r["weight"].double() if r["weight"] is not None else torch.ones(1, dtype=torch.float64)
               for r in results]
    if variant == "push_sum":  # irregular graph: the de-biasing weights moved, their sum did not
        assert not all(torch.equal(w, weights[0]) for w in weights)
        assert float(sum(weights)) == pytest.approx(WORLD, rel=1e-12)
    for name, saved in checkpoint["state_dict"].items():
        per_rank = [r["first"][name] for r in results]
        if saved.is_floating_point():
            reference = sum(w * t.double() for w, t in zip(weights, per_rank)) / sum(weights)
            assert (saved.double() - reference).abs().max().item() <= AVERAGE_TOL, name
            assert not all(torch.equal(t, per_rank[0]) for t in per_rank), name  # the ranks did differ
        else:
            assert torch.equal(saved, per_rank[0])
    stored = checkpoint["per_rank_states"]
    assert stored["world_size"] == WORLD and stored["strategy"] == "GossipStrategy"
    for rank, result in enumerate(results):
        for name, tensor in result["first"].items():
            assert torch.equal(stored["ranks"][rank]["state_dict"][name], tensor)
        # Resumed for one more epoch == trained two epochs straight, bit for bit.
        for name, tensor in result["straight"].items():
            assert torch.equal(result["resumed"][name], tensor), (rank, name)
    # The consensus checkpoint loads into a plain single-device model.
    model = _regression_model()
    model.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()})


def test_validation_logging_with_sync_dist_and_callbacks(out_dir: Path) -> None:
    results = load(out_dir, "validation_logging")
    own_losses = [r["after_fit"]["val/own_loss"] for r in results]
    for rank, result in enumerate(results):
        assert result["topology"] == {"global_rank": rank, "node_rank": rank // 2, "world_size": WORLD,
                                      "num_nodes": NODES}
        # sync_dist reduces over all 4 ranks (2 nodes), each evaluating the run's one model: the consensus.
        assert result["after_fit"]["val/rank"] == pytest.approx(sum(range(WORLD)) / WORLD)
        assert result["after_fit"]["val/loss"] == pytest.approx(sum(own_losses) / WORLD, rel=FLOAT32_REL * 4)
        # trainer.validate after fit evaluates the consensus again; the ranks keep their own models.
        assert result["validated"]["val/own_loss"] == pytest.approx(result["after_fit"]["val/own_loss"],
                                                                     rel=FLOAT32_REL)
        assert Path(result["best_path"]).name == "best.ckpt"
    # The logged score is the consensus model's: the average of the ranks' models (which training keeps
    # apart, see below) scores val/loss on the whole validation set (equal shards, equal batches).
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2 * 4 * WORLD, 6, generator=generator)
    y = x @ torch.randn(6, 3, generator=generator) + 0.1 * torch.randn(2 * 4 * WORLD, 3, generator=generator)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    average = {k.removeprefix("net."): sum(r["params"][k].double() for r in results) / WORLD
               for k in results[0]["params"]}
    model.load_state_dict({k: v.float() for k, v in average.items()})
    with torch.no_grad():
        consensus_loss = float(nn.functional.mse_loss(model(x), y))
    for result in results:
        assert result["after_fit"]["val/loss"] == pytest.approx(consensus_loss, rel=1e-5)
        assert result["validated"]["val/loss"] == pytest.approx(consensus_loss, rel=1e-5)
    first = results[0]["params"]
    assert any(not torch.equal(first[k], results[1]["params"][k]) for k in first)
    best = torch.load(results[0]["best_path"], weights_only=False)
    assert "EarlyStopping" in "".join(best["callbacks"])
