"""One run of ``optsurvey compare`` in its own process.

``python -m lightning_optsurvey.cli.worker RUN.json RESULT.json``:

``RUN.json`` is a :class:`~lightning_optsurvey.cli.compare.RunConfig` written by
:func:`~lightning_optsurvey.cli.compare.write_run_config`; global rank 0 writes ``{"run_id", "seconds"}``
to ``RESULT.json``. Lightning's DDP launcher re-executes this same command line for every other rank.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Train the run of ``RUN.json``; rank 0 writes its result file. The exit code."""
    import lightning_optsurvey  # noqa: F401  (registers the strategy names)
    from lightning_optsurvey.cli.compare import read_run_config, train_one

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m lightning_optsurvey.cli.worker RUN.json RESULT.json", file=sys.stderr)
        return 2
    result = train_one(read_run_config(args[0]))
    if result:  # global rank 0 only
        with open(args[1], "w") as handle:
            json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
