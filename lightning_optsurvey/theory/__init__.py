"""The survey's theorems as executable checks (work in progress; see :mod:`.result`)."""

from lightning_optsurvey.theory import (  # noqa: F401  (importing the group modules registers their results)
    adaptive,
    decentralized,
    first_order,
    generalization,
    second_order,
    stochastic,
)
from lightning_optsurvey.theory.result import CheckOutcome, Result, all_results, get_result

__all__ = ["CheckOutcome", "Result", "all_results", "get_result"]
