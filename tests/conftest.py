"""Shared test fixtures: small thread counts and quiet Lightning output."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)
for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture
def quiet_trainer_kwargs() -> dict:
    """Trainer keyword arguments for fast, quiet, CPU-only runs."""
    return {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
    }
