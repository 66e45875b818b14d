"""Shared test fixtures: small thread counts and quiet Lightning output.

``tests/`` mirrors the package (``tests/optim`` tests ``lightning_optsurvey.optim``, ...); pytest imports the
test files in ``importlib`` mode, and the shared helpers (``_support``, ``_zoo``, ``_measures_helpers``,
``_dist``) are importable from every folder because this file puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)
for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

from _support import QUIET_TRAINER  # noqa: E402  (once tests/ is on sys.path and the filters are set)


@pytest.fixture
def quiet_trainer_kwargs() -> dict:
    """Trainer keyword arguments for fast, quiet, CPU-only runs."""
    return {**QUIET_TRAINER, "deterministic": True}
