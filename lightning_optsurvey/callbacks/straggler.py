r"""Straggler: make chosen ranks slower per training step, for experiments with heterogeneous workers.

A research tool. Asynchronous methods (:class:`~lightning_optsurvey.strategies.AsyncEASGDStrategy`,
:class:`~lightning_optsurvey.strategies.AsyncLSGDStrategy`) exist for clusters whose workers run at
different speeds; on one machine, where every rank is equally fast, this callback produces the
difference by sleeping after each training batch:

- ``delays={rank: seconds}``: a fixed extra time per step;
- ``slowdown={rank: factor}``: the step takes ``factor`` times as long as it would, by sleeping
  ``(factor - 1)`` times the measured duration of this batch (forward, backward, optimizer step,
  communication), so "3x slower" holds on a loaded machine as well;
- ``random_delays={rank: mean_seconds}``: an exponentially distributed extra time with that mean, drawn
  from a private generator seeded by ``seed`` and the rank (reproducible, and the training RNG is not
  touched).

The effects add up. Sleeping changes nothing else: parameters, gradients, optimizer state and RNG
states are untouched, so a run with a Straggler computes what the same run without it computes (for
synchronous strategies exactly; asynchronous ones see a different interleaving, which is the point).
The total sleep of this rank is ``total_delay`` (also logged as ``straggler/delay_seconds`` per step
when ``log=True``).

Why our own: neither Lightning nor ``torch.distributed`` can slow a rank down on purpose.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_optsurvey.validation import check_bool, check_float, check_int, check_type

__all__ = ["Straggler"]


def _rank_map(name: str, value: Mapping[int, float] | None, minimum: float) -> dict[int, float]:
    if value is None:
        return {}
    check_type(name, value, Mapping, "a mapping rank -> number")
    out: dict[int, float] = {}
    for rank, amount in value.items():
        check_int(f"{name}: rank", rank, low=0)
        out[rank] = check_float(f"{name}[{rank}]", amount, low=minimum)
    return out


class Straggler(Callback):
    """Sleep after every training batch on chosen ranks (see the module docstring).

    Args:
        delays: ``rank -> extra seconds`` per step.
        slowdown: ``rank -> factor >= 1``: the step takes ``factor`` times its measured duration.
        random_delays: ``rank -> mean`` of an exponentially distributed extra delay per step (seconds).
        seed: Seed of the random delays (combined with the rank).
        log: Log ``straggler/delay_seconds`` (this rank's sleep in the step) with ``pl_module.log``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: For a negative rank or delay, a factor below 1, or a non-finite number.

    Example:
        >>> from lightning_optsurvey.callbacks import Straggler
        >>> straggler = Straggler(slowdown={3: 3.0})  # rank 3 runs three times slower per step
    """

    def __init__(
        self,
        delays: Mapping[int, float] | None = None,
        *,
        slowdown: Mapping[int, float] | None = None,
        random_delays: Mapping[int, float] | None = None,
        seed: int = 0,
        log: bool = False,
    ) -> None:
        self.delays = _rank_map("delays", delays, 0.0)
        self.slowdown = _rank_map("slowdown", slowdown, 1.0)
        self.random_delays = _rank_map("random_delays", random_delays, 0.0)
        check_int("seed", seed, low=None)
        check_bool("log", log)
        self.seed, self.log = seed, log
        self.total_delay = 0.0
        self._start: float | None = None
        self._rng: random.Random | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(delays=self.delays, slowdown=self.slowdown, random_delays=self.random_delays,
                                        seed=self.seed)

    def delay_for(self, rank: int, step_seconds: float) -> float:
        """The sleep after a step of ``step_seconds`` on ``rank`` (draws the random part)."""
        delay = self.delays.get(rank, 0.0) + (self.slowdown.get(rank, 1.0) - 1.0) * max(step_seconds, 0.0)
        mean = self.random_delays.get(rank, 0.0)
        if mean > 0:
            if self._rng is None:
                self._rng = random.Random(self.seed * 1_000_003 + rank)
            delay += self._rng.expovariate(1.0 / mean)
        return delay

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        delay = self.delay_for(trainer.global_rank, elapsed)
        if delay > 0:
            time.sleep(delay)
            self.total_delay += delay
        if self.log:
            pl_module.log("straggler/delay_seconds", delay, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"total_delay": self.total_delay, "rng": None if self._rng is None else self._rng.getstate()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_delay = float(state_dict.get("total_delay", 0.0))
        rng = state_dict.get("rng")
        if rng is not None:
            self._rng = random.Random()
            self._rng.setstate(rng)
