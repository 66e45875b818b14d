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
from lightning_optsurvey.curvature import HessianOperator
from lightning_optsurvey.curvature.lanczos import lanczos
from lightning_optsurvey.measures._functional import check_positive, make_generator

__all__ = ["EdgeOfStability", "stability_scaling"]


class _Scaled:
    """The symmetric operator ``D^{1/2} H D^{1/2}`` for a diagonal ``D`` (per-parameter step sizes)."""

    def __init__(self, op: HessianOperator, d_sqrt: Tensor) -> None:
        self.op, self.d_sqrt = op, d_sqrt
        self.numel, self.device, self.dtype = op.numel, op.device, op.dtype

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    def __matmul__(self, v: Tensor) -> Tensor:
        d = self.d_sqrt.to(v.dtype)
        return d * (self.op @ (d * v).to(self.dtype)).to(v.dtype)


def stability_scaling(
    optimizer: torch.optim.Optimizer, params: list[Tensor]
) -> tuple[Tensor, float | None, str]:
    r"""Per-parameter effective step sizes ``D`` and the threshold for :math:`\lambda_{\max}(D^{1/2} H D^{1/2})`.

    - SGD (``torch.optim.SGD``): :math:`D = \eta (1 - \tau)` (``tau`` the dampening); threshold 2, or
      :math:`2 + 2\beta` with momentum :math:`\beta`, :math:`(2 + 2\beta)/(1 + 2\beta)` with Nesterov.
    - Adam / AdamW (any optimizer with ``exp_avg_sq`` state and ``betas``):
      :math:`D = \eta / P`, :math:`P = (1 - \beta_1^t)(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon)`;
      threshold :math:`(2 + 2\beta_1)/(1 - \beta_1)` (38 for :math:`\beta_1 = 0.9`).
    - Others: :math:`D = \eta` and no known threshold (``None``).

    Weight decay is not part of the model (it adds ``eta * wd`` to every eigenvalue of the update's
    linearization and is left out, as in the papers' experiments). Parameters the optimizer does not
    hold get ``D = 0``.

    Args:
        optimizer: The training optimizer.
        params: The parameters in the Hessian operator's order.

    Returns:
        ``(D, threshold, rule)`` with ``D`` flat over ``params`` and ``rule`` one of ``"gd"``,
        ``"heavy_ball"``, ``"nesterov"``, ``"adam"``, ``"unknown"``.

    References:
        Cohen, Kaur, Li, Kolter, Talwalkar. Gradient Descent on Neural Networks Typically Occurs at the Edge
        of Stability. ICLR 2021. https://arxiv.org/abs/2103.00065
        Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl, Gilmer. Adaptive
        Gradient Methods at the Edge of Stability. 2022. https://arxiv.org/abs/2207.14484
    """
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    pieces: list[Tensor] = []
    thresholds: set[tuple[float | None, str]] = set()
    for p in params:
        group = where.get(id(p))
        if group is None:
            pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            continue
        lr = float(group.get("lr", 0.0))
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state and "betas" in group:
            beta1, beta2 = group["betas"]
            step = float(state["step"])
            v = state["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in state else state["exp_avg_sq"]
            precond = (1 - beta1**step) * ((v / (1 - beta2**step)).sqrt() + group["eps"])
            pieces.append((lr / precond).reshape(-1).to(p.dtype))
            thresholds.add(((2 + 2 * beta1) / (1 - beta1), "adam"))
        elif isinstance(optimizer, torch.optim.SGD):
            beta, tau = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
            pieces.append(torch.full((p.numel(),), lr * (1 - tau if beta > 0 else 1.0), dtype=p.dtype,
                                     device=p.device))
            if beta == 0:
                thresholds.add((2.0, "gd"))
            elif group.get("nesterov"):
                thresholds.add(((2 + 2 * beta) / (1 + 2 * beta), "nesterov"))
            else:
                thresholds.add((2 + 2 * beta, "heavy_ball"))
        else:
            pieces.append(torch.full((p.numel(),), lr, dtype=p.dtype, device=p.device))
            thresholds.add((None, "unknown"))
    if len(thresholds) != 1:
        return torch.cat(pieces), None, "unknown"
    threshold, rule = thresholds.pop()
    return torch.cat(pieces), threshold, rule


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
        self.tol = check_positive("tol", tol)
        if self.tol >= 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
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
            generator = make_generator(torch.device("cpu"), self.seed)
            target = op if uniform else _Scaled(op, d.clamp_min(0).sqrt())
            eig = float(lanczos(target, k=1, which="LA", tol=self.tol, generator=generator).eigenvalues[0])
            out["stability/sharpness_x_lr"] = float(d[0]) * eig if uniform else eig
        if uniform:
            out["stability/sharpness"] = eig
        if threshold is not None:
            out["stability/threshold"] = threshold
        return out
