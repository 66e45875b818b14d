"""Asynchronous EASGD / EAMSGD / LSGD: single-process equivalence, invariants on 3 gloo processes,
checkpoint and resume, a killed worker, and the Straggler callback."""

from __future__ import annotations

import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist.launch import launch, launched, load_ranks
from _support import assert_rejected
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.averaging.center import CenterState
from lightning_optsurvey.callbacks import Straggler
from lightning_optsurvey.strategies import STRATEGY_NAMES, AsyncEASGDStrategy, AsyncLSGDStrategy, EASGDStrategy

WORLD = 3
SLOW_SCENARIOS = ("lsgd", "resume")


# --------------------------------------------------------------------------------------------------
# One process: asynchronous EASGD with one worker is synchronous EASGD
# --------------------------------------------------------------------------------------------------
class _Net(LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 1))
        self.optimizer = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.net(x) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


def _fit(strategy: Any, model: LightningModule, steps: int = 16, callbacks: list | None = None) -> Trainer:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * steps, 3, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks or [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)  # dropout draws from the global generator
        trainer.fit(model, data)
    return trainer


def test_one_worker_is_synchronous_easgd_bitwise() -> None:
    results = []
    for strategy in (EASGDStrategy(rho=0.5, sync_every=3), AsyncEASGDStrategy(rho=0.5, sync_every=3)):
        model = _Net()
        _fit(strategy, model)
        results.append((model.state_dict(), strategy.center_tensors()))
    (sync_model, sync_center), (async_model, async_center) = results
    assert sync_center.keys() == async_center.keys() and len(sync_center) == 8  # 6 parameters + 2 BN buffers
    for key, value in sync_model.items():
        assert torch.equal(value, async_model[key]), key
    for key, value in sync_center.items():
        assert torch.equal(value, async_center[key]), key


def test_eamsgd_sets_nesterov_momentum_and_refuses_other_optimizers() -> None:
    strategy = AsyncEASGDStrategy(rho=0.5, sync_every=2, momentum=0.7)
    model = _Net()
    trainer = _fit(strategy, model, steps=4)
    group = trainer.optimizers[0].param_groups[0]
    assert (group["momentum"], group["nesterov"], group["dampening"]) == (0.7, True, 0.0)
    # Reference: plain SGD with the same Nesterov settings under asynchronous EASGD gives the same run.
    reference = _Net()
    reference.configure_optimizers = lambda: torch.optim.SGD(  # type: ignore[method-assign]
        reference.parameters(), lr=0.1, momentum=0.7, nesterov=True)
    _fit(AsyncEASGDStrategy(rho=0.5, sync_every=2), reference, steps=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    with pytest.raises(TypeError, match="torch.optim.SGD"):
        _fit(AsyncEASGDStrategy(momentum=0.9), _Net("adam"), steps=2)


def test_center_state_rules_without_processes() -> None:
    sizes = [[2, 1]]
    elastic = CenterState([torch.zeros(3)], sizes, world_size=2, record=True)
    moves, staleness, distance = elastic.exchange(1, [torch.tensor([1.0, 2.0, 4.0])], [0.5, 0.25], seq=0)
    assert torch.equal(moves[0], torch.tensor([0.5, 1.0, 1.0])) and torch.equal(elastic.buffers[0], moves[0])
    assert (staleness, distance) == (0, 21.0)
    _, staleness, _ = elastic.exchange(0, [torch.zeros(3)], [0.5, 0.25], seq=0)
    assert staleness == 1  # rank 1 updated the center since rank 0's (nonexistent) previous exchange
    _, staleness, _ = elastic.exchange(1, [torch.zeros(3)], [0.5, 0.25], seq=1)
    assert staleness == 1 and elastic.served == [1, 2] and elastic.history == [(1, 0), (0, 0), (1, 1)]
    leader = CenterState([torch.zeros(3)], sizes, world_size=3, rule="leader")
    moves, _, _ = leader.exchange(0, [torch.ones(3)], [0.5, 0.5], loss=float("nan"))
    assert not moves[0].any() and leader.leader_rank == -1  # nothing reported, no leader yet: no move
    moves, _, _ = leader.exchange(1, [torch.ones(3)], [0.5, 0.5], loss=2.0)
    assert leader.leader_rank == 1 and not moves[0].any() and torch.equal(leader.buffers[0], torch.ones(3))
    moves, _, _ = leader.exchange(2, [torch.full((3,), 3.0)], [0.5, 0.5], loss=5.0)  # worse: pulled halfway
    assert leader.leader_rank == 1 and torch.equal(moves[0], torch.full((3,), 1.0))
    leader.exchange(1, [torch.full((3,), 2.0)], [0.5, 0.5], loss=9.0)  # the leader refreshes even if worse
    assert leader.leader_rank == 1 and leader.leader_loss == 9.0
    assert torch.equal(leader.buffers[0], torch.full((3,), 2.0))
    leader.exchange(2, [torch.full((3,), 3.0)], [0.5, 0.5], loss=5.0)  # now better than the leader's report
    assert leader.leader_rank == 2
    state = leader.state_dict()
    restored = CenterState([torch.zeros(3)], sizes, world_size=3, rule="leader")
    restored.load_state_dict(state)
    assert restored.leader_rank == 2 and torch.equal(restored.buffers[0], torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="rule"):
        elastic.load_state_dict(state)
    with pytest.raises(ValueError, match="rule must be one of 'elastic', 'leader', got 'mean'"):
        CenterState([torch.zeros(3)], sizes, world_size=1, rule="mean")


def test_invalid_arguments() -> None:
    assert_rejected(AsyncEASGDStrategy, "rho", (0, -1.0, float("nan"), float("inf")))
    assert_rejected(AsyncEASGDStrategy, "rho", ("1",), TypeError)
    assert_rejected(AsyncEASGDStrategy, "moving_rate", (0.0, 1.0))
    assert_rejected(AsyncEASGDStrategy, "momentum", (-0.1, 1.0))
    assert_rejected(AsyncEASGDStrategy, "heartbeat_timeout", (0,))
    assert_rejected(AsyncLSGDStrategy, "pull_strength", (1.5,))
    assert_rejected(AsyncLSGDStrategy, "sync_every", (0,))
    assert_rejected(AsyncEASGDStrategy, "find_unused_parameters", (True,), TypeError)
    with pytest.raises(ValueError, match="alpha"):  # alpha = eta rho = 0.1 * 20 >= 1 overshoots the center
        _fit(AsyncEASGDStrategy(rho=20.0), _Net(), steps=2)
    assert {"easgd_async", "eamsgd", "lsgd_async"} <= set(STRATEGY_NAMES)


def test_straggler_sleeps_on_its_ranks_only_and_changes_nothing_else() -> None:
    with pytest.raises(ValueError, match="slowdown"):
        Straggler(slowdown={0: 0.5})
    with pytest.raises(ValueError, match="delays: rank must be an integer >= 0"):
        Straggler(delays={-1: 0.1})
    with pytest.raises(TypeError, match="mapping"):
        Straggler(delays=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        Straggler(random_delays={0: float("inf")})
    # The random part is reproducible and follows its seed, not the global RNG.
    draws = [Straggler(random_delays={1: 0.01}, seed=3).delay_for(1, 0.0) for _ in range(2)]
    assert draws[0] == draws[1] > 0 and Straggler(random_delays={1: 0.01}, seed=4).delay_for(1, 0.0) != draws[0]
    assert Straggler(slowdown={0: 3.0}).delay_for(0, 0.5) == pytest.approx(1.0)
    assert Straggler(slowdown={1: 3.0}, delays={2: 1.0}).delay_for(0, 0.5) == 0.0
    plain, slowed = _Net(), _Net()
    _fit(EASGDStrategy(rho=0.5), plain, steps=4)
    straggler = Straggler(delays={0: 0.05})
    start = time.perf_counter()
    _fit(EASGDStrategy(rho=0.5), slowed, steps=4, callbacks=[straggler])
    assert time.perf_counter() - start >= 4 * 0.05 and straggler.total_delay == pytest.approx(0.2)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, slowed.state_dict()[key]), key


# --------------------------------------------------------------------------------------------------
# Three gloo processes
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launched(tmp_path_factory, "async_scenarios.py", "invariants", procs_per_node=WORLD, timeout=240)


@pytest.fixture(scope="module")
def slow_out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launched(tmp_path_factory, "async_scenarios.py", *SLOW_SCENARIOS, procs_per_node=WORLD, timeout=240)


load = partial(load_ranks, world=WORLD)  # what each rank saved for a scenario


def _served_exactly_once(history: list[tuple[int, int]], exchanges: list[int]) -> None:
    assert sorted(history) == [(r, s) for r in range(WORLD) for s in range(exchanges[r])]


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["equal", "straggler"])
def test_center_is_its_start_plus_the_applied_moves_exactly(out_dir: Path, case: str) -> None:
    ranks = [r[case] for r in load(out_dir, "invariants")]
    exchanges = [r["exchanges"] for r in ranks]
    assert exchanges == [len(r["moves"]) for r in ranks] == [16 // 2] * WORLD  # 16 steps each, tau = 2
    history, served = ranks[0]["history"], ranks[0]["served"]
    _served_exactly_once(history, exchanges)
    assert served == exchanges
    # Replay the moves the workers received, in the order the server applied them: bitwise the center.
    center = [b.clone() for b in ranks[0]["start"]]
    for rank, seq in history:
        for buffer, move in zip(center, ranks[rank]["moves"][seq]):
            buffer.add_(move)
    for replayed, final in zip(center, ranks[0]["end"]):
        assert torch.equal(replayed, final)
    assert not torch.equal(ranks[0]["start"][0], ranks[0]["end"][0])
    for rank in ranks:  # metrics of every exchange: staleness in center updates, distance, bytes
        staleness = [m["async/staleness"] for m in rank["metrics"]]
        assert all(0 <= s <= (WORLD - 1) * exchanges[0] for s in staleness)
        assert all(m["gossip/consensus_distance"] >= 0 for m in rank["metrics"])
        assert rank["bytes"] > 0
    if case == "straggler":
        # The fast ranks saw the center move between their exchanges, and nothing made them wait for the
        # slow one: rank 0 finished its 16 steps well before the last rank (which sleeps 16 x 0.05 s).
        assert max(m["async/staleness"] for m in ranks[0]["metrics"]) >= 1
        lead = ranks[-1]["last_batch_end"] - ranks[0]["last_batch_end"]
        assert lead > 0.5 * 16 * 0.05, lead


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_async_lsgd_serves_once_and_pulls_non_leaders(slow_out_dir: Path) -> None:
    ranks = load(slow_out_dir, "lsgd")
    exchanges = [r["exchanges"] for r in ranks]
    _served_exactly_once(ranks[0]["history"], exchanges)
    leader = ranks[0]["leader"]
    assert leader in range(WORLD)
    moved = [any(bool(m.abs().sum() > 0) for moves in r["moves"] for m in moves) for r in ranks]
    assert any(moved)  # someone was pulled toward a leader


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_checkpoint_holds_the_center_and_resume_continues(slow_out_dir: Path) -> None:
    ranks = load(slow_out_dir, "resume")
    checkpoint = torch.load(ranks[0]["ckpt"], weights_only=False)
    for key, value in ranks[0]["center_after_first"].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key  # the checkpoint's model is the center
    saved = checkpoint["per_rank_states"]["ranks"]
    assert [s["strategy"]["exchanges"] for s in saved] == [r["exchanges_first"] for r in ranks]
    center = saved[0]["strategy"]["center"]
    assert center["served"] == [r["exchanges_first"] for r in ranks]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["start"], center["buffers"]))  # resumed from it
    # The resumed run continues: the counters run on from the checkpoint over a second epoch.
    assert [r["exchanges"] for r in ranks] == [2 * r["exchanges_first"] for r in ranks]
    assert ranks[0]["served"] == [r["exchanges"] for r in ranks]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_killed_worker_ends_the_others_with_a_clear_error(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        launch("async_scenarios.py", tmp_path, "killed", procs_per_node=WORLD, timeout=90)
    message = str(failure.value)
    assert "timed out" not in message, message[-3000:]
    logs = [(tmp_path / f"log_node0_local{r}.txt").read_text() for r in range(WORLD - 1)]
    for log in logs:
        assert f"rank {WORLD - 1} stopped: no heartbeat" in log, log[-2000:]
    assert time.monotonic() - start < 90


def test_easgd_asynchronous_switch_builds_the_async_strategy():
    from lightning_optsurvey.strategies import EASGDStrategy
    from lightning_optsurvey.strategies.easgd_async import AsyncEASGDStrategy

    strategy = EASGDStrategy(0.2, 3, asynchronous=True)
    assert type(strategy) is AsyncEASGDStrategy
    assert (strategy.rho, strategy.sync_every) == (0.2, 3)
    assert type(EASGDStrategy(rho=0.2)) is EASGDStrategy
    with pytest.raises(TypeError, match="asynchronous must be a bool"):
        EASGDStrategy(asynchronous=1)
    with pytest.raises(TypeError, match="beta"):
        EASGDStrategy(asynchronous=True, beta=0.9)
