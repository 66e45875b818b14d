"""The survey's theorems as executable checks (work in progress; see :mod:`.result`)."""

from lightning_optsurvey.theory import adaptive, first_order, second_order, stochastic  # noqa: F401
from lightning_optsurvey.theory.result import CheckOutcome, Result, all_results, get_result

__all__ = ["CheckOutcome", "Result", "all_results", "get_result"]
