"""D², gradient tracking, CHOCO-SGD, label-skewed partitions and compressed DDP on 4 gloo processes.

One launch (``tests/_dist/heterogeneous_scenarios.py``) runs the scenarios; each test checks what the ranks
saved against a dense float64 re-simulation of all ranks, a closed form for the bytes, or the partition.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist.launch import launch, launched, load_ranks

from lightning_optsurvey.averaging.compression import QSGD, RandomK, Sign, TopK
from lightning_optsurvey.strategies import Topology

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

WORLD = 4
FAST = ("algorithm_reference", "compressed_ddp", "partition_user_datamodule", "frozen_parameters",
        "powersgd_scalar_parameter")
REFERENCE_REL = 1e-12  # a few float64 steps, summed in another order than the reference
LR = 0.1


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launched(tmp_path_factory, "heterogeneous_scenarios.py", *FAST, nodes=2, procs_per_node=2, timeout=500)


load = partial(load_ranks, world=WORLD)  # what each rank saved for a scenario


def _gradients(results: list[dict[str, Any]], x: torch.Tensor, step: int) -> torch.Tensor:
    """Least-squares gradients ``X^T (X x - y) / n`` of every rank's batch at ``step``, stacked."""
    rows = []
    for rank in range(WORLD):
        xb, yb = results[rank]["batches"][step]
        rows.append(xb.T @ (xb @ x[rank] - yb) / len(yb))
    return torch.stack(rows)


def _start() -> torch.Tensor:
    return torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).repeat(WORLD, 1)


def _assert_trajectory(results: list[dict[str, Any]], step: int, x: torch.Tensor) -> None:
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["params"][step], x[rank], rtol=REFERENCE_REL, atol=REFERENCE_REL)


@pytest.mark.parametrize("variant", ["d2_ring", "d2_complete"])
def test_d2_matches_a_dense_simulation(out_dir: Path, variant: str) -> None:
    """x^{t+1} = M (2 x^t - x^{t-1} - lr g^t + lr g^{t-1}), x^1 = M (x^0 - lr g^0); M = (I + W)/2 on the ring of 4."""
    results = [r[variant] for r in load(out_dir, "algorithm_reference")]
    w = Topology("ring" if variant == "d2_ring" else "complete", WORLD).mixing_matrix()
    lazy = variant == "d2_ring"  # the ring of 4 has eigenvalue -1/3: z^2 + 2z/3 - 1/3 has the root -1
    assert all(r["lazy"] is lazy for r in results)
    mix = (torch.eye(WORLD, dtype=torch.float64) + w) / 2 if lazy else w
    x, x_prev, g_prev = _start(), None, None
    for step in range(6):
        g = _gradients(results, x, step)
        new = mix @ (x - LR * g) if x_prev is None else mix @ (2 * x - x_prev - LR * g + LR * g_prev)
        x_prev, g_prev, x = x, g, new
        _assert_trajectory(results, step, x)
    # One model (3 float64) per neighbour and step, as D-PSGD.
    assert all(r["bytes"] == [float(8 * 3 * (2 if lazy else 3))] * 6 for r in results)


@pytest.mark.parametrize("variant", ["gt_ring", "gt_exponential"])
def test_gradient_tracking_matches_a_dense_simulation(out_dir: Path, variant: str) -> None:
    """DIGing: x^{t+1} = W x^t - lr y^t, y^{t+1} = W y^t + g^{t+1} - g^t, y^0 = g^0."""
    results = [r[variant] for r in load(out_dir, "algorithm_reference")]
    w = Topology(variant.removeprefix("gt_"), WORLD).mixing_matrix()
    x = _start()
    y = g_prev = None
    for step in range(6):
        g = _gradients(results, x, step)
        y = g if y is None else w @ y + g - g_prev
        x, g_prev = w @ x - LR * y, g
        _assert_trajectory(results, step, x)
    # x and y (3 float64 each) to each of 2 neighbours (ring: both sides; exponential on 4: i+1, i+2).
    assert all(r["bytes"] == [float(2 * 2 * 3 * 8)] * 6 for r in results)


CHOCO = {
    "choco_topk": (TopK(0.34), 0.8, 0, 8 + 4),  # k = 1: one float64 value + one int32 index
    "choco_randomk": (RandomK(0.67), 0.5, 3, 2 * (8 + 4)),  # k = 2
    "choco_qsgd": (QSGD(levels=4), 0.6, 0, 8 + 3),  # float64 norm + 3 int8 levels
    "choco_sign": (Sign(), 0.4, 0, 8 + 1),  # float64 scale + 3 bits in one byte
}


def _check_choco(results: list[dict[str, Any]], variant: str, x: torch.Tensor, steps: int) -> None:
    """Re-simulate CHOCO densely from ``x`` (replicas at ``x``, ``s = W x``) and compare every step:
    h = x - lr g; q_i = C(h_i - xhat_i); xhat += q; s_i += sum_j W_ij q_j; x = h + gamma (s - xhat)."""
    compressor, gamma, seed, _ = CHOCO[variant]
    w = Topology("ring", WORLD).mixing_matrix()
    generators = [torch.Generator().manual_seed(seed + 1_000_003 * rank) for rank in range(WORLD)]
    hat, s = x.clone(), w @ x
    for step in range(steps):
        h = x - LR * _gradients(results, x, step)
        q = torch.stack([compressor(h[rank] - hat[rank], generators[rank]) for rank in range(WORLD)])
        hat, s = hat + q, s + w @ q
        x = h + gamma * (s - hat)
        _assert_trajectory(results, step, x)


@pytest.mark.parametrize("variant", list(CHOCO))
def test_choco_matches_a_dense_simulation_and_sends_the_payload(out_dir: Path, variant: str) -> None:
    """From the common initial model (the replicas start there, not at zero)."""
    results = [r[variant] for r in load(out_dir, "algorithm_reference")]
    _check_choco(results, variant, _start(), 6)
    assert all(r["bytes"] == [float(2 * CHOCO[variant][3])] * 6 for r in results)


def test_choco_resumed_from_diverged_models_exchanges_its_replicas_once(out_dir: Path) -> None:
    """From a D-PSGD checkpoint (one model per rank, no replicas): xhat_i = x_i, s_i = sum_j W_ij x_j."""
    results = [r["choco_from_dpsgd"] for r in load(out_dir, "algorithm_reference")]
    x = torch.stack([r["start"] for r in results])
    assert (x - x.mean(0)).abs().max() > 0.1  # heterogeneous data: the ranks' models differ
    _check_choco(results, "choco_topk", x, 3)
    # Steps send the compressed payload; the one uncompressed exchange (3 float64 to each of 2
    # neighbours) comes before them, on top of D-PSGD's 3 restored steps of the same size.
    payload = CHOCO["choco_topk"][3]
    assert all(r["bytes"] == [float(2 * payload)] * 3 for r in results)
    assert all(r["total_bytes"] == 4 * 2 * 3 * 8 + 3 * 2 * payload for r in results)


def test_compressed_ddp_bytes_and_updates(out_dir: Path) -> None:
    results = load(out_dir, "compressed_ddp")
    # The model: Linear(6, 16), Linear(16, 3) (no BatchNorm): 163 float32 in one bucket.
    ring = lambda nbytes: (2 * (WORLD - 1) * nbytes) // WORLD  # noqa: E731
    # PowerSGD rank 1: the 16x6 and 3x16 weights are sent as P (16 + 3) and Q (6 + 16) since
    # (n + m) * 1 * 2 < n * m; the biases (16 + 3) are not worth compressing and go as they are.
    powersgd_step = ring(19 * 4) + ring(19 * 4) + ring(22 * 4)
    for result in results:
        assert result["none"]["bytes"] == [float(ring(163 * 4))] * 10
        assert result["fp16"]["bytes"] == [float(ring(163 * 2))] * 10
        assert result["powersgd"]["bytes"] == [float(ring(163 * 4))] * 2 + [float(powersgd_step)] * 8
        assert result["powersgd"]["total"] == 2 * ring(163 * 4) + 8 * powersgd_step
        reference = result["none"]["params"]
        for step, (fp16, low_rank) in enumerate(zip(result["fp16"]["params"], result["powersgd"]["params"])):
            torch.testing.assert_close(fp16, reference[step], rtol=0, atol=1e-3)  # fp16 rounding of gradients
            if step < 2:  # plain all-reduce before start_powersgd_iter
                assert torch.equal(low_rank, reference[step])
        assert not torch.allclose(result["powersgd"]["params"][-1], reference[-1], atol=1e-3)
    for name in ("none", "fp16", "powersgd"):  # DDP keeps the replicas identical
        assert all(torch.equal(r[name]["params"][-1], results[0][name]["params"][-1]) for r in results)


@pytest.mark.slow
def test_checkpoint_resume_is_exact_for_every_new_algorithm(tmp_path: Path) -> None:
    launch("heterogeneous_scenarios.py", tmp_path, "algorithm_resume", nodes=2, procs_per_node=2, timeout=500)
    results = load(tmp_path, "algorithm_resume")
    for name in ("d2", "gt", "choco"):
        checkpoint = torch.load(tmp_path / f"hetero_{name}.ckpt", weights_only=False)
        assert "gossip_algorithm" in checkpoint["per_rank_states"]["ranks"][0]["strategy"]
        for rank, result in enumerate(results):
            runs = result[name]
            assert any(not torch.equal(runs["first"][k], runs["straight"][k]) for k in runs["first"])
            for key, tensor in runs["straight"].items():
                assert torch.equal(runs["resumed"][key], tensor), (name, rank, key)
                if key.endswith("running_var"):  # BatchNorm statistics stay valid under every algorithm
                    assert bool((tensor > 0).all()), (name, rank, key)


@pytest.mark.slow
def test_powersgd_resume_is_exact_on_2_processes(tmp_path: Path) -> None:
    """The checkpoint carries every rank's PowerSGD state; without it the resumed run restarts the
    error feedback and the warm start from zero (and from plain all-reduce), and drifts."""
    launch("heterogeneous_scenarios.py", tmp_path, "powersgd_resume", nodes=1, procs_per_node=2, timeout=300)
    results = [torch.load(tmp_path / f"powersgd_resume_rank{r}.pt", weights_only=False) for r in range(2)]
    checkpoint = torch.load(tmp_path / "powersgd.ckpt", weights_only=True)  # plain values only
    saved = checkpoint["compressed_ddp_states"]["ranks"]
    assert [s["powersgd"]["iter"] for s in saved] == [results[0]["iter_at_checkpoint"]] * 2
    assert results[0]["iter_at_checkpoint"] > 2  # the checkpoint falls after PowerSGD started
    errors = [torch.cat([e.flatten() for _, e in sorted(s["powersgd"]["error"].items())]) for s in saved]
    assert errors[0].abs().sum() > 0 and not torch.equal(errors[0], errors[1])  # error feedback is per rank
    assert sorted(saved[0]["powersgd"]["q"]) == [0, 4]  # the two Linear weights; biases, BatchNorm not
    for runs in results:
        for key, tensor in runs["plain"]["straight"].items():  # the control: plain DDP resumes exactly
            assert torch.equal(runs["plain"]["resumed"][key], tensor), ("plain", key)
        assert runs["iter_at_end"] == 2 * runs["iter_at_checkpoint"]
        assert any(not torch.equal(runs["first"][k], runs["straight"][k]) for k in runs["first"])
        for key, tensor in runs["straight"].items():
            assert torch.equal(runs["resumed"][key], tensor), key


def test_powersgd_refuses_a_scalar_parameter_at_setup(out_dir: Path) -> None:
    for result in load(out_dir, "powersgd_scalar_parameter"):
        assert result["message"] is not None and "0-dimensional parameters" in result["message"]
        assert "['temperature']" in result["message"]


def test_every_algorithm_leaves_frozen_parameters_alone(out_dir: Path) -> None:
    for rank, result in enumerate(load(out_dir, "frozen_parameters")):
        initial = result["initial"]
        for algorithm in ("dpsgd", "d2", "gradient_tracking", "choco"):
            for name in ("backbone.weight", "backbone.bias"):
                # gossiped like every parameter: equal on all ranks, so only mixing's rounding moves them
                torch.testing.assert_close(result[algorithm][name], initial[name], rtol=0, atol=1e-6,
                                           msg=lambda m, r=rank, a=algorithm, n=name: f"rank {r} {a} {n}: {m}")
            assert not torch.equal(result[algorithm]["head.weight"], initial["head.weight"]), (rank, algorithm)


def test_a_users_datamodule_partitions_its_own_data_with_the_public_sampler(out_dir: Path) -> None:
    results = load(out_dir, "partition_user_datamodule")
    per_rank = -(-1797 // WORLD)  # all 1797 digits, ceil(n / N) per rank and epoch
    assert {r["steps"] for r in results} == {-(-per_rank // 16)}  # same number of steps on every rank
    for result in results:
        seen, part = result["seen"], result["part"]
        assert seen.numel() == per_rank
        assert set(seen.tolist()) <= set(part.tolist())  # only this rank's part
        assert len(set(seen.tolist())) == min(per_rank, part.numel())  # all of a small part, no repeats in a large
    assert torch.equal(torch.cat([r["part"] for r in results]).sort().values, torch.arange(1797))
    labels = results[0]["labels"]
    assert min(len(set(labels[r["part"]].tolist())) for r in results) < 10  # label skew
    assert not torch.allclose(results[0]["weight"], results[1]["weight"])  # gossip: models still differ


@pytest.mark.slow
def test_dirichlet_partition_under_ddp_trains_each_rank_on_its_part(tmp_path: Path) -> None:
    launch("heterogeneous_scenarios.py", tmp_path, "partition_ddp", nodes=2, procs_per_node=2, timeout=500)
    results = load(tmp_path, "partition_ddp")
    per_rank = -(-1078 // WORLD)  # digits: 1078 training images (val 0.2, test 0.2), ceil(n / N) per rank
    assert {r["steps"] for r in results} == {-(-per_rank // 16)}  # same number of steps on every rank
    for result in results:
        seen = torch.bincount(result["labels"], minlength=10)
        part = torch.bincount(result["part_labels"], minlength=10)
        assert int(seen.sum()) == per_rank
        assert bool(((seen > 0) <= (part > 0)).all())  # only the part's classes
        if part.sum() >= per_rank:  # a large part: a subset of it, without repetition
            assert bool((seen <= part).all())
        else:  # a small part: all of it, then again
            assert bool((seen >= part).all())
    classes = [set(torch.nonzero(torch.bincount(r["part_labels"], minlength=10)).flatten().tolist()) for r in results]
    assert min(len(c) for c in classes) < 10  # label skew
