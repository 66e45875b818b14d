"""Generalization gap: train and validation loss and accuracy measured the same way, and their difference.

The ``train/loss`` a module logs is a running mean over an epoch of changing weights, in train mode
(Dropout on, BatchNorm on batch statistics), while ``val/loss`` is measured at the end, in eval mode; their
difference mixes the gap with those effects. This callback evaluates a fixed training subset and the
validation set with the same weights, in the same (eval) mode, with torchmetrics (which also sums over
processes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import (
    MeasuringCallback,
    _first_dataloader,
    resolve_loss_fn,
)
from lightning_optsurvey.curvature.operator import batch_size, model_args

__all__ = ["GeneralizationGap"]


class GeneralizationGap(MeasuringCallback):
    """Log ``train_eval/loss``, ``train_eval/acc``, ``gen_gap/loss`` (val - train), ``gen_gap/acc`` (train - val).

    Both sides are evaluated in eval mode with the current weights: a fixed subset of the training set
    (``num_train_batches`` batches drawn once with ``seed``, or the whole training set) and every batch
    of the trainer's validation loader. Loss is the sample-weighted mean of ``loss_fn``; accuracy is
    torchmetrics' micro ``MulticlassAccuracy`` over the outputs' last dimension.

    Args:
        every_n_epochs: Measure after every n-th epoch (``None``: never at epoch ends).
        num_train_batches: Batches in the training subset (``None``: the whole training set).
        loss_fn: ``loss_fn(outputs, targets)``; default the module's ``loss_fn`` or cross-entropy.
        every_n_steps: Measure after every n-th optimizer step (``None``: never).
        seed: Seed of the training subset.

    Raises:
        ValueError: For a cadence or ``num_train_batches`` that is not a positive integer (or ``None``).
        RuntimeError: At measurement time, if the trainer has no validation loader.
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        num_train_batches: int | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        every_n_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        if num_train_batches is not None and (
            isinstance(num_train_batches, bool) or not isinstance(num_train_batches, int) or num_train_batches < 1
        ):
            raise ValueError(f"num_train_batches must be a positive integer or None, got {num_train_batches!r}")
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
                         num_batches=num_train_batches or 1, seed=seed)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
        self.num_train_batches = num_train_batches
        self.loss_fn = loss_fn

    @override
    def state_key_config(self) -> dict[str, Any]:
        return {**super().state_key_config(), "num_train_batches": self.num_train_batches}

    @override
    def batches_to_draw(self, trainer: Trainer) -> int:
        if self.num_train_batches is not None:
            return self.num_train_batches
        loader = _first_dataloader(trainer.train_dataloader)  # None: train_measurement_batches explains
        if loader is None:
            return 1
        batch_size = loader.batch_size or 1
        return math.ceil(len(loader.dataset) / (batch_size * trainer.world_size))  # type: ignore[arg-type]

    @staticmethod
    def _evaluate(pl_module: LightningModule, loss_fn: Callable, batches: Any) -> tuple[float, float]:
        loss_metric = MeanMetric().to(pl_module.device)
        acc_metric: MulticlassAccuracy | None = None
        with torch.no_grad():
            for batch in batches:
                x, y = move_data_to_device(batch, pl_module.device)
                out = pl_module(*model_args(x))  # several inputs as in the curvature engine
                if acc_metric is None:
                    acc_metric = MulticlassAccuracy(out.shape[-1], average="micro").to(pl_module.device)
                loss_metric.update(loss_fn(out, y).detach(), weight=batch_size((x, y)))
                acc_metric.update(out, y)
        if acc_metric is None:
            raise RuntimeError("the loader yielded no batch")
        return float(loss_metric.compute()), float(acc_metric.compute())

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        val_loader = _first_dataloader(trainer.val_dataloaders)
        if val_loader is None and trainer.datamodule is not None:  # the val loop has not run yet
            val_loader = _first_dataloader(trainer.datamodule.val_dataloader())
        if val_loader is None:
            raise RuntimeError("GeneralizationGap needs a validation DataLoader (trainer.fit(..., val_dataloaders))")
        pl_module.eval()
        loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
        train_loss, train_acc = self._evaluate(pl_module, loss_fn, batches)
        val_loss, val_acc = self._evaluate(pl_module, loss_fn, val_loader)
        return {
            "train_eval/loss": train_loss,
            "train_eval/acc": train_acc,
            "gen_gap/loss": val_loss - train_loss,
            "gen_gap/acc": train_acc - val_acc,
        }
