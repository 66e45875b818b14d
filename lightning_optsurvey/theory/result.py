"""The :class:`Result` type: one theorem of the survey as an executable check.

A result states itself (``statement``: assumptions and rate on one line; ``reference``: paper and
theorem), predicts a quantity on a problem built to satisfy its assumptions (``predict(problem, k)``),
runs the method on that problem and compares (``check(seed) -> CheckOutcome``). ``criterion`` says how
``holds`` is decided (a bound checked at every ``k``, a rate fitted on the tail against the predicted
one, a Monte-Carlo band, ...), with the tolerances as named constants of the module that defines the
result.

Results register themselves with :func:`register_result`; :func:`all_results` builds one instance of
each, with its default configuration, in the order of the survey's list.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, dataclass_transform

from lightning_optsurvey.theory.fields import validate_fields

__all__ = ["CheckOutcome", "Result", "all_results", "get_result", "register_result"]


@dataclass(frozen=True)
class CheckOutcome:
    """What a check found.

    Args:
        predicted: The theorem's number for the summary quantity (``quantity``), e.g. the bound at the
            last step or the predicted rate.
        measured: The measured number for the same quantity.
        holds: Whether the measured behaviour satisfies the theorem under the result's ``criterion``.
        details: One or two sentences: the constants used and the margins found.
        name: The result's name.
        quantity: What ``predicted`` and ``measured`` are (for tables and plot titles).
        steps: The x-axis of the curves (iteration, round, sample size, ...).
        predicted_curve: The prediction at each of ``steps`` (``nan`` where it predicts nothing).
        measured_curve: The measurement at each of ``steps``.
        x_label: Name of the x-axis.
        y_label: Name of the y-axis.
        log_x: Plot the x-axis on a log scale.
        log_y: Plot the y-axis on a log scale.
        extra_curves: Further measured curves over ``steps``, by label (e.g. a second method).
        seconds: Wall-clock time of the check (filled in by :func:`~lightning_optsurvey.theory.run_checks`).
    """

    predicted: float
    measured: float
    holds: bool
    details: str
    name: str = ""
    quantity: str = ""
    steps: tuple[float, ...] = ()
    predicted_curve: tuple[float, ...] = ()
    measured_curve: tuple[float, ...] = ()
    x_label: str = "k"
    y_label: str = ""
    log_x: bool = False
    log_y: bool = True
    extra_curves: dict[str, tuple[float, ...]] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if len(self.predicted_curve) not in (0, len(self.steps)) or len(self.measured_curve) not in (
            0,
            len(self.steps),
        ):
            raise ValueError(
                f"curves must have one value per step: {len(self.steps)} steps, "
                f"{len(self.predicted_curve)} predicted, {len(self.measured_curve)} measured"
            )
        for label, curve in self.extra_curves.items():
            if len(curve) != len(self.steps):
                raise ValueError(f"extra curve {label!r} has {len(curve)} values for {len(self.steps)} steps")
        object.__setattr__(self, "extra_curves", {k: tuple(map(float, v)) for k, v in self.extra_curves.items()})
        object.__setattr__(self, "holds", bool(self.holds))
        object.__setattr__(self, "predicted", float(self.predicted))
        object.__setattr__(self, "measured", float(self.measured))
        for name in ("steps", "predicted_curve", "measured_curve"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))


class Result(abc.ABC):
    """One convergence or generalization result of the survey, checkable on a synthetic problem.

    Subclasses are frozen dataclasses (:func:`register_result` makes a registered one so) whose fields
    are the check's configuration (problem size, steps, step size scale, ...), each declared with its
    constraint (:mod:`~lightning_optsurvey.theory.fields`: ``dim: int = integer(10, low=2)``) and validated
    by this class's one ``__post_init__``; what relates several fields goes in :meth:`validate`. The class
    attributes below describe the theorem. The default configuration satisfies the theorem's assumptions;
    a test changes one field (a step size beyond the allowed range) to show that the check can fail.

    Attributes:
        number: Position in the survey's list (issue 8), used to order tables.
        name: Short identifier (``[a-z0-9_]``), used by ``optsurvey theory --only NAME``.
        statement: Assumptions and rate, one line.
        reference: Paper and theorem or equation.
        criterion: How ``holds`` is decided, with the tolerances.
    """

    number: ClassVar[int]
    name: ClassVar[str]
    statement: ClassVar[str]
    reference: ClassVar[str]
    criterion: ClassVar[str]

    def __post_init__(self) -> None:
        validate_fields(self)
        self.validate()

    def validate(self) -> None:
        """Checks that relate several fields, run after each field's own constraint (none by default).

        Raises:
            ValueError: For a configuration outside the check's assumptions.
        """
        return None

    @abc.abstractmethod
    def problem(self, seed: int = 0) -> Any:
        """Build the synthetic problem (with exactly known constants) that the check runs on."""

    @abc.abstractmethod
    def predict(self, problem: Any, k: int) -> float:
        """The theorem's prediction for ``problem`` at step (round, horizon) ``k``."""

    @abc.abstractmethod
    def check(self, seed: int = 0) -> CheckOutcome:
        """Run the method on ``problem(seed)`` and compare with :meth:`predict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_RESULTS: dict[str, type[Result]] = {}


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def register_result(cls: type[Result]) -> type[Result]:
    """Class decorator making a :class:`Result` subclass a frozen dataclass and adding it to :func:`all_results`.

    A result's fields are its configuration, validated by ``Result.__post_init__``, which only a
    dataclass's ``__init__`` calls: so the registry makes every result a frozen dataclass itself (a class
    already decorated with ``@dataclass(frozen=True)`` is kept as it is) rather than trusting each
    declaration to carry a second decorator.

    Raises:
        TypeError: If ``cls`` is not a ``Result`` subclass.
        ValueError: If its ``name`` is malformed or already taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Result)):
        raise TypeError(f"register_result expects a Result subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not all(c.islower() or c.isdigit() or c == "_" for c in name):
        raise ValueError(f"result name must be lower-case [a-z0-9_], got {name!r}")
    for attribute in ("statement", "reference", "criterion"):
        if not isinstance(getattr(cls, attribute, None), str) or not getattr(cls, attribute):
            raise ValueError(f"result {name!r} needs a non-empty {attribute!r}")
    if name in _RESULTS and _RESULTS[name].__qualname__ != cls.__qualname__:
        raise ValueError(f"result name {name!r} is already registered by {_RESULTS[name].__qualname__}")
    if "__dataclass_fields__" not in cls.__dict__:  # inherited fields alone do not make it a dataclass
        cls = dataclass(frozen=True)(cls)
    _RESULTS[name] = cls
    return cls


def _ensure_loaded() -> None:
    import lightning_optsurvey.theory  # noqa: F401  (the group modules register their results)


def all_results() -> list[Result]:
    """One instance of every registered result, default configuration, ordered by ``number``."""
    _ensure_loaded()
    return [cls() for cls in sorted(_RESULTS.values(), key=lambda c: (c.number, c.name))]


def get_result(name: str) -> Result:
    """The result registered as ``name`` (default configuration).

    Raises:
        ValueError: If no result has that name (the message lists the known ones).
    """
    _ensure_loaded()
    if not isinstance(name, str) or name not in _RESULTS:
        known = ", ".join(r.name for r in all_results())
        raise ValueError(f"unknown result {name!r}; known results: {known}")
    return _RESULTS[name]()
