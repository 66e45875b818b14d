"""Generalization gap: train and validation loss and accuracy measured the same way, and their difference.

The ``train/loss`` a module logs is a running mean over an epoch of changing weights, in train mode
(Dropout on, BatchNorm on batch statistics), while ``val/loss`` is measured at the end, in eval mode; their
difference mixes the gap with those effects. This callback evaluates a fixed training subset and the
validation set with the same weights, in the same (eval) mode, with torchmetrics (which also sums over
processes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import (
    MeasuringCallback,
    _first_dataloader,
    check_loss_fn,
    draw_batches,
    loader_rng_preserved,
    resolve_loss_fn,
)
from lightning_optsurvey.curvature.objective import BatchLoss, ModuleLoss, PairLoss, as_batch_loss, model_args
from lightning_optsurvey.validation import check_float, check_int, check_optional

__all__ = ["GeneralizationGap"]


def _ignore_index(loss_fn: Any) -> int:
    """The target value the loss skips, which accuracy skips too.

    ``nn.CrossEntropyLoss(ignore_index=...)``'s, or a ``functools.partial``'s keyword
    (``partial(F.cross_entropy, ignore_index=0)``), else -100, torch's default.
    """
    found = getattr(loss_fn, "ignore_index", None)
    if found is None and isinstance(loss_fn, functools.partial):
        found = loss_fn.keywords.get("ignore_index")
    return -100 if found is None else int(found)


class GeneralizationGap(MeasuringCallback):
    r"""Log ``train_eval/loss``, ``train_eval/acc``, ``gen_gap/loss`` (val - train), ``gen_gap/acc`` (train - val).

    Both sides are evaluated in eval mode with the current weights: a fixed subset of the training set
    (``num_train_batches`` batches drawn once with ``seed``, or the whole training set) and every batch
    of the trainer's validation loader. Loss is the sample-weighted mean of the measured loss (the
    module's ``compute_loss(batch)`` if it defines one, any batch structure; else ``loss_fn`` on
    ``(inputs, targets)``). Accuracy is torchmetrics' micro ``MulticlassAccuracy`` whenever the batches are
    ``(inputs, targets)`` pairs and ``model(inputs)`` gives class scores for integer targets: over the last
    dimension (``(B, C)`` for ``(B,)``; token-level ``(B, T, V)`` for ``(B, T)``) or over dimension 1 as
    ``F.cross_entropy`` takes them; targets equal to the loss's ``ignore_index`` (-100 by default, e.g.
    padding) are left out. Otherwise (dict batches, regression targets) only the loss is logged and a
    warning says once why there is no accuracy.

    Neither side need be a whole set: ``stderr`` sizes a random subset of each (drawn once with ``seed``,
    kept on the module's device) so that the standard error of its accuracy is at most that bound whatever
    the accuracy (:math:`\sqrt{p(1-p)/n} \le 1/(2\sqrt n)`, so :math:`n = \lceil 1/(4\,\mathrm{se}^2) \rceil`
    samples over all ranks, rounded up to whole batches, at most the whole set; 400 samples for 0.025).
    The validation subset is drawn from the validation loader's dataset with its batch size and collate
    function (its loader is not iterated then), so its samples are fixed across measurements.

    Args:
        every_n_epochs: Measure after every n-th epoch (``None``: never at epoch ends).
        num_train_batches: Batches in the training subset (``None``: the whole training set, or as
            ``stderr`` says).
        loss_fn: ``loss_fn(outputs, targets)`` or a ``BatchLoss``; default: the module's ``compute_loss(batch)``
            if it defines one (any batch structure), else its ``loss_fn`` or cross-entropy (``resolve_loss_fn``).
        every_n_steps: Measure after every n-th optimizer step (``None``: never).
        seed: Seed of the training subset.
        stderr: Size the training and validation subsets for this standard error of their accuracies (in
            (0, 0.5]); ``None``: the whole validation set, and the training side as ``num_train_batches``
            says. Not both.
        at_fit_end: Also measure once when training ends.

    Raises:
        TypeError: For an argument of the wrong type.
        ValueError: For a cadence or ``num_train_batches`` that is not a positive integer (or ``None``), a
            ``stderr`` out of range, or both ``num_train_batches`` and ``stderr``.
        RuntimeError: At measurement time, if the trainer has no validation loader.
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        num_train_batches: int | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        every_n_steps: int | None = None,
        seed: int = 0,
        *,
        stderr: float | None = None,
        at_fit_end: bool = False,
    ) -> None:
        check_optional(check_int, "num_train_batches", num_train_batches)
        check_optional(check_float, "stderr", stderr, low=0.0, high=0.5, low_open=True)
        if num_train_batches is not None and stderr is not None:
            raise ValueError(f"give num_train_batches or stderr, not both (got {num_train_batches!r} and "
                             f"{stderr!r})")
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
                         num_batches=num_train_batches or 1, seed=seed, at_fit_end=at_fit_end)
        self.num_train_batches = num_train_batches
        self.stderr = stderr
        self._val_batches: list[Any] | None = None
        self.loss_fn = check_loss_fn(loss_fn)
        self._warned = False

    @override
    def state_key_config(self) -> dict[str, Any]:
        config = {**super().state_key_config(), "num_train_batches": self.num_train_batches}
        if self.stderr is not None:
            config["stderr"] = self.stderr
        return config

    @override
    def batches_to_draw(self, trainer: Trainer) -> int:
        if self.num_train_batches is not None:
            return self.num_train_batches
        loader = _first_dataloader(trainer.train_dataloader)  # None: train_measurement_batches explains
        if loader is None:
            return 1
        return self._subset_batches(loader, trainer.world_size)

    def _subset_batches(self, loader: DataLoader, world_size: int) -> int:
        """Batches per rank of ``loader``'s dataset: all of them, or as many as ``stderr`` asks."""
        batch_size = loader.batch_size or 1
        whole = math.ceil(len(loader.dataset) / (batch_size * world_size))  # type: ignore[arg-type]
        if self.stderr is None:
            return whole
        samples = math.ceil(1.0 / (4.0 * self.stderr**2))
        return min(whole, math.ceil(samples / (batch_size * world_size)))

    def _validation_batches(self, trainer: Trainer, loader: DataLoader, device: torch.device) -> Any:
        """The validation side: ``loader`` itself, or with ``stderr`` a fixed subset of its dataset."""
        if self.stderr is None:
            return loader
        if self._val_batches is None:
            count = self._subset_batches(loader, trainer.world_size) if hasattr(loader.dataset, "__len__") else \
                math.ceil(math.ceil(1.0 / (4.0 * self.stderr**2)) / ((loader.batch_size or 1) * trainer.world_size))
            self._val_batches = draw_batches(
                loader.dataset, count, loader.batch_size or 1, generator=torch.Generator().manual_seed(self.seed + 1),
                collate_fn=loader.collate_fn, rank=trainer.global_rank, world_size=trainer.world_size, device=device)
        return self._val_batches

    def _class_scores(self, out: Any, targets: Any) -> tuple[Tensor, Tensor] | str:
        """``(scores (N, C), labels (N,))`` when ``out`` holds class scores for ``targets``, else why not.

        Scores over the last dimension (``(B, C)`` for ``(B,)``, ``(B, T, V)`` for ``(B, T)`` tokens), or
        over dimension 1 as ``F.cross_entropy`` takes them (``(B, C, T)`` for ``(B, T)``).
        """
        if not isinstance(out, Tensor) or not out.is_floating_point():
            return f"the outputs are {type(out).__name__}, not a floating-point tensor of class scores"
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
            kind = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
            return f"the targets are {kind}, not integer class labels"
        if out.ndim == targets.ndim + 1 and out.shape[:-1] == targets.shape:
            return out.reshape(-1, out.shape[-1]), targets.reshape(-1)
        if out.ndim == targets.ndim + 1 and out.ndim >= 3 and out.shape[0] == targets.shape[0] \
                and out.shape[2:] == targets.shape[1:]:
            scores = out.movedim(1, -1)
            return scores.reshape(-1, scores.shape[-1]), targets.reshape(-1)
        return (f"outputs of shape {tuple(out.shape)} are not class scores for targets of shape "
                f"{tuple(targets.shape)} (over the last dimension or dimension 1)")

    def _evaluate(
        self, pl_module: LightningModule, loss: Callable | BatchLoss, batches: Any
    ) -> tuple[float, float | None]:
        objective = as_batch_loss(loss)
        device = pl_module.device
        # Per-batch values are collected and handed to torchmetrics once (one update each): its per-call
        # overhead was as large as the forward passes of a small model. Predictions are kept as class
        # indices (argmax, as torchmetrics takes scores), never as scores, so a large vocabulary costs nothing.
        losses: list[Tensor] = []
        weights: list[int] = []
        predictions: list[Tensor] = []
        targets: list[Tensor] = []
        num_classes = 0
        reason: str | None = None
        ignore_index = _ignore_index(getattr(objective, "loss_fn", None))
        with torch.no_grad():
            for batch in batches:
                batch = move_data_to_device(batch, device)
                out: Any = None
                if isinstance(objective, PairLoss):
                    x, y = batch
                    out = pl_module(*model_args(x))  # several inputs as in the curvature engine
                    loss = objective.loss_fn(out, y)
                else:
                    pair = isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[1], Tensor)
                    loss, out = self._loss_and_outputs(pl_module, objective, batch, pair)
                    if pair:
                        x, y = batch
                        if out is None:
                            out = pl_module(*model_args(x))
                    else:
                        reason = (f"its batches are {type(batch).__name__}s, not (inputs, targets) pairs, and "
                                  f"{objective!r} gives only the loss")
                losses.append(loss.detach().reshape(()))
                weights.append(objective.size(pl_module, batch))
                if out is not None and reason is None:
                    found = self._class_scores(out, y)
                    if isinstance(found, str):
                        reason = found
                        continue
                    scores, labels = found
                    num_classes = max(num_classes, scores.shape[-1])
                    predictions.append(scores.argmax(dim=-1))
                    targets.append(labels)
        if not losses:
            raise RuntimeError("the loader yielded no batch")
        loss_metric = MeanMetric().to(device)
        loss_metric.update(torch.stack(losses), weight=torch.tensor(weights, dtype=losses[0].dtype, device=device))
        acc_metric: MulticlassAccuracy | None = None
        if predictions and reason is None:
            acc_metric = MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index,
                                            validate_args=False).to(device)
            acc_metric.update(torch.cat(predictions), torch.cat(targets))
        if reason is not None:
            if not self._warned:
                self._warned = True
                rank_zero_warn(f"GeneralizationGap logs no accuracy for {type(pl_module).__name__}: {reason}. "
                               "It logs train_eval/loss and gen_gap/loss.")
            return float(loss_metric.compute()), None
        return float(loss_metric.compute()), None if acc_metric is None else float(acc_metric.compute())

    @staticmethod
    def _loss_and_outputs(pl_module: LightningModule, objective: BatchLoss, batch: Any,
                          pair: bool) -> tuple[Tensor, Any]:
        """The batch's loss, and the module's outputs on its inputs when ``compute_loss`` computed them.

        ``compute_loss`` runs the forward itself; when it calls ``self(inputs)`` exactly once on the batch's
        inputs, a forward hook keeps those outputs, so accuracy needs no second forward pass.
        """
        if not (pair and isinstance(objective, ModuleLoss)):
            return objective(pl_module, {}, batch), None
        inputs = model_args(batch[0])
        seen: list[Any] = []
        handle = pl_module.register_forward_hook(
            lambda _m, args, out: seen.append(out if len(args) == len(inputs)
                                              and all(a is b for a, b in zip(args, inputs)) else None))
        try:
            loss = getattr(pl_module, objective.method)(batch)
        finally:
            handle.remove()
        return loss, seen[0] if len(seen) == 1 else None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if is_overridden("validation_step", pl_module) or self._own_val_dataloader(trainer, pl_module) is not None:
            return
        raise ValueError(
            f"GeneralizationGap compares the training loss with the validation loss, but "
            f"{type(pl_module).__name__} has no validation_step, so Lightning runs no validation and drops the "
            "val_dataloaders given to fit; define validation_step (it may just log the loss), or give the "
            "validation data as val_dataloader() of the module or its data module"
        )

    @staticmethod
    def _own_val_dataloader(trainer: Trainer, pl_module: LightningModule) -> Callable[[], Any] | None:
        """``val_dataloader`` of the data module or the module, when one defines it."""
        datamodule = trainer.datamodule
        if datamodule is not None and is_overridden("val_dataloader", datamodule):
            return datamodule.val_dataloader
        return pl_module.val_dataloader if is_overridden("val_dataloader", pl_module) else None

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        val_loader = _first_dataloader(trainer.val_dataloaders)
        own = self._own_val_dataloader(trainer, pl_module)
        if val_loader is None and own is not None:  # the val loop has not run yet, or does not run
            val_loader = _first_dataloader(own())
        if val_loader is None:
            raise RuntimeError("GeneralizationGap needs a validation DataLoader: pass val_dataloaders to fit, or "
                               "define val_dataloader() on the module or its data module")
        pl_module.eval()
        objective = as_batch_loss(resolve_loss_fn(pl_module, self.loss_fn))
        train_loss, train_acc = self._evaluate(pl_module, objective, batches)
        with loader_rng_preserved(val_loader):
            val_loss, val_acc = self._evaluate(pl_module, objective,
                                               self._validation_batches(trainer, val_loader, pl_module.device))
        out = {"train_eval/loss": train_loss, "gen_gap/loss": val_loss - train_loss}
        if train_acc is not None and val_acc is not None:
            out.update({"train_eval/acc": train_acc, "gen_gap/acc": train_acc - val_acc})
        return out
