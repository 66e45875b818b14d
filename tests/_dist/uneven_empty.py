"""One rank of the empty-loader scenario: rank 1's sized train loader has length 0 (2 ranks).

Lightning would end the fit of rank 1 at once while rank 0 trains; the strategy refuses on every rank
(printed as ``REFUSED <message>``, exit code 4). Usage: ``python uneven_empty.py OUT_DIR``.
"""

from __future__ import annotations

import os
import sys
import warnings

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
    allow_zero_length_dataloader_with_multiple_devices = True


trainer = Trainer(accelerator="cpu", devices=2, strategy=LocalSGDStrategy(timeout=60), max_epochs=1,
                  use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False)
try:
    trainer.fit(Model(), DataLoader(TensorDataset(torch.randn(0 if RANK else 4, 2)), batch_size=2))
except RuntimeError as error:
    print(f"REFUSED {error}".replace("\n", " | "), flush=True)
    sys.exit(4)
