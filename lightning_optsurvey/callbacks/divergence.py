"""Divergence as an outcome: a non-finite training loss is detected, reported once, and optionally stops the run.

:class:`DivergenceMonitor` looks at the loss every training step returns (``training_step``'s tensor or
its ``"loss"`` entry). The first non-finite one (on any rank: the flag is reduced over ranks, so every
rank agrees and a stop is collective) is reported once, with its step and epoch:

- a ``RuntimeWarning`` on rank 0 naming the step, the epoch and the value;
- metrics ``divergence/diverged`` (1.0) and ``divergence/step`` to every logger, and tags ``diverged``
  (``"true"``) and ``diverged_step`` on MLflow runs; a run that ends without diverging is tagged
  ``diverged = "false"``, so runs can be filtered either way (``tags.diverged = 'true'``);
- ``stop=True`` ends the run at that step (``trainer.should_stop``), keeping what was logged.

Lightning's ``EarlyStopping(monitor=..., check_finite=True)`` stops on a non-finite *monitored metric*
at epoch (or validation) ends; this callback reports the exact step and needs no monitored metric.
The measuring callbacks (:class:`~lightning_optsurvey.callbacks.MeasuringCallback`) skip a measurement
at a non-finite point instead of failing; :func:`nonfinite_reason` is their shared test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_optsurvey.validation import check_bool

__all__ = ["DivergenceMonitor", "nonfinite_reason"]


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


def nonfinite_reason(trainer: Trainer | None, module: nn.Module) -> str | None:
    """Why the current training point is not finite, or ``None`` when it is.

    Non-finite parameters or floating buffers, a :class:`DivergenceMonitor` that has seen a non-finite
    loss, or a non-finite loss among ``trainer.callback_metrics``.
    """
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{name} is not finite (the run has diverged)"
    if trainer is not None:
        for callback in getattr(trainer, "callbacks", []):
            if isinstance(callback, DivergenceMonitor) and callback.diverged_step is not None:
                return f"the training loss was not finite at step {callback.diverged_step}"
        for key, value in getattr(trainer, "callback_metrics", {}).items():
            if "loss" in key and isinstance(value, torch.Tensor) and value.numel() == 1 \
                    and not math.isfinite(float(value)):
                return f"{key} is {float(value)}"
    return None


class DivergenceMonitor(Callback):
    """Report the first non-finite training loss (step, metric, MLflow tag); optionally stop the run.

    Args:
        stop: End the run at the step the loss becomes non-finite.

    Attributes:
        diverged_step: The global step of the first non-finite loss (``None`` while finite).
        diverged_epoch: Its epoch.
        diverged_value: The non-finite value (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, stop: bool = False) -> None:
        super().__init__()
        self.stop = check_bool("stop", stop)
        self.diverged_step: int | None = None
        self.diverged_epoch: int | None = None
        self.diverged_value: float | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(stop=self.stop)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.diverged_step is not None:
            if self.stop:
                trainer.should_stop = True
            return
        loss = _loss_of(outputs)
        value = float(loss.detach().float().sum()) if loss is not None else 0.0
        local = not math.isfinite(value)
        diverged = trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local
        if not diverged:
            return
        self.diverged_step = int(trainer.global_step)
        self.diverged_epoch = int(trainer.current_epoch)
        self.diverged_value = value if local else float("nan")
        action = "stopping the run" if self.stop else "training continues (DivergenceMonitor(stop=True) stops it)"
        rank_zero_warn(
            f"training diverged: the loss is {self.diverged_value} at step {self.diverged_step} "
            f"(epoch {self.diverged_epoch}); {action}. Lower the learning rate or clip gradients.",
            category=RuntimeWarning,
        )
        metrics = {"divergence/diverged": 1.0, "divergence/step": float(self.diverged_step)}
        for name, metric in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(metric)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=self.diverged_step)
            self._tag(trainer, {"diverged": "true", "diverged_step": str(self.diverged_step)})
        if self.stop:
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.diverged_step is None and trainer.is_global_zero:
            self._tag(trainer, {"diverged": "false"})

    @staticmethod
    def _tag(trainer: Trainer, tags: dict[str, str]) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for key, value in tags.items():
                    logger.experiment.set_tag(logger.run_id, key, value)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"diverged_step": self.diverged_step, "diverged_epoch": self.diverged_epoch,
                "diverged_value": self.diverged_value}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diverged_step = state_dict.get("diverged_step")
        self.diverged_epoch = state_dict.get("diverged_epoch")
        self.diverged_value = state_dict.get("diverged_value")
