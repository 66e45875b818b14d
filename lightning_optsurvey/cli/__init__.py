"""The ``optsurvey`` command: argparse sub-commands, one module each.

- ``compare`` (:mod:`.compare`): trains optimizers (and strategies) on the digits task, or on the user's own
  classes, one MLflow run each, then prints a summary table and the command that opens the MLflow UI.
- ``list`` (:mod:`.listing`): the registered optimizers, strategies and callbacks.
- ``theory`` (:mod:`.theory`): the survey's theorems as executable checks.
- ``sync`` (:mod:`.sync`): uploads the runs a tracking-server outage left in the local outbox.
- ``fit``, ``validate``, ``test`` (:mod:`.fit`): delegated to Lightning's CLI over any ``LightningModule``
  and ``LightningDataModule``.

Checks that create nothing run first (:mod:`.preflight`); a user error is one line ``optsurvey CMD: error:
...`` and exit code 2. The package never imports ``mlflow`` itself: :mod:`lightning_optsurvey.tracking` is the
one module that does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_optsurvey.cli import compare, fit, listing, sync, theory
from lightning_optsurvey.cli._common import CLIError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``optsurvey`` parser: one sub-command per module."""
    parser = argparse.ArgumentParser(prog="optsurvey", description="Optimization methods of the survey, "
                                     "trained and measured with Lightning, recorded in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compare,list,theory,sync,fit,validate,test}")
    compare.add_parser(sub)
    listing.add_parser(sub)
    theory.add_parser(sub)
    sync.add_parser(sub)
    fit.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optsurvey`` console script; returns the exit code."""
    import lightning_optsurvey  # noqa: F401  (registers the strategy names)

    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args_list or args_list[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args_list else 2
    if args_list[0] in fit.COMMANDS:  # Lightning's CLI parses the rest, in order
        return fit.run(args_list)
    args = parser.parse_args(args_list)
    try:
        return args.handler(args)
    except CLIError as err:
        print(f"optsurvey {args.command}: error: {err}", file=sys.stderr)
        return 2
