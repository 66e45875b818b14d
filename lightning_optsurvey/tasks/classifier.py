"""A classifier ``LightningModule`` that trains with any registered optimizer, by name.

What each method needs from Lightning's loop (a ``create_graph`` backward, BatchNorm statistics and logging
frozen on repeated closure evaluations, SVRG's snapshot, K-FAC's Monte-Carlo Fisher sampling, refusing
gradient accumulation and ``16-mixed`` where they cannot work) is not coded here: the module returns
:class:`~lightning_optsurvey.callbacks.OptimizerLoopAdapter` from ``configure_callbacks``, the same
callback that serves any user ``LightningModule`` (attached to every Trainer by the package's entry point
when it is installed), with :class:`~lightning_optsurvey.callbacks.ResumeRNG` (exact resume: the global RNG
states travel with checkpoints). K-FAC gets the network as ``model=`` so that its Monte-Carlo Fisher samples from the
logits.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_optsurvey.callbacks.optimizer_loop import OptimizerLoopAdapter
from lightning_optsurvey.callbacks.resume import ResumeRNG
from lightning_optsurvey.optim import create_optimizer, get_spec
from lightning_optsurvey.tasks.models import build_model
from lightning_optsurvey.validation import (
    check_float_hparam,
    check_int,
    check_number,
    check_optional,
    check_type,
    is_real,
)

#: The schedulers by name, with the keywords each takes.
_SCHEDULERS = {"cosine": ("T_max", "eta_min"), "step": ("step_size", "gamma"), "exponential": ("gamma",)}


def check_optimizer_kwargs(optimizer: str, kwargs: Any, where: str = "optimizer_kwargs") -> dict[str, Any]:
    """Check hyperparameter overrides before an optimizer is built; return them as a dict.

    ``kwargs`` is a mapping of keyword names (``TypeError`` otherwise). A keyword whose registry default
    is a number or a tuple of numbers (and ``lr``), and every number given, follows the package's float
    rule (:func:`~lightning_optsurvey.validation.check_float_hparam`: a real number, ``TypeError`` for a
    string or bool; finite, ``ValueError`` for NaN or infinity, also inside tuples such as ``betas``).
    Ranges are each optimizer's own checks.
    """
    if kwargs is None:
        return {}
    check_type(where, kwargs, Mapping, "a dict of hyperparameters such as {'lr': 0.1}")
    defaults = get_spec(optimizer).defaults
    for key, value in kwargs.items():
        check_type(f"{where} key {key!r}", key, str, "a hyperparameter name (str)")
        label = (f"{where} {optimizer}.{key}" if where.startswith("--")
                 else f"{where}[{key!r}] of optimizer {optimizer!r}")
        default = defaults.get(key, 0.0 if key == "lr" else None)
        if _numeric(default) or _numeric(value):
            check_float_hparam(label, value)
    return dict(kwargs)


def _numeric(value: Any) -> bool:
    """A number, a tensor, or a non-empty tuple/list of numbers (a float hyperparameter's shapes)."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(is_real(v) for v in value)
    return is_real(value) or isinstance(value, torch.Tensor)


def _check_scheduler_kwargs(name: str | None, kwargs: Mapping[str, Any]) -> None:
    where = f"lr_scheduler={name!r}: "
    if name == "step":
        check_optional(check_int, where + "step_size", kwargs.get("step_size"), low=1)
        check_optional(check_number, where + "gamma", kwargs.get("gamma"), low_open=True)
    elif name == "exponential":
        check_optional(check_number, where + "gamma", kwargs.get("gamma"), low_open=True)
    elif name == "cosine":
        check_optional(check_int, where + "T_max", kwargs.get("T_max"), low=1)  # None: max_epochs
        check_optional(check_number, where + "eta_min", kwargs.get("eta_min"))


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
        ValueError: For an unknown model, optimizer or scheduler name, a non-finite or out-of-range
            optimizer or scheduler value (``step_size`` < 1, ``gamma`` <= 0, ...), ``num_classes`` < 2,
            or (at setup) a ``num_classes`` that differs from the data module's.
        TypeError: For an optimizer or scheduler keyword that it does not take, kwargs that are not a
            dict, or a value of the wrong type (a string where a number belongs, a float ``step_size``).

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
        check_int("num_classes", num_classes, low=2)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.net = model if isinstance(model, nn.Module) else build_model(model, num_classes)
        self.spec = get_spec(optimizer)
        self.optimizer_kwargs = check_optimizer_kwargs(self.spec.name, optimizer_kwargs)
        check_optional(check_type, "lr_scheduler_kwargs", lr_scheduler_kwargs, types=Mapping,
                       what="a dict such as {'step_size': 10}")
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
        _check_scheduler_kwargs(lr_scheduler, self.lr_scheduler_kwargs)
        self.num_classes = num_classes
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        data_classes = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} does not match the data, which has {data_classes} classes "
                f"({type(self.trainer.datamodule).__name__}.num_classes); use num_classes={data_classes}"
            )

    def configure_callbacks(self) -> list[Any]:
        # Replaces the one an installed package's entry point puts on the Trainer (same type), so the
        # module behaves the same whether the package is installed or only on the path. ResumeRNG: a
        # resumed run draws the same dropout masks (and optimizer noise) as the uninterrupted one.
        return [ResumeRNG(), OptimizerLoopAdapter()]  # RNG first: restored before any epoch-start draw

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of a batch, without logging (used by full-gradient passes such as SVRG's)."""
        x, y = batch
        return F.cross_entropy(self(x), y)

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
