"""Surrogate-gap guided SAM (GSAM), a small extension of our :class:`~lightning_optsurvey.optim.sam.SAM`.

Why ours and not pytorch-optimizer's ``GSAM`` (4.1.0): it cannot be constructed without the model and a
``rho_scheduler`` object, it wraps the forward pass itself (``set_closure``) instead of taking the
training loop's closure, and so it does not fit ``create_optimizer(name, params)`` nor Lightning's
automatic optimization. Here the radius is a plain hyperparameter (schedule it through
``param_groups[i]["rho"]`` like a learning rate) and ``step(closure)`` works as for SAM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_optsurvey.optim.sam import _DEVIATIONS, SAM, BaseOptimizer
from lightning_optsurvey.validation import check_number


class GSAM(SAM):
    r"""SAM whose descent direction also lowers the surrogate gap :math:`L(w+\hat\epsilon) - L(w)`.

    With :math:`g = \nabla L(w)` and :math:`g_p = \nabla L(w + \hat\epsilon)` (the SAM gradient), ``g`` is split
    into its component along :math:`g_p` and the orthogonal rest, and the base optimizer receives

    .. math::
        g_\perp = g - \frac{\langle g, g_p\rangle}{\|g_p\|^2}\, g_p, \qquad
        d = g_p - \alpha\, g_\perp .

    Moving along :math:`-g_\perp` lowers :math:`L(w)` without changing the perturbed loss to first order, so
    it shrinks the surrogate gap. ``alpha=0`` is SAM. Inner products are taken over all parameter groups.

    Args:
        params: Parameters or parameter groups.
        base: Base optimizer (registry name or ``torch.optim.Optimizer`` subclass).
        rho: Neighbourhood radius, ``>= 0``.
        alpha: Weight of the gap-reducing direction, ``>= 0``.
        adaptive: Use ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset, ``>= 0``.
        **base_kwargs: Hyperparameters of the base optimizer.

    With ``maximize=True`` the roles of ascent and descent swap as for :class:`SAM` (the direction is
    computed from the raw gradients and the base ascends along it). After ``step``, ``.grad`` holds the
    gradient at the perturbed point, as the closure left it; the direction is only handed to the base.

    Raises:
        ValueError: For a negative ``rho``, ``alpha`` or ``eta`` and the cases of :class:`SAM`.

    References:
        Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan & Liu, "Surrogate Gap Minimization
        Improves Sharpness-Aware Training", ICLR 2022, arXiv:2203.08065.
    """

    def __init__(
        self,
        params: Any,
        base: BaseOptimizer = "sgd",
        rho: float = 0.05,
        alpha: float = 0.1,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        check_number("alpha", alpha)
        super().__init__(params, base=base, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        for group in self.param_groups:
            group.setdefault("alpha", alpha)
        self.defaults["alpha"] = alpha

    def _needs_ascent_grads(self) -> bool:
        return True

    def _descent_gradients(self, params: list[Tensor], ascent_grads: list[Tensor]) -> dict[Tensor, Tensor]:
        have = [i for i, p in enumerate(params) if p.grad is not None]
        if not have:
            return {}
        g = [ascent_grads[i] for i in have]
        gp = [params[i].grad for i in have]
        device = g[0].device
        inner = torch.stack([torch.vdot(a.flatten(), b.flatten()).to(device) for a, b in zip(g, gp)]).sum()
        gp_sq = torch.stack([x.to(device) ** 2 for x in torch._foreach_norm(gp)]).sum()
        coef = inner / (gp_sq + 1e-12)
        alpha_of = {id(p): group["alpha"] for group in self.param_groups for p in group["params"]}
        directions: dict[Tensor, Tensor] = {}
        for i, gi, gpi in zip(have, g, gp):
            alpha = alpha_of[id(params[i])]
            if alpha:
                # d = g_p - alpha (g - coef g_p) = (1 + alpha coef) g_p - alpha g; .grad itself is left alone
                directions[params[i]] = gpi.mul(1.0 + alpha * coef).add_(gi, alpha=-alpha)
        return directions


def _register() -> None:
    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    register(OptimizerSpec(
        "gsam", GSAM, "landscape", needs_closure=True, strict=False,
        defaults={"base": "momentum", "rho": 0.05, "alpha": 0.1},
        reference="Zhuang et al. 2022, arXiv:2203.08065",
        summary="SAM whose descent also lowers the surrogate gap",
        deviations=_DEVIATIONS,
    ))


_register()
