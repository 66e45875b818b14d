"""Peers: a dead rank is named in the survivors' error and nothing hangs; the default timeout is short.

``tests/_dist/peer_failure.py`` trains local SGD on 2 gloo ranks; rank 1 is killed (SIGKILL) or raises
in its 4th training step. Rank 0 must fail within seconds with an error that names rank 1.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from _dist.launch import launch
from _dist.tiny_regression import TinyRegression
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.strategies import EASGDStrategy, GossipStrategy, LocalSGDStrategy, LSGDStrategy
from lightning_optsurvey.strategies._base import DEFAULT_CPU_TIMEOUT

SURVIVOR_SECONDS = 30.0  # gloo reports a closed connection in ~1 s; the check-in waits at most 3 s


def _survivor_line(out: Path, mode: str) -> str:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="failed ranks") as failure:
        launch("peer_failure.py", out, mode, procs_per_node=2, timeout=90)
    assert time.monotonic() - start < 90
    lines = [line for line in str(failure.value).splitlines() if line.startswith("SURVIVOR")]
    assert len(lines) == 1, str(failure.value)[-3000:]
    seconds = float(lines[0].split()[1])
    assert seconds < SURVIVOR_SECONDS, lines[0]
    return lines[0]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_killed_rank_is_named_and_the_survivor_exits(tmp_path: Path) -> None:
    line = _survivor_line(tmp_path, "kill")
    assert re.search(r"rank 1 did not respond within \d+ s \(crashed, killed or frozen\)", line), line


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_raising_rank_is_named_with_its_error(tmp_path: Path) -> None:
    line = _survivor_line(tmp_path, "raise")
    assert "rank 1 failed first with ValueError: boom in rank 1's training_step" in line, line


def test_timeout_argument_and_cpu_default(quiet_trainer_kwargs: dict) -> None:
    assert DEFAULT_CPU_TIMEOUT == timedelta(minutes=5)
    for make in (LocalSGDStrategy, EASGDStrategy, LSGDStrategy, GossipStrategy):
        assert make(timeout=90).timeout == timedelta(seconds=90)
        assert make(timeout=timedelta(minutes=2)).timeout == timedelta(minutes=2)
        for bad in (0, -1.0, float("nan"), float("inf"), timedelta(0)):
            with pytest.raises(ValueError, match="timeout"):
                make(timeout=bad)
        for bad in ("60", True, [60]):
            with pytest.raises(TypeError, match="timeout"):
                make(timeout=bad)
    strategy = LocalSGDStrategy()
    trainer = Trainer(devices=1, strategy=strategy, max_steps=1, **quiet_trainer_kwargs)
    with pytest.warns(UserWarning, match="single process"):
        trainer.fit(TinyRegression(), DataLoader(TensorDataset(torch.zeros(2, 2)), batch_size=2))
    assert strategy.timeout == DEFAULT_CPU_TIMEOUT  # gloo on CPU: 5 minutes, not Lightning's 30
