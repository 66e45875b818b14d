"""Measure your own LightningModule with four of our callbacks, logged to MLflow.

    python examples/callbacks_on_your_model.py
    mlflow ui --backend-store-uri sqlite:///mlflow.db      # experiment "callbacks-on-your-model"

Only the callbacks come from lightning-optsurvey; model, data and Trainer are plain Lightning. They measure
between optimizer steps without changing training: a run with them is bitwise identical to one without.
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from sklearn.datasets import load_wine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks import EdgeOfStability, GeneralizationGap, HessianSpectrum, Sharpness


class WineClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05, momentum: float = 0.9):
        super().__init__()
        self.save_hyperparameters()  # MLFlowLogger records lr and momentum as run parameters
        self.net = nn.Sequential(nn.Linear(13, 32), nn.Tanh(), nn.Linear(32, 3))
        # The callbacks differentiate *your* loss: they call `self.loss_fn(self(x), y)` (a batch mean) on a
        # fixed subset of the training set. Without a `loss_fn` attribute they assume plain cross-entropy.
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log_dict({"val/loss": self.loss_fn(logits, y), "val/acc": (logits.argmax(1) == y).float().mean()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def wine_loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    x, y = (torch.as_tensor(a) for a in load_wine(return_X_y=True))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:140], order[140:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = ((x - mean) / std).float()
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size, shuffle=True),
            DataLoader(TensorDataset(x[val], y[val]), batch_size))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--limit-train-batches", type=int, default=None, help="for a quick smoke run")
    args = parser.parse_args()

    L.seed_everything(0)
    callbacks = [
        HessianSpectrum(top_k=3, trace=True),  # hessian/eig_1..3 (Lanczos), hessian/trace (Hutch++)
        Sharpness(kinds=("sam", "average")),  # sharpness/sam, sharpness/average: loss rise around the weights
        GeneralizationGap(),  # gen_gap/loss, gen_gap/acc: train subset and val set, same weights, eval mode
        EdgeOfStability(),  # stability/sharpness_x_lr against stability/threshold (2 + 2 * momentum for SGD)
    ]
    logger = MLFlowLogger(experiment_name="callbacks-on-your-model", tracking_uri=args.tracking_uri)
    trainer = L.Trainer(max_epochs=args.max_epochs, limit_train_batches=args.limit_train_batches,
                        callbacks=callbacks, logger=logger, enable_checkpointing=False)
    trainer.fit(WineClassifier(), *wine_loaders())
    print(f"MLflow run {logger.run_id}; metrics:", ", ".join(sorted(trainer.callback_metrics)))
