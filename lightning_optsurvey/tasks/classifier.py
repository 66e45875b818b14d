"""A classifier ``LightningModule`` that trains with any registered optimizer, by name.

What each method needs from Lightning's loop (a ``create_graph`` backward, BatchNorm statistics and logging
frozen on repeated closure evaluations, SVRG's snapshot, K-FAC's Monte-Carlo Fisher sampling, refusing
gradient accumulation and ``16-mixed`` where they cannot work) is not coded here: the module returns
:class:`~lightning_optsurvey.callbacks.OptimizerLoopAdapter` from ``configure_callbacks``, the same
callback that serves any user ``LightningModule`` (attached to every Trainer by the package's entry point
when it is installed). K-FAC gets the network as ``model=`` so that its Monte-Carlo Fisher samples from the
logits.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_optsurvey.callbacks.optimizer_loop import OptimizerLoopAdapter
from lightning_optsurvey.optim import create_optimizer, get_spec
from lightning_optsurvey.tasks.models import build_model

#: The schedulers by name, with the keywords each takes.
_SCHEDULERS = {"cosine": ("T_max", "eta_min"), "step": ("step_size", "gamma"), "exponential": ("gamma",)}


class ClassifierModule(LightningModule):
    """Image classifier trained with cross-entropy and any registered optimizer.

    Args:
        model: A name for :func:`~lightning_optsurvey.tasks.build_model`, or an ``nn.Module``.
        optimizer: A name from :func:`~lightning_optsurvey.optim.available_optimizers`.
        optimizer_kwargs: Hyperparameters overriding the registry's defaults.
        lr_scheduler: ``None``, ``"cosine"`` (over ``max_epochs``), ``"step"`` or ``"exponential"``.
        lr_scheduler_kwargs: Keyword arguments of the scheduler: ``T_max`` and ``eta_min`` (cosine),
            ``step_size`` and ``gamma`` (step), ``gamma`` (exponential).
        num_classes: Number of classes.

    Raises:
        ValueError: For an unknown model, optimizer or scheduler name, or an invalid optimizer
            hyperparameter value.
        TypeError: For an optimizer or scheduler keyword that it does not take.

    Logs ``train/loss`` (epoch mean), ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``.
    """

    def __init__(
        self,
        model: str | nn.Module = "cnn",
        optimizer: str = "sgd",
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_scheduler: str | None = None,
        lr_scheduler_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.net = model if isinstance(model, nn.Module) else build_model(model, num_classes)
        self.spec = get_spec(optimizer)
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        # Fail at construction, not at fit time: build once on a throw-away copy of the network, so that
        # unknown names and bad values are caught and nothing (K-FAC's layer hooks) stays on ``self.net``.
        self._build_optimizer(copy.deepcopy(self.net))
        if lr_scheduler is not None and lr_scheduler not in _SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {lr_scheduler!r}; known: None, {', '.join(_SCHEDULERS)}")
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_kwargs = dict(lr_scheduler_kwargs or {})
        takes = _SCHEDULERS[lr_scheduler] if lr_scheduler is not None else ()
        unknown = sorted(set(self.lr_scheduler_kwargs) - set(takes))
        if unknown:
            raise TypeError(
                f"lr_scheduler={lr_scheduler!r} does not take {unknown}; it takes: {list(takes)}"
            )
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_callbacks(self) -> list[Any]:
        # Replaces the one an installed package's entry point puts on the Trainer (same type), so the
        # module behaves the same whether the package is installed or only on the path.
        return [OptimizerLoopAdapter()]

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of a batch, without logging (used by full-gradient passes such as SVRG's)."""
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc)

    def _build_optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        return create_optimizer(self.spec.name, net.parameters(), model=net if self.spec.needs_model else None,
                                **self.optimizer_kwargs)

    def configure_optimizers(self) -> Any:
        optimizer = self._build_optimizer(self.net)
        if self.lr_scheduler is None:
            return optimizer
        kwargs = self.lr_scheduler_kwargs
        if self.lr_scheduler == "cosine":
            t_max = kwargs.get("T_max") or max(int(self.trainer.max_epochs or 1), 1)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max,
                                                                   eta_min=kwargs.get("eta_min", 0.0))
        elif self.lr_scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=kwargs.get("step_size", 10),
                                                        gamma=kwargs.get("gamma", 0.1))
        else:
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=kwargs.get("gamma", 0.95))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
