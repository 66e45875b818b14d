"""``python -m lightning_optsurvey.cli ...`` is ``optsurvey ...``."""

import sys

from lightning_optsurvey.cli import main

sys.exit(main())
