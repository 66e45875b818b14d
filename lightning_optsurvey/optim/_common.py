"""Small helpers shared by our optimizers and the task module.

Argument checks, closure calls, generator state in ``self.state``, the heavy-ball update, and forward
passes that leave BatchNorm's running statistics alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

_RNG_KEY = "generator"


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> float:
    """Return ``value`` as a float after checking that it lies in the interval named by the bounds.

    Raises:
        ValueError: If ``value`` is not a real number in the interval.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """Return ``value`` after checking that it is an integer ``>= low``.

    Raises:
        ValueError: If it is not.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` after checking that it is a ``bool``.

    Raises:
        ValueError: If it is not.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def require_closure(name: str, closure: Callable[[], Any] | None) -> Callable[[], Any]:
    """Return ``closure`` or raise a ``ValueError`` explaining that ``name`` evaluates it itself."""
    if closure is None or not callable(closure):
        raise ValueError(
            f"{name}.step needs a closure that zeroes the gradients, recomputes the loss and calls backward; "
            f"got {closure!r}. Under Lightning's automatic optimization the closure is passed for you."
        )
    return closure


def call_closure(closure: Callable[[], Any]) -> Any:
    """Evaluate a closure with gradients enabled (``step`` itself runs under ``torch.no_grad``)."""
    with torch.enable_grad():
        return closure()


def params_with_grad(param_groups: list[dict[str, Any]]) -> list[Tensor]:
    """Parameters of all groups whose gradient is not ``None``, in group order."""
    return [p for group in param_groups for p in group["params"] if p.grad is not None]


def heavy_ball(state: dict[Any, Any], p: Tensor, d_p: Tensor, momentum: float) -> Tensor:
    r"""The heavy-ball direction :math:`b \leftarrow m b + d`, kept in ``state[p]["momentum_buffer"]``.

    As ``torch.optim.SGD`` without dampening: the first call starts the buffer at a copy of ``d_p``. With
    ``momentum == 0`` nothing is stored (``state[p]`` is not even created) and ``d_p`` is returned.
    """
    if not momentum:
        return d_p
    param_state = state[p]
    buf = param_state.get("momentum_buffer")
    if buf is None:
        param_state["momentum_buffer"] = buf = d_p.clone()
    else:
        buf.mul_(momentum).add_(d_p)
    return buf


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Run forward passes in train mode without changing any BatchNorm running statistic.

    Batch statistics are still used for normalization, exactly as in a normal training forward. The
    running statistics are not *restored* afterwards but never written: ``track_running_stats`` is switched
    off for the duration, so the buffers are not even touched in place. (Copying saved values back after
    the forward bumps the buffers' autograd version, and the backward of that forward then fails with
    "modified by an inplace operation".)
    """
    switched = [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


class StateGenerator:
    """A ``torch.Generator`` whose state lives in an optimizer's ``state`` (so checkpoints resume exactly).

    ``fetch`` returns a generator on ``device`` positioned where the last ``store`` left it, or seeded with
    ``seed`` on first use; ``store`` writes its position back into ``state``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def fetch(self, state: dict[Any, Any], device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        saved = state.get(_RNG_KEY)
        if saved is None:
            self._generator.manual_seed(self.seed)
        else:
            # Checkpoint loaders may have moved the byte tensor to the parameters' device.
            self._generator.set_state(saved["state"].cpu())
        return self._generator

    def store(self, state: dict[Any, Any]) -> None:
        if self._generator is not None:
            state[_RNG_KEY] = {"state": self._generator.get_state()}
