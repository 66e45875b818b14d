"""A linear regression module small enough for the multi-process failure scenarios.

Imported as ``tiny_regression`` by the rank scripts (``launch`` puts this folder on ``PYTHONPATH``) and as
``_dist.tiny_regression`` by the tests.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn


class TinyRegression(LightningModule):
    """``nn.Linear(in_features, 1)`` trained by SGD to drive its mean squared output to zero."""

    def __init__(self, in_features: int = 2, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, 1)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
