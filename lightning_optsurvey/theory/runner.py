"""Run the checks, tabulate them, plot them, and render ``docs/theory.md`` from the result objects.

``optsurvey theory`` is a thin layer over these functions: :func:`run_checks` (which never raises
because of a failing or crashing check: a crash is an outcome that does not hold), :func:`format_table`
for the terminal, and :func:`plot_outcome` for the figure it logs with each MLflow run.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from matplotlib.figure import Figure

from lightning_optsurvey.theory.result import CheckOutcome, Result, all_results, get_result
from lightning_optsurvey.validation import check_int

__all__ = ["CheckRun", "format_table", "plot_outcome", "render_docs", "run_checks", "select_results"]


@dataclass(frozen=True)
class CheckRun:
    """One result and what its check found.

    Attributes:
        result: The result (its ``name``, ``statement``, ``reference``, ``criterion``).
        outcome: The check's :class:`CheckOutcome` (with ``name`` and ``seconds`` filled in).
    """

    result: Result
    outcome: CheckOutcome

    @property
    def name(self) -> str:
        return self.result.name

    @property
    def holds(self) -> bool:
        return self.outcome.holds


def select_results(only: str | Sequence[str] | None = None) -> list[Result]:
    """The results named by ``only`` (a name, comma-separated names, or a sequence of names; ``None``: all).

    Raises:
        ValueError: For an unknown name (the message lists the known ones) or an empty selection.
        TypeError: If ``only`` is neither ``None``, a string nor a sequence of strings.
    """
    if only is None:
        return all_results()
    if isinstance(only, str):
        names = [n.strip() for n in only.split(",") if n.strip()]
    elif isinstance(only, Sequence) and all(isinstance(n, str) for n in only):
        names = [n.strip() for n in only]
    else:
        raise TypeError(f"only must be None, a name, comma-separated names or a list of names, got {only!r}")
    if not names:
        raise ValueError(f"only selects no result: {only!r}")
    return [get_result(name) for name in names]


def run_checks(only: str | Sequence[str] | None = None, seed: int = 0) -> list[CheckRun]:
    """Run the selected checks, in the survey's order.

    Args:
        only: ``None`` for every result, or names as for :func:`select_results`.
        seed: Seed of every problem and every random draw.

    The checks run with one intra-op thread (restored afterwards): their problems are small enough that
    threads only cost synchronization.

    Returns:
        One :class:`CheckRun` (``result``, ``outcome``) per result, the outcome with ``name`` and
        ``seconds`` filled in. A check that raises yields an outcome with ``holds=False`` and the error in
        ``details``.

    Raises:
        ValueError: For an unknown name in ``only``.
        TypeError: For a non-integer ``seed``.
    """
    check_int("seed", seed, low=None)
    outcomes = []
    threads = torch.get_num_threads()
    # The problems are tiny: intra-op threads only add synchronization, and on a loaded machine OpenMP's
    # spinning threads made a 2 s check take minutes (measured with OMP_NUM_THREADS unset).
    torch.set_num_threads(1)
    try:
        for result in select_results(only):
            start = time.perf_counter()
            try:
                outcome = result.check(seed)
            except Exception as error:  # a crashing check is reported as not holding, never hidden
                last = traceback.extract_tb(error.__traceback__)[-1]
                outcome = CheckOutcome(
                    predicted=math.nan, measured=math.nan, holds=False,
                    details=f"error: {type(error).__name__}: {error} ({last.filename}:{last.lineno})",
                )
            outcome = replace(outcome, name=result.name, seconds=time.perf_counter() - start)
            outcomes.append(CheckRun(result, outcome))
    finally:
        torch.set_num_threads(threads)
    return outcomes


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_table(outcomes: Sequence[CheckRun | CheckOutcome]) -> str:
    """A markdown table: result, reference, quantity, predicted, measured, holds (one row per check).

    Args:
        outcomes: What :func:`run_checks` returned, or bare outcomes (looked up by ``name``).
    """
    lines = [
        "| # | result | reference | quantity | predicted | measured | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    held = 0
    for item in outcomes:
        if isinstance(item, CheckRun):
            result, outcome = item.result, item.outcome
        else:
            outcome = item
            try:
                result = get_result(outcome.name)
            except ValueError:
                result = None
        number, reference = ("", "") if result is None else (str(result.number), result.reference)
        held += outcome.holds
        lines.append(
            f"| {number} | {_cell(outcome.name)} | {_cell(reference)} | {_cell(outcome.quantity)} | "
            f"{_number(outcome.predicted)} | {_number(outcome.measured)} | {'yes' if outcome.holds else 'NO'} |"
        )
    lines.append("")
    lines.append(f"{held}/{len(outcomes)} hold")
    return "\n".join(lines)


_EXTRA_COLORS = ("C1", "C2", "C4", "C5", "C6", "C8", "C9")  # C0 is measured, C3 predicted


def plot_outcome(result: Result, outcome: CheckOutcome) -> Figure:
    """Measured against predicted: the outcome's curves over its ``steps``.

    Built on :class:`matplotlib.figure.Figure` directly (no pyplot state, no backend switch), so it is
    safe in any process; save it with ``fig.savefig(path)`` or log it with ``mlflow.log_figure``.

    Returns:
        The figure (one axes).
    """
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    steps = list(outcome.steps)
    curves = [("measured", outcome.measured_curve, {"color": "C0", "lw": 1.8})]
    curves += [
        (label, values, {"color": _EXTRA_COLORS[i % len(_EXTRA_COLORS)], "lw": 1.2})
        for i, (label, values) in enumerate(outcome.extra_curves.items())
    ]
    curves.append(("predicted", outcome.predicted_curve, {"color": "C3", "ls": "--", "lw": 1.5}))
    # On a log axis, values <= 0 (an exact zero, a consensus reached) are left out of the line.
    log_y = outcome.log_y and any(v > 0 for _, values, _ in curves for v in values if math.isfinite(v))
    for label, values, style in curves:
        if not values:
            continue
        shown = [v if (v > 0 or not log_y) else math.nan for v in values]
        marker = "o" if len(values) <= 12 else None
        axes.plot(steps, shown, label=label, marker=marker, ms=4, **style)
    if outcome.log_x and steps and all(s > 0 for s in steps):
        axes.set_xscale("log")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(outcome.x_label)
    axes.set_ylabel(outcome.y_label or outcome.quantity)
    verdict = "holds" if outcome.holds else "DOES NOT HOLD"
    axes.set_title(f"{result.number}. {result.name}: {verdict}", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    return figure


def render_docs() -> str:
    """The text of ``docs/theory.md``: every result's statement, reference and criterion, from the objects."""
    lines = [
        "# The survey's theorems as executable checks",
        "",
        "<!-- Generated by lightning_optsurvey.theory.render_docs(); tests/theory keeps it in sync. -->",
        "<!-- Regenerate: python -c \"from lightning_optsurvey.theory import render_docs; "
        "print(render_docs(), end='')\" > docs/theory.md -->",
        "",
        "Each result of the survey (Wang & Choromanska 2025, arXiv:2501.14458) is an object of",
        "`lightning_optsurvey.theory` that states itself, predicts, runs the method on a synthetic problem",
        "built to satisfy its assumptions (float64, constants known in closed form), or on a small network",
        "trained through Lightning's `Trainer` on the digits (`lightning_optsurvey.theory.networks`), and compares.",
        "Methods come from the optimizer registry (`create_optimizer`) and from `Topology`'s mixing",
        "matrices; curvature from `HessianOperator` and `lanczos`. Run them with `optsurvey theory`",
        "(`--only NAME` for one) or `lightning_optsurvey.theory.run_checks()`.",
        "",
        "| # | name | statement | reference |",
        "|---|---|---|---|",
    ]
    results = all_results()
    for result in results:
        lines.append(
            f"| {result.number} | `{result.name}` | {_cell(result.statement)} | {_cell(result.reference)} |"
        )
    lines += ["", "## How each check decides that the result holds", ""]
    for result in results:
        lines.append(f"- **{result.number}. `{result.name}`**: {_cell(result.criterion)}.")
    lines.append("")
    return "\n".join(lines)
