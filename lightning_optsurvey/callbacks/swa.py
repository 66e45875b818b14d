"""Stochastic weight averaging (Izmailov et al. 2018) on Lightning's own ``WeightAveraging``.

:class:`SWA` is Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (the equal-weight average of
``torch.optim.swa_utils.AveragedModel``) configured as in the paper: the iterate is averaged at the end of
every epoch from ``swa_epoch_start`` on, optionally at a constant ``swa_lr``; BatchNorm buffers are *not*
averaged but recomputed for the averaged weights with one pass over the training data (the paper's
``bn_update``) whenever the averaged model is used: for validation during the averaging phase and at the end
of the fit, after which the module holds the averaged model. Measuring callbacks then measure it once more and
log their metrics under ``swa/`` (``swa/hessian/eig_1``, ...).

Why not Lightning's ``StochasticWeightAveraging``: in Lightning 2.6 its BatchNorm epoch still steps the
optimizer once, on the last batch, with the gradients left from the last training step (``_skip_backward``
skips ``zero_grad`` and ``backward``, not the step), so the final weights are not the average (1.9e-2 off for
SGD on a small CNN) and AdaHessian crashes on the freed graph of those gradients. ``WeightAveraging`` steps
nothing; what it lacks for SWA (per-epoch updates from a start epoch, recomputed BatchNorm statistics,
validation of the iterate before averaging starts) is added here.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import MeasuringCallback, loader_rng_preserved, measuring
from lightning_optsurvey.callbacks.optimizer_loop import _default_loss
from lightning_optsurvey.validation import check_bool, check_float, check_int, check_optional, check_type

#: The paper, as the registry cites methods.
REFERENCE = "Izmailov, Podoprikhin, Garipov, Vetrov & Wilson 2018, arXiv:1803.05407"


def recompute_batchnorm(pl_module: LightningModule, loader: Any) -> int:
    """Reset every BatchNorm's running statistics and recompute them over ``loader`` (the paper's bn_update).

    Each batch goes through ``pl_module.compute_loss(batch)`` if the module has it, else its
    ``training_step`` (logging muted), without gradients and in train mode; the statistics are the
    cumulative average over all batches (``momentum=None``). Modes, momenta and the RNG states (the global
    ones and the loader's generators) are restored.

    Returns:
        The number of batches seen (0 when the module has no BatchNorm: nothing is run).
    """
    norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in pl_module.modules()}
    momenta = {m: m.momentum for m in norms}
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        pl_module.train()
        with torch.random.fork_rng(devices=devices), loader_rng_preserved(loader), torch.no_grad():
            for index, batch in enumerate(loader):
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                _default_loss(pl_module, batch, index)
                seen += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return seen


class SWA(WeightAveraging):
    """Stochastic weight averaging: the equal-weight average of the end-of-epoch iterates, BatchNorm recomputed.

    Works with every registry optimizer (it never steps the optimizer) and beside the measuring callbacks.

    Args:
        swa_epoch_start: First epoch whose end-of-epoch weights enter the average: an epoch index
            (``int >= 0``) or a fraction of ``max_epochs`` in ``(0, 1]`` (default 0.75: the last quarter).
        swa_lr: If given, every parameter group's learning rate is held at this value from
            ``swa_epoch_start`` on and the Trainer's learning-rate schedulers stop (the paper's constant SWA
            schedule); ``None`` leaves the optimizer's schedule alone.
        measure_average: At the end of the fit, run every measuring callback once more on the averaged
            model and log its metrics under ``swa/``.
        device: Where the averaged model is kept (default: the module's device).

    Raises:
        ValueError: For a bad ``swa_epoch_start`` or ``swa_lr``; at fit start, for a fractional start with
            ``max_epochs=-1``.

    References:
        Izmailov, Podoprikhin, Garipov, Vetrov & Wilson, "Averaging Weights Leads to Wider Optima and Better
        Generalization", UAI 2018, arXiv:1803.05407.
    """

    def __init__(
        self,
        swa_epoch_start: int | float = 0.75,
        swa_lr: float | None = None,
        measure_average: bool = True,
        device: torch.device | str | int | None = None,
    ) -> None:
        check_type("swa_epoch_start", swa_epoch_start, (int, float), "an int >= 0 or a float in (0, 1]")
        if isinstance(swa_epoch_start, bool) or isinstance(swa_epoch_start, int):
            check_int("swa_epoch_start", swa_epoch_start, low=0)
        else:
            check_float("swa_epoch_start", swa_epoch_start, low=0.0, high=1.0, low_open=True)
        check_optional(check_float, "swa_lr", swa_lr, low=0.0, low_open=True)
        check_bool("measure_average", measure_average)
        super().__init__(device=device, use_buffers=False)
        self.swa_epoch_start = swa_epoch_start
        self.swa_lr = None if swa_lr is None else float(swa_lr)
        self.measure_average = measure_average
        self._start = swa_epoch_start if isinstance(swa_epoch_start, int) else 0

    @property
    def start_epoch(self) -> int:
        """The first epoch averaged (resolved at fit start for a fractional ``swa_epoch_start``)."""
        return self._start

    @property
    def num_averaged(self) -> int:
        """How many iterates the average holds."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx >= self._start

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(self.swa_epoch_start, float):
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise ValueError(
                    f"SWA(swa_epoch_start={self.swa_epoch_start}) is a fraction of max_epochs, which is "
                    f"{max_epochs}; give an epoch index instead"
                )
            self._start = min(int(self.swa_epoch_start * max_epochs), max_epochs - 1)  # Lightning's convention

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.swa_lr is None or trainer.current_epoch < self._start:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.swa_lr
        trainer.lr_scheduler_configs.clear()  # the constant SWA learning rate from here on

    def _use_average(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        return self._average_model is not None and self.num_averaged > 0

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swapped = False
        if trainer.sanity_checking or not self._use_average(trainer, pl_module):
            return  # before the first average, validation sees the iterate
        self._swap_models(pl_module)
        self._swapped = True
        recompute_batchnorm(pl_module, trainer.train_dataloader)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(self, "_swapped", False):
            self._swap_models(pl_module)  # back to the iterate and its own BatchNorm statistics
            self._swapped = False

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._use_average(trainer, pl_module):
            return
        self._copy_average_to_current(pl_module)
        recompute_batchnorm(pl_module, trainer.train_dataloader)
        if not self.measure_average:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, MeasuringCallback):
                with measuring(pl_module) as unwrapped:
                    batches = callback.measurement_batches(trainer, unwrapped)
                    metrics = {f"swa/{k}": float(v) for k, v in callback.measure(trainer, unwrapped, batches).items()}
                callback.log_metrics(trainer, metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch, "start": self._start}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", -1))
        self._start = int(state_dict.get("start", self._start))
