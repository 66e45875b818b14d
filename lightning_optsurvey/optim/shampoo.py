"""Shampoo: Kronecker-factored full-matrix AdaGrad, one preconditioner per tensor dimension.

Why ours and not pytorch-optimizer's ``Shampoo`` (4.1.0), which failed the conformance suite (loss
diverging to 1e33 on digits at the learning rates where it moves at all): its inverse roots start as
*zero* matrices and are first computed at step ``preconditioning_compute_steps``, so every earlier step
is a zero update; its momentum interpolates the raw gradient with the previous *preconditioned* update;
and it overwrites ``p.grad`` in place. Here the roots are computed at the first step, momentum
accumulates preconditioned updates only, and the gradients are left as the backward pass wrote them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_optsurvey.optim._common import (
    FullStateMixin,
    call_closure,
    check_bool,
    check_int,
    check_lr,
    check_number,
    heavy_ball,
)


def _inverse_root(matrix: Tensor, exponent: float, eps: float) -> Tensor:
    """Inverse ``exponent``-th root of a symmetric positive semi-definite matrix (eigenvalues >= eps).

    Raises:
        FloatingPointError: If the statistics are not finite (the run diverged).
    """
    if not torch.isfinite(matrix).all():
        raise FloatingPointError("Shampoo statistics are not finite: training diverged; lower lr")
    values, vectors = torch.linalg.eigh(matrix.double())
    return ((vectors * values.clamp_min(eps).pow(-1.0 / exponent)) @ vectors.T).to(matrix.dtype)


class Shampoo(FullStateMixin, Optimizer):
    r"""Shampoo with momentum.

    For a parameter of order :math:`k` with gradient :math:`G`, each dimension :math:`i` (of size at most
    ``max_preconditioner_dim``) keeps :math:`H_i \leftarrow H_i + G_{(i)} G_{(i)}^\top` (:math:`G_{(i)}` is
    :math:`G` unfolded along :math:`i`; :math:`H_i^{(0)} = \epsilon I`), and the update is

    .. math::
        U = G \times_1 H_1^{-1/2k} \times_2 \cdots \times_k H_k^{-1/2k},\quad
        b \leftarrow \mu b + U,\quad W \leftarrow W - \eta b

    (for a matrix, :math:`U = L^{-1/4} G R^{-1/4}`). The inverse roots are recomputed (by symmetric
    eigendecomposition, in float64) every ``update_every`` steps, starting with the first. With
    ``graft=True`` (the default) each tensor's update is rescaled to the norm of its gradient,
    :math:`U \leftarrow U \|G\| / \|U\|` (layer-wise grafting of SGD's step size, Anil et al. 2020): Shampoo
    chooses the direction, the learning rate keeps SGD's meaning, and early roots computed from few
    gradients (nearly rank-one statistics) cannot blow the step up. Weight decay is added to the gradient.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate :math:`\eta > 0`.
        momentum: Momentum :math:`\mu \in [0, 1)`.
        eps: Initial diagonal :math:`\epsilon > 0` (also the floor of the eigenvalues).
        update_every: Steps between recomputations of the inverse roots (>= 1).
        max_preconditioner_dim: Dimensions larger than this are left unpreconditioned (>= 1).
        weight_decay: L2 coefficient, ``>= 0``.
        graft: Rescale each update to the gradient's norm.

    Raises:
        ValueError: For an out-of-range hyperparameter.

    References:
        Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018,
        arXiv:1802.09568.
        Anil, Gupta, Koren, Regan & Singer, "Scalable Second Order Optimization for Deep Learning",
        arXiv:2002.09018 (grafting).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.05,
        momentum: float = 0.9,
        eps: float = 1e-4,
        update_every: int = 10,
        max_preconditioner_dim: int = 2048,
        weight_decay: float = 0.0,
        graft: bool = True,
    ) -> None:
        check_lr(lr)
        check_number("momentum", momentum, high=1.0, high_open=True)
        check_number("eps", eps, low_open=True)
        check_int("update_every", update_every)
        check_int("max_preconditioner_dim", max_preconditioner_dim)
        check_number("weight_decay", weight_decay)
        check_bool("graft", graft)
        super().__init__(params, {"lr": lr, "momentum": momentum, "eps": eps, "update_every": update_every,
                                  "max_preconditioner_dim": max_preconditioner_dim,
                                  "weight_decay": weight_decay, "graft": graft})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Shampoo step.

        Args:
            closure: Optional; re-evaluates the loss and gradients.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = call_closure(closure) if closure is not None else None
        for group in self.param_groups:
            lr, m, eps, wd = float(group["lr"]), group["momentum"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.reshape(-1) if p.ndim == 0 else p.grad
                if wd:
                    grad = grad.add(p.reshape(grad.shape), alpha=wd)
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    for i, size in enumerate(grad.shape):
                        if size <= group["max_preconditioner_dim"]:
                            state[f"H_{i}"] = eps * torch.eye(size, dtype=grad.dtype, device=grad.device)
                refresh = state["step"] % group["update_every"] == 0
                order = grad.ndim
                update = grad
                for i in range(order):
                    key = f"H_{i}"
                    if key not in state:
                        continue
                    unfolded = grad.movedim(i, 0).reshape(grad.shape[i], -1)
                    state[key].addmm_(unfolded, unfolded.T)
                    if refresh:
                        state[f"root_{i}"] = _inverse_root(state[key], 2 * order, eps)
                    update = torch.tensordot(state[f"root_{i}"], update, dims=([1], [i])).movedim(0, i)
                if group["graft"]:
                    norm = torch.linalg.vector_norm(update)
                    update = update * torch.where(norm > 0, torch.linalg.vector_norm(grad) / norm, 0.0)
                update = update.reshape(p.shape)
                p.add_(heavy_ball(self.state, p, update, m), alpha=-lr)
                state["step"] += 1
        return loss


def _register() -> None:
    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    register(OptimizerSpec(
        "shampoo", Shampoo, "second_order",
        defaults={"lr": 0.05, "momentum": 0.9, "update_every": 10},
        reference="Gupta, Koren & Singer 2018, arXiv:1802.09568",
        summary="Kronecker-factored full-matrix AdaGrad (one preconditioner per dimension)",
        deviations={"complex": "the preconditioners are real symmetric matrices"},
    ))


_register()
