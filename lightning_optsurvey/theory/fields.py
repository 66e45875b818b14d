"""A check's configuration declared as data: dataclass fields that carry their constraint.

Every :class:`~lightning_optsurvey.theory.Result` is a frozen dataclass whose fields are its
configuration. Instead of a ``__post_init__`` per check, each field states its constraint where it is
declared, and one generic validation (``Result.__post_init__``) applies them all, with the package's
argument rule (:mod:`lightning_optsurvey.validation`: wrong type ``TypeError``, out of range or not finite
``ValueError``, messages naming the field, the value and what is allowed)::

    @register_result  # makes the class a frozen dataclass (a base class takes @dataclass(frozen=True))
    class MyCheck(Result):
        dim: int = integer(10, low=2)
        lr: float = positive(0.1)
        radii: tuple[float, ...] = positives((0.01, 0.1), min_length=2)

A field whose default is ``None`` also accepts ``None`` (``lr: float | None = positive(None)``). What
relates several fields (a topology kind that must fit ``world_size``) goes in the check's ``validate()``,
which runs after the fields' own constraints. The constraint is kept in the field's ``metadata["check"]``
as a function ``check(name, value)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

from lightning_optsurvey.validation import check_bool, check_choice, check_float, check_int, check_type

__all__ = ["choice", "flag", "integer", "integers", "positive", "positives", "real", "validate_fields"]

Check = Callable[[str, Any], Any]


def constrained(default: Any, check: Check) -> Any:
    """A dataclass field with ``default`` whose value must pass ``check(name, value)``."""
    return dataclasses.field(default=default, metadata={"check": check})


def integer(default: int | None, *, low: int | None = 1, high: int | None = None) -> Any:
    """An integer in ``[low, high]`` (``None``: unbounded)."""
    return constrained(default, lambda name, value: check_int(name, value, low=low, high=high))


def real(default: float | None, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> Any:
    """A finite real number in the interval (ends closed unless ``low_open``/``high_open``)."""
    return constrained(
        default, lambda name, value: check_float(name, value, low=low, high=high, low_open=low_open,
                                                 high_open=high_open)
    )


def positive(default: float | None) -> Any:
    """A finite real number ``> 0``."""
    return real(default, low=0.0, low_open=True)


def flag(default: bool) -> Any:
    """A ``bool``."""
    return constrained(default, check_bool)


def choice(default: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``."""
    return constrained(default, lambda name, value: check_choice(name, value, choices))


def _sequence(check_item: Check, min_length: int) -> Check:
    def check(name: str, value: Any) -> Any:
        check_type(name, value, (tuple, list), "a tuple")
        if len(value) < min_length:
            raise ValueError(f"{name} must hold at least {min_length} value(s), got {value!r}")
        for i, item in enumerate(value):
            check_item(f"{name}[{i}]", item)
        return value

    return check


def integers(default: Sequence[int], *, low: int = 1, min_length: int = 1) -> Any:
    """A tuple of at least ``min_length`` integers, each ``>= low``."""
    return constrained(default, _sequence(lambda name, value: check_int(name, value, low=low), min_length))


def positives(default: Sequence[float], *, min_length: int = 1) -> Any:
    """A tuple of at least ``min_length`` finite real numbers, each ``> 0``."""
    return constrained(
        default, _sequence(lambda name, value: check_float(name, value, low=0.0, low_open=True), min_length)
    )


def validate_fields(config: Any) -> None:
    """Apply every field's constraint to its value in the dataclass instance ``config``.

    A field without a constraint is not checked; ``None`` passes where the field's default is ``None``.

    Raises:
        TypeError: For a value of the wrong type (from the field's constraint).
        ValueError: For a value out of range (from the field's constraint).
    """
    for field in dataclasses.fields(config):
        check = field.metadata.get("check")
        value = getattr(config, field.name)
        if check is not None and not (value is None and field.default is None):
            check(field.name, value)
