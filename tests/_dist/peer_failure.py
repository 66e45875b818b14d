"""One rank of the peer-failure scenario: rank 1 dies (killed, or raising) in the middle of training.

Usage: ``python peer_failure.py OUT_DIR kill|raise`` under ``tests/_dist/launch.py``. Rank 0 prints
``SURVIVOR <seconds> <error>`` with its error message and exits with code 3;
``tests/test_peer_failure.py`` checks that the message names rank 1 and that nothing hung.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from typing import Any

import torch
from lightning.pytorch import Trainer
from tiny_regression import TinyRegression
from torch.utils.data import DataLoader, TensorDataset

import lightning_optsurvey  # noqa: F401
from lightning_optsurvey.strategies import LocalSGDStrategy

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
MODE = sys.argv[2]
RANK = int(os.environ["LOCAL_RANK"])


class Model(TinyRegression):
    def __init__(self) -> None:
        super().__init__(in_features=4, lr=0.01)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if RANK == 1 and self.global_step == 3:
            if MODE == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("boom in rank 1's training_step")
        return super().training_step(batch, batch_idx)


trainer = Trainer(accelerator="cpu", devices=2, strategy=LocalSGDStrategy(sync_every=1, timeout=60), max_epochs=1,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
start = time.monotonic()
try:
    trainer.fit(Model(), DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4))
except Exception as error:
    if RANK == 0:
        print(f"SURVIVOR {time.monotonic() - start:.1f} {error}".replace("\n", " | "), flush=True)
        sys.exit(3)
    raise
