"""What the digits examples share: a small network that logs its metrics, and the digits as tensors.

Not an example itself: ``compare_optimizers.py`` and ``gossip_training.py`` import it (Python puts a
script's own folder on the import path, also in the processes Lightning and torchrun start by running the
script again). Each subclasses :class:`DigitsNet` with its own ``__init__`` (hyperparameters) and
``configure_optimizers``, as you would in your own model.
"""

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


class DigitsNet(L.LightningModule):
    """An MLP on 8x8 digits logging ``train/loss`` and ``{val,test}/{loss,acc}``; no optimizer of its own."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        # Under a multi-process strategy each process logs its own model's loss; sync_dist averages them.
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _evaluate(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")


def shuffled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as float32 inputs in [0, 1] and labels, in one fixed random order."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.as_tensor(x, dtype=torch.float32) / 16.0, torch.as_tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]
