"""What the sub-commands share: the user-error type, argparse value types, the summary table."""

from __future__ import annotations

import argparse
import ast
import math
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class CLIError(Exception):
    """A user error found before any work starts; ``main`` prints it as one line and exits 2."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated seeds in NumPy's seed range."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if any(not 0 <= v < 2**32 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be in [0, 2**32) (NumPy's seed range), got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def hparam(text: str) -> tuple[str, str, Any]:
    """Parse ``OPTIMIZER.KEY=VALUE`` (VALUE as a Python literal, else a string)."""
    head, sep, raw = text.partition("=")
    name, dot, key = head.partition(".")
    if not sep or not dot or not name or not key:
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER.KEY=VALUE (e.g. adam.lr=0.003), got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:  # nan, inf, -inf: numbers (that the finite check then refuses), not strings
            value = float(raw)
        except ValueError:
            value = raw
    return name.strip(), key.strip(), value


def limit_batches(text: str) -> float | int:
    """``--limit-train-batches``: a fraction in (0, 1] or a whole number of batches >= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1] or a number of batches, got {text!r}") from None
    if not math.isfinite(value) or value <= 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1] or a whole number of batches >= 1, got {text!r}")
    return int(value) if value > 1 else value


def seconds(text: str) -> float:
    """A positive, finite number of seconds (``--timeout``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def wait_seconds(text: str) -> float:
    """A non-negative, finite number of seconds (``--sync-wait``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a non-negative, finite number of seconds, got {text!r}")
    return value


def add_outbox_arguments(parser: argparse.ArgumentParser) -> None:
    """``--outbox`` and ``--sync-wait``: where runs wait for a tracking server, and for how long at the end."""
    from lightning_optsurvey.tracking import DEFAULT_OUTBOX

    parser.add_argument("--outbox", default=DEFAULT_OUTBOX,
                        help="with an http(s) tracking URI: the local store runs are logged to first and "
                             "delivered from, so an outage loses nothing and stalls nothing "
                             f"(default: {DEFAULT_OUTBOX})")
    parser.add_argument("--sync-wait", type=wait_seconds, default=120.0,
                        help="seconds to wait at the end for a server that is away (default: 120)")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) + " |" for r in rows]
    return "\n".join(lines)
