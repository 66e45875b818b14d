"""The package's one rule for checking arguments, used by every public constructor and function.

The rule (pytorch-optimizer's shared validators and torch.optim's ``OptimizerInfo`` checks are the models):

- a value of the **wrong type** raises ``TypeError`` naming the parameter, the value and its type;
- a value of the right type that is **out of range or not finite** raises ``ValueError`` naming the
  parameter, the value and the allowed range;
- ``bool`` is never accepted where a number is asked for (``True`` is not a learning rate);
- checks run where the value enters (constructor, pre-flight), never ``assert``.

Every function returns the checked value (converted: ``check_float`` returns a ``float``) so a constructor
reads ``self.lr = check_float("lr", lr, low=0.0, low_open=True)``.

This module imports only ``torch``; the theory package and the optimizers use it without Lightning.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_float",
    "check_float_hparam",
    "check_int",
    "check_lr",
    "check_number",
    "check_optional",
    "check_probability",
    "check_type",
    "describe",
    "is_real",
]


def describe(value: Any) -> str:
    """``repr`` of a value followed by its type name, as every error message of the rule shows it."""
    return f"{value!r} ({type(value).__name__})"


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real Python/NumPy number (``bool`` excluded: ``True`` is not a learning rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """``math.isfinite`` that calls an integer too large for a float (``10**400``) not finite, not an error."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    return f"{left}{low}, {high}{right}"


def check_float(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float after checking that it is a finite real number in the interval.

    ``low``/``high`` bound the interval, closed unless ``low_open``/``high_open`` (an infinite bound is
    always open: a non-finite value is never allowed).

    Raises:
        TypeError: If ``value`` is not a real number (a string, a bool, ``None``, a tensor, ...).
        ValueError: If it is NaN, infinite, or outside the interval.
    """
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {describe(value)} "
                        f"(allowed: {_interval(low, high, low_open, high_open)})")
    interval = _interval(low, high, low_open, high_open)
    if not _finite(value):
        raise ValueError(f"{name} must be a finite number in {interval}, got {reprlib.repr(value)}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> float:
    """Like :func:`check_float`, with a default lower bound of 0 (most hyperparameters are non-negative).

    A tensor is refused with a ``ValueError`` that says to pass a float (a tensor learning rate goes through
    :func:`check_lr`).
    """
    if isinstance(value, Tensor):
        raise ValueError(f"{name} as a Tensor is not supported here; pass a float, got {value!r}")
    return check_float(name, value, low=low, high=high, low_open=low_open, high_open=high_open)


def check_probability(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> float:
    """A float in ``[0, 1]`` (ends open as asked)."""
    return check_float(name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def check_int(name: str, value: Any, *, low: int | None = 1, high: int | None = None) -> int:
    """Return ``value`` after checking that it is an integer in ``[low, high]`` (``None``: unbounded).

    Raises:
        TypeError: If it is not an integer (a float, even integral, a bool, a string, ...).
        ValueError: If it is outside the range.
    """
    if low is not None and high is not None:
        allowed = f"an integer in [{low}, {high}]"
    elif low is not None:
        allowed = f"an integer >= {low}"
    elif high is not None:
        allowed = f"an integer <= {high}"
    else:
        allowed = "an integer"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {describe(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` after checking that it is a ``bool`` (``TypeError`` otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def check_type(name: str, value: Any, types: type | tuple[type, ...], what: str | None = None) -> Any:
    """Return ``value`` after checking ``isinstance(value, types)``; ``what`` describes the allowed types."""
    if not isinstance(value, types):
        if what is None:
            names = types if isinstance(types, tuple) else (types,)
            what = " or ".join(t.__name__ for t in names)
        raise TypeError(f"{name} must be {what}, got {describe(value)}")
    return value


def check_callable(name: str, value: Any, signature: str | None = None) -> Callable[..., Any]:
    """Return ``value`` after checking it is callable.

    ``signature`` (e.g. ``"loss_fn(outputs, targets)"``) is shown in the message.

    Raises:
        TypeError: If it is not callable.
    """
    if not callable(value):
        how = f" as {signature}" if signature else ""
        raise TypeError(f"{name} must be callable{how}, got {describe(value)}")
    return value


def check_generator(generator: Any) -> torch.Generator | None:
    """Return ``generator`` after checking it is a ``torch.Generator`` or ``None`` (a ``TypeError`` otherwise)."""
    return check_type("generator", generator, (torch.Generator, type(None)), "a torch.Generator or None")


def check_real_parameters(who: str, named: Iterable[tuple[str, Tensor]]) -> None:
    """Raise ``ValueError`` naming the complex parameters among ``named`` (``(name, tensor)`` pairs).

    The curvature engine and the measures work on real parameters (a Hessian of a real loss in complex
    weights is not a complex matrix product); a complex model is refused rather than measured wrongly.
    """
    complex_ = [name for name, tensor in named if tensor.is_complex()]
    if complex_:
        raise ValueError(f"{who} works on real parameters; {complex_} are complex. Measure "
                         "torch.view_as_real of them (a real parameter of twice the size) instead")


def check_names(name: str, values: Any, choices: Collection[str]) -> tuple[str, ...]:
    """Return ``values`` as a tuple after checking it is a non-empty sequence of distinct names from ``choices``.

    Raises:
        TypeError: If it is a single string (the message shows how to wrap it), not iterable, or holds a
            non-string.
        ValueError: If it is empty, repeats a name, or holds a name not among ``choices``.
    """
    allowed = tuple(choices)
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of names, got the string {values!r}; wrap it: {name}=({values!r},)")
    if not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of names among {allowed}, got {describe(values)}")
    values = tuple(values)
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"{name} must hold names (strings) among {allowed}, got {describe(value)}")
    unknown = [v for v in values if v not in allowed]
    if unknown or not values or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct names among {allowed}, got {values!r}")
    return values


def check_choice(name: str, value: Any, choices: Collection[T] | Iterable[T]) -> T:
    """Return ``value`` after checking that it is one of ``choices``.

    Raises:
        TypeError: If its type matches none of the choices' types (``algorithm=3`` where names are asked).
        ValueError: If it has the right type but is not one of them.
    """
    options = list(choices)
    if value in options:
        return value
    allowed = ", ".join(repr(c) for c in options)
    if options and not any(isinstance(value, type(c)) for c in options):
        raise TypeError(f"{name} must be one of {allowed}, got {describe(value)}")
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_optional(check: Callable[..., T], name: str, value: Any, **kwargs: Any) -> T | None:
    """``None``, or ``check(name, value, **kwargs)``."""
    return None if value is None else check(name, value, **kwargs)


def check_float_hparam(name: str, value: Any) -> None:
    """The registry-wide check of a float hyperparameter whose range the optimizer itself validates.

    Applied by :func:`~lightning_optsurvey.optim.registry.create_optimizer` to every hyperparameter whose
    default in the factory's signature is a float (or a tuple of floats, such as Adam's ``betas``), for
    torch's, pytorch-optimizer's and our optimizers alike; range checks stay with each optimizer. ``None``
    passes (an optional value: the optimizer decides); a one-element tensor must be finite (torch accepts
    tensor learning rates; an optimizer that does not rejects them itself).

    Raises:
        TypeError: For a value that is not a real number (``lr="0.1"``), or a tuple with such an element.
        ValueError: For a NaN or infinite value (or element), or a tensor of more than one element.
    """
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got {value!r}")
        if value.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value.detach()).all()):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            check_float_hparam(f"{name}[{i}]", item)
        return
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if not _finite(value):
        raise ValueError(f"{name} must be finite, got {reprlib.repr(value)}")


def check_lr(value: Any, name: str = "lr") -> Any:
    """Return a learning rate ``> 0`` after checking it.

    A real number or, as torch's optimizers take, a one-element real tensor (steps read it with
    ``float``); the value itself is returned (a scheduler may update a tensor in place).

    Raises:
        TypeError: If it is neither.
        ValueError: If it is NaN, infinite, not positive, or a tensor of more than one element.
    """
    if isinstance(value, Tensor):
        check_float_hparam(name, value)
        check_number(name, float(value), low_open=True)
        return value
    return check_number(name, value, low_open=True)
