"""The survey's theorems as executable checks.

Each result (:class:`Result`) states its assumptions and rate, predicts a quantity on a synthetic
problem with exactly known constants (:mod:`.problems`), runs the method from the registry on it and
compares: ``result.check(seed) -> CheckOutcome(predicted, measured, holds, details, ...)``.

Example:
    >>> from lightning_optsurvey.theory import get_result
    >>> outcome = get_result("gd_strongly_convex").check()
    >>> outcome.holds
    True

Importing the group modules registers their results; :func:`all_results` lists them in the survey's
order, :func:`run_checks` runs them, :func:`format_table` and :func:`plot_outcome` report them and
:func:`render_docs` writes ``docs/theory.md``. The package imports without Lightning: then the group
that trains through Lightning's Trainer (``networks``) is left out and the others run.
"""

# New groups of results (one module each): add the module's name to this import, one line.
from lightning_optsurvey.theory import (  # noqa: F401  (importing the group modules registers their results)
    adaptive,
    centralized,
    decentralized,
    easgd_async,
    first_order,
    generalization,
    heterogeneous,
    landscape,
    second_order,
    stochastic,
)

try:  # the group that trains networks through Lightning's Trainer
    from lightning_optsurvey.theory import networks  # noqa: F401
except ModuleNotFoundError as error:  # without Lightning the other groups' checks still run
    if (error.name or "").partition(".")[0] not in ("lightning", "lightning_fabric", "pytorch_lightning"):
        raise
from lightning_optsurvey.theory.result import CheckOutcome, Result, all_results, get_result, register_result
from lightning_optsurvey.theory.runner import (
    CheckRun,
    format_table,
    plot_outcome,
    render_docs,
    run_checks,
    select_results,
)

__all__ = [
    "CheckOutcome",
    "CheckRun",
    "Result",
    "all_results",
    "format_table",
    "get_result",
    "plot_outcome",
    "register_result",
    "render_docs",
    "run_checks",
    "select_results",
]
