"""Local SGD, EASGD, LSGD and GRAWA on 4 real gloo processes.

One launch (``tests/_dist/centralized_scenarios.py``) runs every scenario in the same process group, so
the start-up is paid once; each test checks what the ranks saved against Lightning's "ddp", the pure
update functions, or closed forms written out here.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from _dist.launch import launched, load_ranks

from lightning_optsurvey.strategies._comm import ring_all_reduce_bytes
from lightning_optsurvey.strategies.easgd import easgd_step

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

WORLD = 4
SCENARIOS = ("local_sgd_equivalence", "local_sgd_unused_parameters", "local_sgd_schedule", "easgd_quadratic",
             "lsgd_synthetic", "digits", "checkpoint_resume")
DDP_TOL = 1e-6  # the bound: 12 float32 SGD steps, models averaged vs gradients averaged
AVERAGE_TOL = 1e-6  # float32 average of 4 numbers of magnitude < 4, vs a float64 reference
FLOAT64_TOL = 1e-12  # float64 recursions of 10 steps on O(1) numbers, summation order differs
CHANCE_ACC = 0.3  # 10 classes: an untrained model is near 0.1
LEARNED_ACC = 0.7  # 2 epochs of SGD on digits reach about 0.8 with every strategy


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launched(tmp_path_factory, "centralized_scenarios.py", *SCENARIOS, procs_per_node=WORLD, timeout=270)


load = partial(load_ranks, world=WORLD)  # what each rank saved for a scenario


# --------------------------------------------------------------------------------------------------
# Local SGD
# --------------------------------------------------------------------------------------------------
def test_local_sgd_degenerate_cases_equal_ddp(out_dir: Path) -> None:
    for rank, result in enumerate(load(out_dir, "local_sgd_equivalence")):
        for local, ddp in (("local_h1", "ddp_sgd"), ("warmup_momentum_bn", "ddp_momentum_bn")):
            for name, reference in result[ddp].items():
                if reference.is_floating_point():
                    difference = (result[local][name] - reference).abs().max().item()
                    assert difference <= DDP_TOL, (rank, local, name, difference)
                else:
                    assert torch.equal(result[local][name], reference), (rank, local, name)


def test_post_local_sgd_warmup_handles_unused_parameters_as_ddp_does(out_dir: Path) -> None:
    """Ranks 0, 2 train expert 0 and ranks 1, 3 expert 1 (their lists of gradients differ); expert 2 is idle."""
    for rank, result in enumerate(load(out_dir, "local_sgd_unused_parameters")):
        for name, reference in result["ddp"].items():
            difference = (result["warmup"][name] - reference).abs().max().item()
            assert difference <= DDP_TOL, (rank, name, difference)
        for name in ("experts.0.weight", "experts.1.weight"):
            assert not torch.equal(result["warmup"][name], result["initial"][name]), (rank, name)
        # no rank had a gradient for it: no step, so no weight decay either (as in DDP)
        assert torch.equal(result["warmup"]["experts.2.weight"], result["initial"]["experts.2.weight"])


def test_post_local_sgd_schedule_and_bytes(out_dir: Path) -> None:
    results = load(out_dir, "local_sgd_schedule")
    warmup, period, steps = 4, 3, 12
    synced = {warmup + period, warmup + 2 * period}
    param_bytes, buffer_bytes = results[0]["param_bytes"], results[0]["buffer_bytes"]
    for step in range(1, steps + 1):
        params = [r["params"][step - 1] for r in results]
        buffers = [r["buffers"][step - 1] for r in results]
        same_params = all(torch.equal(p, params[0]) for p in params)
        same_buffers = all(torch.equal(b, buffers[0]) for b in buffers)
        # Warm-up: averaged gradients keep the models equal; BatchNorm statistics are broadcast before
        # the forward pass (as DDP does), so after it they differ. Afterwards: equal only after syncs.
        assert same_params == (step <= warmup or step in synced), step
        assert same_buffers == (step in synced), step
        for rank, result in enumerate(results):
            if step <= warmup:  # the gradients and one float32 "used on this rank" flag per parameter
                flags = 4 * results[0]["num_params"]
                expected = ring_all_reduce_bytes(param_bytes + flags, WORLD) + (
                    (WORLD - 1) * buffer_bytes if rank == 0 else 0)
            elif step in synced:
                expected = ring_all_reduce_bytes(param_bytes + buffer_bytes, WORLD)
            else:
                expected = 0
            assert result["bytes"][step - 1] == expected, (rank, step)


# --------------------------------------------------------------------------------------------------
# EASGD
# --------------------------------------------------------------------------------------------------
def _minimizer(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(3, generator=generator, dtype=torch.float64)


def test_easgd_follows_the_synchronous_update_rule(out_dir: Path) -> None:
    h, lr, rho, tau, steps = 2.0, 0.1, 1.5, 2, 10
    results = load(out_dir, "easgd_quadratic")
    minimizers = [_minimizer(r) for r in range(WORLD)]
    workers = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) for _ in range(WORLD)]
    center = workers[0].clone()
    for step in range(1, steps + 1):
        grads = [h * (x - m) for x, m in zip(workers, minimizers)]
        if step % tau == 0:
            workers, center = easgd_step(workers, center, alpha=lr * rho, grads=grads, lr=lr)
        else:
            workers = [x - lr * g for x, g in zip(workers, grads)]
        for rank, result in enumerate(results):
            assert (result["params"][step - 1] - workers[rank]).abs().max() <= FLOAT64_TOL, (rank, step)
            assert (result["centers"][step - 1]["w"] - center).abs().max() <= FLOAT64_TOL, (rank, step)
            assert result["bytes"][step - 1] == (ring_all_reduce_bytes(3 * 8, WORLD) if step % tau == 0 else 0)
    assert (workers[0] - workers[1]).abs().max() > 0.1  # the workers stay apart: elastic, not averaged


# --------------------------------------------------------------------------------------------------
# LSGD and GRAWA
# --------------------------------------------------------------------------------------------------
LSGD_LOSSES = {0: [0.5, 5.5, 3.0, 3.0], 1: [3.5, 3.5, 2.0, 2.0], 2: [2.0, 2.0, 0.25, 4.75], 3: [2.5, 2.5, 2.5, 2.5]}
SYNTHETIC_BYTES = (4 + 2) * 8  # parameter w and float buffer stat, float64


def _start(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.arange(4, dtype=torch.float64) * (rank + 1) - 2.0 * rank
    stat = torch.tensor([1.0, -3.0], dtype=torch.float64) * (rank + 2)
    return w, stat


def test_lsgd_picks_the_lowest_mean_loss_and_pulls_exactly(out_dir: Path) -> None:
    results = [r["lsgd"] for r in load(out_dir, "lsgd_synthetic")]
    strength, period = 0.25, 2
    # The leader is the lowest *mean* over the window: rank 2 then rank 1, although rank 0 and then
    # rank 2 had the single lowest loss in those windows.
    means = [[sum(LSGD_LOSSES[r][s:s + period]) / period for r in range(WORLD)] for s in (0, 2)]
    leaders = [min(range(WORLD), key=lambda r, m=m: m[r]) for m in means]
    assert leaders == [2, 1]
    state = [list(_start(r)) for r in range(WORLD)]
    for step in range(1, 5):
        leader = leaders[step // period - 1] if step >= period else None
        if step % period == 0:
            target = [t.clone() for t in state[leader]]
            for r in range(WORLD):
                if r != leader:  # dyadic values and lambda = 1/4: exact
                    state[r] = [x - strength * (x - t) for x, t in zip(state[r], target)]
        for rank, result in enumerate(results):
            assert torch.equal(result["params"][step - 1], state[rank][0]), (rank, step)
            assert torch.equal(result["buffers"][step - 1], state[rank][1]), (rank, step)
            assert result["leaders"][step - 1] == leader
            gather = 8 * (WORLD - 1)
            broadcast = SYNTHETIC_BYTES * (WORLD - 1) if step % period == 0 and rank == leader else 0
            assert result["bytes"][step - 1] == (gather + broadcast if step % period == 0 else 0), (rank, step)


def _grawa_grad(rank: int) -> torch.Tensor:
    return torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=torch.float64) / (rank + 1) + rank


def test_grawa_pulls_toward_the_inverse_gradient_norm_weighted_center(out_dir: Path) -> None:
    results = [r["grawa"] for r in load(out_dir, "lsgd_synthetic")]
    strength = 0.5
    inverse = [1.0 / float(_grawa_grad(r).norm()) for r in range(WORLD)]
    weights = [v / sum(inverse) for v in inverse]
    assert max(weights) > 1.5 * min(weights)  # far from the plain average
    state = [list(_start(r)) for r in range(WORLD)]
    for step in (1, 2):
        centers = [sum(weights[r] * state[r][k] for r in range(WORLD)) for k in range(2)]
        state = [[x - strength * (x - c) for x, c in zip(state[r], centers)] for r in range(WORLD)]
        for rank, result in enumerate(results):
            assert (result["params"][step - 1] - state[rank][0]).abs().max() <= FLOAT64_TOL, (rank, step)
            assert (result["buffers"][step - 1] - state[rank][1]).abs().max() <= FLOAT64_TOL, (rank, step)
            expected = 8 * (WORLD - 1) + ring_all_reduce_bytes(SYNTHETIC_BYTES, WORLD)
            assert result["bytes"][step - 1] == expected


# --------------------------------------------------------------------------------------------------
# Training, checkpoints
# --------------------------------------------------------------------------------------------------
def test_every_strategy_learns_digits(out_dir: Path) -> None:
    for rank, result in enumerate(load(out_dir, "digits")):
        assert result["before"] < CHANCE_ACC
        for name in ("local_sgd", "easgd", "lsgd", "grawa"):
            run = result[name]
            assert run["world_size"] == WORLD
            assert run["after"] > LEARNED_ACC, (rank, name, run)
            assert run["consensus"] is not None and run["consensus"] >= 0.0, (rank, name)
            assert run["bytes"] is not None, (rank, name)


@pytest.mark.parametrize("variant", ["local_sgd", "easgd", "lsgd", "grawa"])
def test_checkpoint_holds_the_center_or_average_and_resume_is_exact(out_dir: Path, variant: str) -> None:
    results = [r[variant] for r in load(out_dir, "checkpoint_resume")]
    checkpoint = torch.load(out_dir / f"{variant}.ckpt", weights_only=False)
    center = results[0]["center"]
    for name, saved in checkpoint["state_dict"].items():
        per_rank = [r["first"][name] for r in results]
        if not saved.is_floating_point():
            assert torch.equal(saved, per_rank[0])
        elif variant == "easgd":
            assert torch.equal(saved, center[name]), name  # EASGD's checkpoint is the center model
            assert all(torch.equal(r["center"][name], center[name]) for r in results)  # replicated
        else:
            average = sum(t.double() for t in per_rank) / WORLD
            assert (saved.double() - average).abs().max().item() <= AVERAGE_TOL, name
    assert checkpoint["per_rank_states"]["world_size"] == WORLD
    for rank, result in enumerate(results):
        assert result["steps"] == 12
        for name, tensor in result["straight"].items():
            assert torch.equal(result["resumed"][name], tensor), (rank, name)
    firsts = [r["first"]["net.0.weight"] for r in results]
    assert not all(torch.equal(f, firsts[0]) for f in firsts)  # the ranks' models differ at the checkpoint
