"""Small helpers shared by our optimizers: argument checks, closure calls, generator state in ``self.state``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

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
