"""Uneven per-rank data never hangs: every strategy of ours equals a dense replay of the same schedule.

``tests/_dist/uneven_scenarios.py`` trains a float64 least-squares model on 2 or 3 gloo ranks whose
numbers of batches differ per epoch (a rank with none in an epoch included), with per-step and
per-epoch ``sync_dist`` logging and end-of-epoch validation. Here the same schedule is replayed in one
process with the documented semantics: ranks out of data take part in every round with weight 0
unless they have steps not yet communicated, and the step schedule follows the busiest rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist.launch import launch
from _dist.uneven_scenarios import BATCH, COUNTS, LR, START, batch, val_data

from lightning_optsurvey.strategies import Topology
from lightning_optsurvey.strategies.lsgd import grawa_weights, select_leader

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

TOL = 1e-12  # float64, a few dozen operations on O(1) numbers, in another summation order
DEFAULT = ("local_sgd", "easgd")
MORE = ("gossip", "lsgd", "grawa")
H_LOCAL_SGD, PULL = 2, 0.5


def _run(tmp_path_factory: pytest.TempPathFactory, world: int, names: tuple[str, ...]) -> Path:
    out = tmp_path_factory.mktemp(f"uneven{world}")
    launch("uneven_scenarios.py", out, *names, procs_per_node=world, timeout=360)
    return out


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory, 3, DEFAULT)


@pytest.fixture(scope="module")
def three_ranks_more(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory, 3, MORE)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory, 2, DEFAULT + MORE)


def _loss_and_grad(w: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, torch.Tensor]:
    x, y = data
    residual = x @ w - y
    return float(0.5 * residual.square().mean()), x.T @ residual / len(y)


def replay(name: str, world: int) -> dict[str, Any]:
    """The uneven schedule of ``COUNTS[world]`` in one process, with the documented semantics."""
    models = [torch.tensor(START, dtype=torch.float64) for _ in range(world)]
    center = torch.tensor(START, dtype=torch.float64)
    unsent = [False] * world
    loss_sum, loss_count = [0.0] * world, [0] * world
    last_grad = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
    mixing = Topology("ring", world).mixing_matrix(0).to(torch.float64)
    alpha = 0.9 / world  # EASGD's default: beta = N alpha = 0.9
    steps = 0
    epoch_losses: list[list[float]] = []
    for epoch, counts in enumerate(COUNTS[world]):
        losses = []
        for t in range(max(counts)):
            pre = [m.clone() for m in models]
            for r in range(world):
                if counts[r] > t:
                    loss, grad = _loss_and_grad(models[r], batch(r, epoch, t))
                    losses.append(loss)
                    loss_sum[r] += loss
                    loss_count[r] += 1
                    last_grad[r] = grad
                    models[r] = models[r] - LR * grad
                    unsent[r] = True
            every = H_LOCAL_SGD if name == "local_sgd" else 1
            steps += 1
            if steps % every:
                continue
            weights = [1.0 if u else 0.0 for u in unsent]
            if name == "local_sgd":
                average = sum(w * m for w, m in zip(weights, models)) / sum(weights)
                models = [average.clone() for _ in range(world)]
            elif name == "easgd":
                total = torch.zeros(3, dtype=torch.float64)
                for r in range(world):
                    if weights[r]:
                        diff = (pre[r] if counts[r] > t else models[r]) - center
                        models[r] = models[r] - alpha * diff
                        total += alpha * diff
                center = center + total
            elif name == "gossip":
                models = [sum(mixing[i, j] * models[j] for j in range(world)) for i in range(world)]
            elif name == "lsgd":
                means = torch.tensor([s / c if c else math.inf for s, c in zip(loss_sum, loss_count)])
                leader = select_leader(means)
                target = models[leader].clone()
                models = [m if r == leader else m - PULL * (m - target) for r, m in enumerate(models)]
                loss_sum, loss_count = [0.0] * world, [0] * world
            elif name == "grawa":
                norms = torch.tensor([float(g.norm()) if w else math.inf for g, w in zip(last_grad, weights)],
                                     dtype=torch.float64)
                shares = grawa_weights(norms)
                target = sum(s * m for s, m in zip(shares, models))
                models = [m - PULL * (m - target) for m in models]
            unsent = [False] * world
        epoch_losses.append(losses)
    run_model = center if name == "easgd" else sum(models) / world
    return {"models": models, "run_model": run_model, "train_loss_epoch": sum(epoch_losses[-1]) / len(
        epoch_losses[-1])}


def _check(out: Path, name: str, world: int) -> None:
    results = [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(world)]
    expected = replay(name, world)
    per_epoch = [list(epoch) for epoch in COUNTS[world]]
    val_x, val_y = val_data().tensors
    val_loss = float(0.5 * (val_x @ expected["run_model"] - val_y).square().mean())
    for rank, result in enumerate(results):
        assert torch.allclose(result["w"], expected["models"][rank], rtol=0, atol=TOL), (name, rank)
        assert torch.allclose(result["run_model"], expected["run_model"], rtol=0, atol=TOL), (name, rank)
        if name == "easgd":
            assert torch.equal(result["center"], result["run_model"])
        # The strategy reports every rank's batches of each epoch (also logged as data/batches_rank_<r>).
        assert result["batches"] == per_epoch
        # Validation evaluates the run's model on every rank (the zero-batch rank too); the epoch-level
        # training loss averages the batches that were run, over all ranks.
        assert result["final"]["val/loss"] == pytest.approx(val_loss, rel=TOL)
        assert result["final"]["train/loss_epoch"] == pytest.approx(expected["train_loss_epoch"], rel=TOL)
        assert len(result["metrics"]) == len(per_epoch)
    assert any(0 in epoch for epoch in per_epoch)  # the schedule has a rank without batches
    assert BATCH == 2


@pytest.mark.parametrize("name", DEFAULT)
def test_uneven_three_ranks_equal_the_dense_replay(three_ranks: Path, name: str) -> None:
    _check(three_ranks, name, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", MORE)
def test_uneven_three_ranks_leader_methods(three_ranks_more: Path, name: str) -> None:
    _check(three_ranks_more, name, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFAULT + MORE)
def test_uneven_two_ranks_equal_the_dense_replay(two_ranks: Path, name: str) -> None:
    _check(two_ranks, name, 2)


@pytest.mark.slow
def test_mid_epoch_validation_with_uneven_batches_stops_every_rank_clearly(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="failed ranks") as failure:
        launch("uneven_refusal.py", tmp_path, procs_per_node=2, timeout=120)
    text = str(failure.value)
    assert "timed out" not in text
    refused = [line for line in text.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 2, text[-3000:]  # every rank, not only the one that noticed
    for line in refused:
        assert "different numbers of training batches" in line and "validation inside the epoch" in line


def test_mid_epoch_validation_at_different_steps_is_refused_at_the_first_step(tmp_path: Path) -> None:
    """val_check_interval=0.5 of 5 and of 2 batches: the ranks would validate at different steps (a gloo
    collective mismatch, which aborted the processes) before either ran out of data."""
    with pytest.raises(AssertionError, match="failed ranks") as failure:
        launch("uneven_refusal.py", tmp_path, "half", procs_per_node=2, timeout=120)
    text = str(failure.value)
    refused = [line for line in text.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 2, text[-3000:]
    for line in refused:
        assert "different numbers of training batches this epoch ([5, 2])" in line
        assert "validation inside the epoch" in line


@pytest.mark.slow
def test_empty_sized_loader_on_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="failed ranks") as failure:
        launch("uneven_empty.py", tmp_path, procs_per_node=2, timeout=120)
    text = str(failure.value)
    refused = [line for line in text.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 2 and all("rank(s) [1] has length 0" in line for line in refused), text[-3000:]
