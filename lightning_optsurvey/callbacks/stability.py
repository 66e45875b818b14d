"""Edge-of-stability callback: ``stability/sharpness_x_lr`` against the optimizer's stability threshold.

Full-batch gradient descent on a quadratic diverges once ``lr * lambda_max > 2``; Cohen et al. (2021)
observed that training drives the sharpness up to that threshold and then hovers there. The threshold
depends on the optimizer: ``2 + 2 beta`` for heavy-ball momentum (``(2 + 2 beta) / (1 + 2 beta)`` for
Nesterov), and for Adam the *preconditioned* sharpness ``lambda_max(P^{-1} H)`` equilibrates at
``(2 + 2 beta_1) / ((1 - beta_1) lr)`` (Cohen et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import MeasuringCallback, resolve_loss_fn
from lightning_optsurvey.curvature import HessianOperator, ScaledOperator, lanczos
from lightning_optsurvey.curvature.linear import stability_scaling
from lightning_optsurvey.validation import check_callable, check_float, check_optional

__all__ = ["EdgeOfStability", "stability_scaling"]  # stability_scaling: pure maths, in curvature.linear


class EdgeOfStability(MeasuringCallback):
    r"""Log ``stability/sharpness_x_lr`` and the optimizer's threshold ``stability/threshold``.

    ``sharpness_x_lr`` is :math:`\lambda_{\max}(D^{1/2} H D^{1/2})` with ``D`` the per-parameter step
    sizes of :func:`stability_scaling`: :math:`\eta \lambda_{\max}(H)` for SGD, the preconditioned
    sharpness times the learning rate for Adam. Training is at the edge of stability when it reaches
    ``stability/threshold``. Also logs ``stability/sharpness`` (:math:`\lambda_{\max}(H)`) for SGD.

    When a :class:`~lightning_optsurvey.callbacks.HessianSpectrum` is attached, the callback moves itself
    after it in ``trainer.callbacks`` and, for SGD with one learning rate, reuses the ``hessian/eig_1`` it
    measured at the same step instead of running its own Lanczos iteration. Otherwise it runs Lanczos
    (:func:`~lightning_optsurvey.curvature.lanczos`) on the fixed subset, with the module in eval mode.

    Args:
        every_n_epochs: Measure after every n-th epoch (``None``: never at epoch ends).
        every_n_steps: Measure after every n-th optimizer step (``None``: never).
        num_batches: Batches in the fixed subset.
        tol: Lanczos' relative residual tolerance.
        loss_fn: ``loss_fn(outputs, targets)`` or a ``BatchLoss``; default: the module's ``compute_loss(batch)``
            if it defines one (any batch structure), else its ``loss_fn`` or cross-entropy (``resolve_loss_fn``).
        seed: Seed of the subset and of Lanczos' start vector.

    Raises:
        ValueError: For a bad cadence, ``num_batches`` or ``tol``.

    References:
        Cohen et al. ICLR 2021. https://arxiv.org/abs/2103.00065 ; Cohen et al. 2022.
        https://arxiv.org/abs/2207.14484
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        num_batches: int = 4,
        tol: float = 1e-3,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, num_batches=num_batches,
                         seed=seed)
        self.tol = check_float("tol", tol, low=0.0, high=1.0, low_open=True, high_open=True)
        check_optional(check_callable, "loss_fn", loss_fn, signature="loss_fn(outputs, targets)")
        self.loss_fn = loss_fn
        self._warned = False
        self.reused_spectrum = 0  # how many measurements reused HessianSpectrum's value

    @override
    def state_key_config(self) -> dict[str, Any]:
        return {**super().state_key_config(), "tol": self.tol}

    @staticmethod
    def _spectra(trainer: Trainer) -> list[Any]:
        try:
            from lightning_optsurvey.callbacks.hessian import HessianSpectrum
        except ImportError:  # pragma: no cover - the module ships with the package
            return []
        return [cb for cb in trainer.callbacks if isinstance(cb, HessianSpectrum)]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        spectra = self._spectra(trainer)
        if spectra and self in trainer.callbacks:
            # A new list, not an in-place move: Lightning is iterating over the current one right now.
            callbacks = [cb for cb in trainer.callbacks if cb is not self]
            callbacks.insert(max(callbacks.index(cb) for cb in spectra) + 1, self)
            trainer.callbacks = callbacks

    def _reusable_eig(self, trainer: Trainer) -> float | None:
        for cb in self._spectra(trainer):
            history = getattr(cb, "history", None)
            if history and history[-1].get("step") == float(trainer.global_step) and "hessian/eig_1" in history[-1]:
                return float(history[-1]["hessian/eig_1"])
        return None

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        if not trainer.optimizers:
            raise RuntimeError("EdgeOfStability needs the trainer's optimizer")
        pl_module.eval()
        loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
        op = HessianOperator(pl_module, loss_fn, batches, bn_mode="eval")
        named = dict(pl_module.named_parameters())
        d, threshold, rule = stability_scaling(trainer.optimizers[0], [named[n] for n in op.names])
        if threshold is None and not self._warned:
            self._warned = True
            rank_zero_warn(f"EdgeOfStability: no known stability threshold for {type(trainer.optimizers[0]).__name__}"
                           "; logging stability/sharpness_x_lr only")
        out: dict[str, float] = {}
        uniform = rule in ("gd", "heavy_ball", "nesterov") and bool((d == d[0]).all())
        eig = self._reusable_eig(trainer) if uniform else None
        if eig is not None:
            self.reused_spectrum += 1
            out["stability/sharpness_x_lr"] = float(d[0]) * eig
        else:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            target = op if uniform else ScaledOperator(op, d.clamp_min(0).sqrt())
            eig = float(lanczos(target, k=1, which="LA", tol=self.tol, generator=generator).eigenvalues[0])
            out["stability/sharpness_x_lr"] = float(d[0]) * eig if uniform else eig
        if uniform:
            out["stability/sharpness"] = eig
        if threshold is not None:
            out["stability/threshold"] = threshold
        return out
