"""One rank of the asynchronous-strategy scenarios (asynchronous EASGD / EAMSGD / LSGD, Straggler).

Usage: ``python async_scenarios.py OUT_DIR SCENARIO [SCENARIO ...]`` under ``tests/_dist/launch.py``.
Each scenario saves ``OUT_DIR/<scenario>_rank<r>.pt``; ``tests/test_easgd_async.py`` checks them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import gossip_scenarios as scenarios
import torch
from gossip_scenarios import BATCH, RANK, WORLD, Regression, loader, regression_data, save, state, trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_optsurvey.callbacks import Straggler
from lightning_optsurvey.strategies import AsyncEASGDStrategy, AsyncLSGDStrategy

STRAGGLER_DELAY = 0.05  # seconds per step on the last rank in the "straggler" case


class ExchangeRecorder(Callback):
    """The moves of every exchange of this rank, the center at train start and end (rank 0), metrics."""

    def __init__(self) -> None:
        self.moves: list[list[torch.Tensor]] = []
        self.start: list[torch.Tensor] | None = None
        self.metrics: list[dict[str, float]] = []
        self.last_batch_end = 0.0
        self._seen = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen = trainer.strategy.exchanges
        center = trainer.strategy.center_state
        self.start = None if center is None else center.snapshot()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.last_batch_end = time.time()  # one machine: the ranks share the clock
        strategy = trainer.strategy
        if strategy.exchanges > self._seen:
            self._seen = strategy.exchanges
            self.moves.append([m.clone() for m in strategy.last_moves])
            self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                 if k.startswith(("async/", "gossip/", "comm/"))})


def invariants() -> None:
    """Equal speeds, then one slow rank: the center is its start plus the applied moves, in order."""
    data = regression_data(16 * BATCH * WORLD)
    results: dict[str, Any] = {}
    for name, callbacks in (("equal", []), ("straggler", [Straggler(delays={WORLD - 1: STRAGGLER_DELAY})])):
        torch.manual_seed(0)
        model = Regression(lr=0.05, momentum=0.0)
        strategy = AsyncEASGDStrategy(rho=2.0, sync_every=2, record_history=True, heartbeat_timeout=30.0)
        recorder = ExchangeRecorder()
        trainer(strategy, max_epochs=1, callbacks=[recorder, *callbacks]).fit(model, loader(data))
        # After fit: rank 0 has served every worker's last request (the server stops when all are done).
        served = None if strategy.center_state is None else list(strategy.center_state.served)
        end = None if strategy.center_state is None else strategy.center_state.snapshot()
        results[name] = dict(moves=recorder.moves, start=recorder.start, end=end, history=strategy.history(),
                             exchanges=strategy.exchanges, served=served, metrics=recorder.metrics,
                             model=state(model), bytes=strategy.comm.total_bytes,
                             last_batch_end=recorder.last_batch_end)
    save("invariants", results)


def lsgd() -> None:
    """Asynchronous LSGD: one leader at a time, pulls toward it; every request served once."""
    data = regression_data(16 * BATCH * WORLD)
    torch.manual_seed(0)
    model = Regression(lr=0.05, momentum=0.0)
    strategy = AsyncLSGDStrategy(pull_strength=0.5, sync_every=2, record_history=True, heartbeat_timeout=30.0)
    recorder = ExchangeRecorder()
    trainer(strategy, max_epochs=1, callbacks=[recorder]).fit(model, loader(data))
    served = None if strategy.center_state is None else list(strategy.center_state.served)
    save("lsgd", dict(moves=recorder.moves, history=strategy.history(), exchanges=strategy.exchanges, served=served,
                      leader=strategy.leader))


def resume() -> None:
    """A checkpoint holds the center and every rank's state; the resumed run continues the counters."""
    out = str(scenarios.OUT / "ckpt")
    data = regression_data(8 * BATCH * WORLD)
    torch.manual_seed(0)
    model = Regression(lr=0.05, momentum=0.9)
    first = AsyncEASGDStrategy(rho=1.0, sync_every=2, heartbeat_timeout=30.0)
    checkpoint = ModelCheckpoint(dirpath=out, filename="last", save_top_k=-1, every_n_epochs=1)
    trainer(first, max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(model, loader(data))
    center_after_first = first.center_tensors()
    exchanges_first = first.exchanges
    torch.manual_seed(0)
    resumed_model = Regression(lr=0.05, momentum=0.9)
    second = AsyncEASGDStrategy(rho=1.0, sync_every=2, heartbeat_timeout=30.0)
    recorder = ExchangeRecorder()
    trainer(second, max_epochs=2, callbacks=[recorder]).fit(resumed_model, loader(data), ckpt_path=f"{out}/last.ckpt")
    served = None if second.center_state is None else list(second.center_state.served)
    save("resume", dict(center_after_first=center_after_first, exchanges_first=exchanges_first,
                        exchanges=second.exchanges, served=served, start=recorder.start,
                        first_model=state(model), ckpt=f"{out}/last.ckpt"))


class Kill(Callback):
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if RANK == WORLD - 1 and trainer.global_step == 3:
            os._exit(3)


def killed() -> None:
    """The last rank dies after 3 steps; the others must stop with an error naming it."""
    data = regression_data(400 * BATCH * WORLD)
    torch.manual_seed(0)
    model = Regression(lr=0.01, momentum=0.0)
    strategy = AsyncEASGDStrategy(rho=1.0, sync_every=1, heartbeat_timeout=3.0)
    trainer(strategy, max_epochs=1, callbacks=[Kill(), Straggler(delays={r: 0.01 for r in range(WORLD)})]).fit(
        model, loader(data))


if __name__ == "__main__":
    scenarios.run_scenarios(globals())
