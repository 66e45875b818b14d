"""One rank of the refusal scenario: uneven batches plus validation inside the epoch.

Usage: ``python uneven_refusal.py OUT_DIR [half]`` under ``tests/_dist/launch.py`` on 2 ranks. Rank 0 has 3
batches, rank 1 one; ``val_check_interval=1`` validates after every batch, which a rank out of data cannot
take part in. Every rank must stop with the strategy's clear error (printed as ``REFUSED <message>``, exit
code 4) instead of hanging.
"""

from __future__ import annotations

import os
import sys
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
RANK = int(os.environ["LOCAL_RANK"])


class Model(TinyRegression):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch[0]).square().mean(), sync_dist=True)


# "half": 5 and 2 batches with val_check_interval=0.5, so each rank's own loader length puts its mid-epoch
# validation at another step (after batch 2 on rank 0, batch 1 on rank 1), before any rank runs out of data.
HALF = sys.argv[2:] == ["half"]
trainer = Trainer(accelerator="cpu", devices=2, strategy=LocalSGDStrategy(sync_every=1, timeout=60), max_epochs=1,
                  val_check_interval=0.5 if HALF else 1, use_distributed_sampler=False, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0)
batches = (5 if RANK == 0 else 2) if HALF else (3 if RANK == 0 else 1)
train = DataLoader(TensorDataset(torch.randn(2 * batches, 2)), batch_size=2)
try:
    trainer.fit(Model(), train, DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))
except RuntimeError as error:
    print(f"REFUSED {error}".replace("\n", " | "), flush=True)
    sys.exit(4)
