"""``optsurvey list``: the registered optimizers, strategies and callbacks."""

from __future__ import annotations

import argparse
from typing import Any

from lightning_optsurvey.cli._common import format_table

#: Callbacks that change how training runs rather than measure it.
TRAINING_LOOP_CALLBACKS = ("OptimizerLoopAdapter", "SVRGSnapshot", "SWA", "ResumeRNG")


def add_parser(sub: Any) -> None:
    """Add ``list`` to the sub-command parsers ``sub``."""
    p = sub.add_parser("list", help="print the registered optimizers, strategies and callbacks")
    p.add_argument("--markdown", action="store_true", help="print the optimizer table of the README")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print the registered optimizers, strategies and callbacks."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_optsurvey import callbacks as cb
    from lightning_optsurvey import strategies as st
    from lightning_optsurvey.callbacks.swa import REFERENCE
    from lightning_optsurvey.optim import available_optimizers, get_spec, methods_markdown

    if args.markdown:
        print(methods_markdown())
        return 0
    rows = [{"name": n, "family": get_spec(n).family, "reference": get_spec(n).reference}
            for n in available_optimizers()]
    print("Optimizers\n" + format_table(rows, ["name", "family", "reference"]))
    # SWA averages any of them, so it is a callback and not a registry entry; listed beside them.
    print(f"+ weight averaging (landscape), with any optimizer above: swa, {REFERENCE} "
          "(callbacks.SWA; `optsurvey compare --swa`)")
    ours = sorted(getattr(st, "STRATEGY_NAMES", ()))
    others = sorted(set(StrategyRegistry.available_strategies()) - set(ours))
    print("\nStrategies (ours): " + (", ".join(ours) or "none"))
    print("Strategies (Lightning): " + ", ".join(others))
    measuring = sorted(n for n in cb.__all__ if isinstance(getattr(cb, n), type) and n not in TRAINING_LOOP_CALLBACKS
                       and issubclass(getattr(cb, n), Callback) and getattr(cb, n) is not cb.MeasuringCallback)
    print("\nCallbacks: " + ", ".join(measuring))
    print("Training-loop callbacks: OptimizerLoopAdapter, SVRGSnapshot, ResumeRNG")
    return 0
