"""Entropy-SGD: gradient descent on the local entropy, estimated by Langevin dynamics through the closure.

Why ours: no maintained package implements it (the authors' code targets Lua Torch and an old PyTorch,
with the state outside the optimizer). Here the inner SGLD loop evaluates ``step``'s closure, the noise
comes from a generator whose position is saved in ``self.state`` (checkpoints resume exactly), and the
outer step is a momentum step on the local-entropy gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lightning_optsurvey.optim._common import SeededClosureOptimizer, call_closure, check_heavy_ball, heavy_ball
from lightning_optsurvey.validation import check_bool, check_int, check_number


class EntropySGD(SeededClosureOptimizer):
    r"""Entropy-SGD (Algorithm 1 of Chaudhari et al. 2017).

    The local entropy :math:`F(x;\gamma) = \log \int \exp(-f(x') - \tfrac{\gamma}{2}\|x-x'\|^2)\,dx'` has gradient
    :math:`-\gamma(x - \langle x'\rangle)`, where :math:`\langle x'\rangle` is the mean of the Gibbs measure
    around :math:`x`. Each step estimates that mean with ``inner_steps`` = :math:`L` SGLD steps started at
    :math:`x' = \mu = x`, every one evaluating the closure at :math:`x'`:

    .. math::
        x' \leftarrow x' - \eta' \big(\nabla f(x') - \gamma_t (x - x')\big) + \sqrt{\eta'}\,\varepsilon\,\xi,
        \qquad \mu \leftarrow (1-\alpha)\mu + \alpha x',

    then :math:`d = \gamma_t (x - \mu) + \text{wd}\,x`, :math:`b \leftarrow m b + d`,
    :math:`x \leftarrow x - \eta b` (Nesterov optional). Scoping: :math:`\gamma_t = \gamma (1 +
    \gamma_1)^t`. With ``inner_steps=1``, ``alpha=1``, ``noise=0``, ``gamma_scoping=0`` the step is SGD with
    momentum on the learning rate :math:`\eta\gamma\eta'` (the degenerate case the tests check).

    Under Lightning all :math:`L` evaluations see the same mini-batch (the paper draws a new one per inner
    step); the first evaluation, at :math:`x`, is the one logged and the one whose loss ``step`` returns.

    Args:
        params: Parameters or parameter groups.
        lr: Outer learning rate :math:`\eta > 0`.
        momentum: Outer momentum :math:`m \in [0, 1)`.
        gamma: Coupling :math:`\gamma > 0`.
        gamma_scoping: :math:`\gamma_1 \ge 0`, growth of :math:`\gamma` per step.
        inner_steps: :math:`L \ge 1` Langevin steps (closure evaluations) per step.
        inner_lr: Langevin step size :math:`\eta' > 0`.
        noise: Thermal noise :math:`\varepsilon \ge 0`.
        alpha: Averaging weight :math:`\alpha \in (0, 1]`.
        nesterov: Nesterov momentum for the outer step.
        weight_decay: L2 coefficient of the outer step, ``>= 0``.
        seed: Seed of the noise generator.

    Raises:
        ValueError: For an out-of-range hyperparameter.

    References:
        Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun & Zecchina, "Entropy-SGD:
        Biasing Gradient Descent Into Wide Valleys", ICLR 2017, arXiv:1611.01838.
    """

    _STEP_KEY = "entropy_sgd"

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        momentum: float = 0.9,
        gamma: float = 0.03,
        gamma_scoping: float = 1e-3,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        noise: float = 1e-4,
        alpha: float = 0.75,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        check_heavy_ball(lr, momentum)
        check_number("gamma", gamma, low_open=True)
        check_number("gamma_scoping", gamma_scoping)
        check_int("inner_steps", inner_steps)
        check_number("inner_lr", inner_lr, low_open=True)
        check_number("noise", noise)
        check_number("alpha", alpha, low_open=True, high=1.0)
        check_number("weight_decay", weight_decay)
        check_bool("nesterov", nesterov)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        defaults = {"lr": lr, "momentum": momentum, "gamma": gamma, "gamma_scoping": gamma_scoping,
                    "inner_steps": inner_steps, "inner_lr": inner_lr, "noise": noise, "alpha": alpha,
                    "nesterov": nesterov, "weight_decay": weight_decay}
        super().__init__(params, defaults, seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One outer step after ``inner_steps`` closure evaluations.

        Args:
            closure: Zeroes the gradients, recomputes the loss and calls ``backward``; required.

        Returns:
            The loss of the first evaluation (at the current weights).

        Raises:
            ValueError: If no closure is given.
        """
        closure, counter = self._begin_step(closure)
        t = counter["step"]
        params = [p for group in self.param_groups for p in group["params"]]
        if not params:
            return call_closure(closure)
        generator = self._rng.fetch(self.state, params[0].device)
        anchors = [p.detach().clone() for p in params]
        means = [p.detach().clone() for p in params]
        inner_steps = max(group["inner_steps"] for group in self.param_groups)
        loss = None
        try:
            for inner in range(inner_steps):
                value = call_closure(closure)
                if inner == 0:
                    loss = value
                i = 0
                for group in self.param_groups:
                    gamma_t = group["gamma"] * (1.0 + group["gamma_scoping"]) ** t
                    eta, eps, alpha = group["inner_lr"], group["noise"], group["alpha"]
                    active = inner < group["inner_steps"]
                    for p in group["params"]:
                        x, mu = anchors[i], means[i]
                        i += 1
                        if p.grad is None or not active:
                            continue
                        # dx' = grad f(x') - gamma (x - x')
                        dx = p.grad.add(x - p, alpha=-gamma_t)
                        p.add_(dx, alpha=-eta)
                        if eps:
                            xi = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                            p.add_(xi, alpha=math.sqrt(eta) * eps)
                        mu.mul_(1.0 - alpha).add_(p, alpha=alpha)
        finally:
            torch._foreach_copy_(params, anchors)
        self._rng.store(self.state)
        i = 0
        for group in self.param_groups:
            gamma_t = group["gamma"] * (1.0 + group["gamma_scoping"]) ** t
            lr, m, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in group["params"]:
                mu = means[i]
                i += 1
                if p.grad is None:
                    continue
                d_p = (p - mu).mul_(gamma_t)
                if wd:
                    d_p.add_(p, alpha=wd)
                if m:
                    buf = heavy_ball(self.state, p, d_p, m)
                    d_p = d_p.add(buf, alpha=m) if group["nesterov"] else buf
                p.add_(d_p, alpha=-lr)
        counter["step"] = t + 1
        return loss


def _register() -> None:
    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    register(OptimizerSpec(
        "entropy_sgd", EntropySGD, "landscape", needs_closure=True,
        defaults={"lr": 5.0, "momentum": 0.9, "gamma": 0.03, "inner_steps": 5, "inner_lr": 0.1,
                  "noise": 1e-4, "alpha": 0.75},
        reference="Chaudhari, Choromanska et al. 2017, arXiv:1611.01838",
        summary="descent on the local entropy, estimated by Langevin inner steps",
        deviations={"complex": "Langevin noise is drawn for real weights",
                    "moves_at_zero_grad": "the Langevin inner loop adds thermal noise (noise > 0); noise=0 makes a "
                                          "zero gradient a no-op"},
    ))


_register()
