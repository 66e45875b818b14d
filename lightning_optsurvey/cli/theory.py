"""``optsurvey theory``: the survey's theorems as executable checks, optionally one MLflow run each.

The tracking URI is checked before any check runs; with a tracking server, the runs are logged to the
local outbox and delivered behind (see :mod:`lightning_optsurvey.tracking`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from lightning_optsurvey.cli import _common as common
from lightning_optsurvey.cli._common import CLIError
from lightning_optsurvey.cli.preflight import check_outbox, check_tracking_uri


def add_parser(sub: Any) -> None:
    """Add ``theory`` to the sub-command parsers ``sub``."""
    p = sub.add_parser("theory", help="run the survey's theorems as executable checks")
    p.add_argument("--only", default=None, help="run only the result(s) of these comma-separated names")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic problems (default: 0)")
    p.add_argument("--tracking-uri", default=None, help="also log each check as an MLflow run")
    p.add_argument("--experiment", default="optsurvey-theory")
    common.add_outbox_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the executable theorems; exit code 1 if any fails."""
    from lightning_optsurvey import theory as th
    from lightning_optsurvey.tracking import is_server

    if args.tracking_uri:  # before the checks run, not after
        check_tracking_uri(args.tracking_uri)
        if is_server(args.tracking_uri):
            check_outbox(args.outbox)
    try:
        outcomes = th.run_checks(only=args.only, seed=args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None
    print(th.format_table(outcomes))
    if args.tracking_uri:
        _log(args, outcomes)
    return 0 if all(o.outcome.holds for o in outcomes) else 1


def _log(args: argparse.Namespace, outcomes: Sequence[Any]) -> None:
    from matplotlib import pyplot as plt

    from lightning_optsurvey import theory as th
    from lightning_optsurvey.cli.sync import start_delivery
    from lightning_optsurvey.tracking import deliver_pending, ensure_experiment, log_run

    delivery = start_delivery(args.tracking_uri, args.outbox, args.experiment)
    store = delivery.local_uri if delivery is not None else args.tracking_uri
    try:
        experiment_id = ensure_experiment(store, args.experiment)
    except ValueError as err:
        raise CLIError(str(err)) from None
    for item in outcomes:
        metrics = {"holds": float(item.outcome.holds)}
        for key in ("predicted", "measured"):
            value = getattr(item.outcome, key)
            if isinstance(value, (int, float)):
                metrics[f"theory/{key}"] = float(value)
        figure = th.plot_outcome(item.result, item.outcome)
        run_id = log_run(store, experiment_id, item.result.name, params={"reference": item.result.reference[:250]},
                         metrics=metrics, figures={f"theory/{item.result.name}.png": figure},
                         status="FINISHED" if item.outcome.holds else "FAILED")
        plt.close(figure)
        if delivery is not None:
            delivery.submit(run_id)
    if delivery is not None:
        deliver_pending(delivery, args.sync_wait, args.outbox, args.experiment)
