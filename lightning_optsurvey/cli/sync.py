"""``optsurvey sync``, and the outbox every logging sub-command opens for a tracking server.

With an ``http(s)://`` tracking URI, ``compare``, ``fit`` and ``theory`` log to a local outbox
(``--outbox``) and a :class:`~lightning_optsurvey.tracking.Delivery` thread copies finished runs to the
server; ``optsurvey sync --from OUTBOX --to SERVER`` uploads what an outage left.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lightning_optsurvey.cli._common import CLIError
from lightning_optsurvey.cli.preflight import check_outbox, check_tracking_uri, sqlite_path


def start_delivery(tracking_uri: str, outbox: str, experiment: str) -> Any:
    """For a tracking server: check the outbox, create the experiment there, start delivery; else ``None``."""
    from lightning_optsurvey.tracking import Delivery, ensure_experiment, is_server

    if not is_server(tracking_uri):
        return None
    check_outbox(outbox)
    try:
        ensure_experiment(outbox, experiment)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return Delivery(outbox, tracking_uri, experiment)


def add_parser(sub: Any) -> None:
    """Add ``sync`` to the sub-command parsers ``sub``."""
    p = sub.add_parser("sync", help="deliver runs kept locally during a tracking-server outage",
                       description="Copy every finished run of the local outbox that the server has not "
                                   "received yet (params, tags, metric histories, artifacts, status); a run "
                                   "is never copied twice.")
    p.add_argument("--from", dest="source", required=True, help="the local store, e.g. sqlite:///optsurvey-outbox.db")
    p.add_argument("--to", dest="target", required=True, help="the tracking server, http(s)://HOST:PORT")
    p.add_argument("--experiment", default=None, help="only this experiment's runs (default: all)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``optsurvey sync``: deliver the runs an outage left in the outbox."""
    from lightning_optsurvey.tracking import pending_runs, sync

    check_outbox(args.source)
    if sqlite_path(args.source) and not os.path.isfile(sqlite_path(args.source)):
        raise CLIError(f"no outbox at {args.source}: the file does not exist (a sync would create an empty one "
                       "and report nothing to deliver)")
    check_tracking_uri(args.target)
    try:
        before = len(pending_runs(args.source, args.experiment))
    except ValueError as err:
        raise CLIError(str(err)) from None
    report = sync(args.source, args.target, args.experiment)
    print(f"delivered {len(report.delivered)} of {before} pending run(s) to {args.target}")
    if report.pending:
        print(f"optsurvey sync: error: {len(report.pending)} run(s) still pending ({report.last_error})",
              file=sys.stderr)
        return 1
    return 0
