"""LPF-SGD: SGD on a Gaussian-smoothed (low-pass filtered) loss, estimated by Monte Carlo through the closure.

Why ours: the method (Bisla, Wang & Choromanska 2022) is in no maintained package; the authors' script
perturbs ``.data`` outside any optimizer. Here ``step(closure)`` draws the perturbations from a generator
whose position is saved in ``self.state`` and restores the weights exactly (from a copy, not by
subtraction) after each sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_optsurvey.optim._common import SeededClosureOptimizer, call_closure, check_heavy_ball, heavy_ball
from lightning_optsurvey.validation import check_callable, check_int, check_number, check_optional


def _filter_scale(p: Tensor) -> Tensor:
    r"""Filter norms :math:`\|w_k\|` broadcast over filter ``k`` (dim 0); :math:`\|w\|` for vectors."""
    if p.ndim > 1:
        return torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=1).reshape(-1, *([1] * (p.ndim - 1)))
    return torch.linalg.vector_norm(p) + 1e-16


class LPFSGD(SeededClosureOptimizer):
    r"""Low-pass filtering SGD.

    Minimizes the smoothed loss :math:`(f \circledast \mathcal K)(w) = \mathbb E_{\epsilon}[f(w+\epsilon)]` with a
    Gaussian kernel whose standard deviation is proportional to the weights, filter by filter
    (:math:`\epsilon_k \sim \mathcal N(0, \sigma^2 \|w_k\|^2 I)` for the :math:`k`-th output filter/row; a
    vector parameter uses its whole norm). The gradient is the Monte-Carlo average over ``num_samples``
    = :math:`M` closure evaluations at perturbed weights,

    .. math::
        g = \frac1M \sum_{j=1}^M \nabla f(w + \epsilon_j),\quad
        b \leftarrow m b + g + \text{wd}\,w,\quad w \leftarrow w - \eta b .

    ``sigma=0`` is SGD with momentum. ``sigma_schedule(step)`` (if given) returns the radius for each step,
    e.g. the paper's radius that grows during training.

    Under Lightning the first evaluation (at :math:`w+\epsilon_1`) is the one logged: a one-sample estimate
    of the smoothed loss, which is what the method minimizes; ``step`` returns the mean over the samples.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate :math:`\eta > 0`.
        momentum: Momentum :math:`m \in [0, 1)`.
        sigma: Relative radius :math:`\sigma \ge 0`.
        num_samples: :math:`M \ge 1` closure evaluations per step (with groups of different :math:`M`, the
            step makes the largest number; a group uses only its first :math:`M`, unperturbed after them).
        sigma_schedule: Optional callable ``step -> sigma`` overriding ``sigma`` in every group.
        weight_decay: L2 coefficient, ``>= 0``.
        seed: Seed of the perturbation generator.

    Raises:
        TypeError: For a hyperparameter of the wrong type or a schedule that is not callable.
        ValueError: For an out-of-range hyperparameter.

    References:
        Bisla, Wang & Choromanska, "Low-Pass Filtering SGD for Recovering Flat Optima in the Deep Learning
        Optimization Landscape", AISTATS 2022, arXiv:2201.08025.
    """

    _STEP_KEY = "lpf_sgd"

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        momentum: float = 0.9,
        sigma: float = 0.01,
        num_samples: int = 4,
        sigma_schedule: Callable[[int], float] | None = None,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        check_heavy_ball(lr, momentum)
        check_number("sigma", sigma)
        check_int("num_samples", num_samples)
        check_number("weight_decay", weight_decay)
        check_optional(check_callable, "sigma_schedule", sigma_schedule, signature="sigma_schedule(step) -> sigma")
        defaults = {"lr": lr, "momentum": momentum, "sigma": sigma, "num_samples": num_samples,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults, seed)
        self.sigma_schedule = sigma_schedule

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Average the gradients at ``num_samples`` perturbed weights, then take a momentum step.

        Args:
            closure: Zeroes the gradients, recomputes the loss and calls ``backward``; required.

        Returns:
            The mean loss over the samples: a tensor when the closure returns tensors, a float when it
            returns Python numbers.

        Raises:
            ValueError: If no closure is given or the schedule returns a negative radius.
        """
        closure, counter = self._begin_step(closure)
        t = counter["step"]
        if self.sigma_schedule is not None:
            radius = check_number("sigma_schedule(step)", self.sigma_schedule(t))
            for group in self.param_groups:
                group["sigma"] = radius
        params = [p for group in self.param_groups for p in group["params"]]
        if not params:
            return call_closure(closure)
        generator = self._rng.fetch(self.state, params[0].device)
        sigmas = [group["sigma"] for group in self.param_groups for _ in group["params"]]
        # A group with fewer samples than another stays at w for the later evaluations and ignores them.
        counts = [group["num_samples"] for group in self.param_groups for _ in group["params"]]
        saved = [p.detach().clone() for p in params]
        scales = [_filter_scale(p) for p in params]
        sums: list[Tensor | None] = [None] * len(params)
        losses = []
        try:
            for j in range(max(counts)):
                for p, s, sigma, count in zip(params, scales, sigmas, counts):
                    if sigma and j < count:
                        xi = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                        p.addcmul_(xi, s, value=sigma)
                losses.append(call_closure(closure))
                torch._foreach_copy_(params, saved)
                for i, p in enumerate(params):
                    if p.grad is not None and j < counts[i]:
                        sums[i] = p.grad.clone() if sums[i] is None else sums[i].add_(p.grad)
        finally:
            torch._foreach_copy_(params, saved)
        self._rng.store(self.state)
        i = 0
        for group in self.param_groups:
            lr, m, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in group["params"]:
                total = sums[i]
                i += 1
                if total is None:
                    continue
                d_p = total.div_(group["num_samples"])
                p.grad = d_p  # the smoothed gradient, for anyone inspecting .grad after the step
                d_p = d_p.clone()
                if wd:
                    d_p.add_(p, alpha=wd)
                d_p = heavy_ball(self.state, p, d_p, m)
                p.add_(d_p, alpha=-lr)
        counter["step"] = t + 1
        if any(loss is None for loss in losses):
            return losses[0]
        if not any(isinstance(v, Tensor) for v in losses):
            return sum(float(v) for v in losses) / len(losses)
        like = next(v for v in losses if isinstance(v, Tensor))
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        return torch.stack([torch.as_tensor(v, dtype=dtype, device=like.device).detach().reshape(like.shape)
                            for v in losses]).mean(0)


def _register() -> None:
    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    register(OptimizerSpec(
        "lpf_sgd", LPFSGD, "landscape", needs_closure=True,
        defaults={"lr": 0.05, "momentum": 0.9, "sigma": 0.01, "num_samples": 4},
        reference="Bisla, Wang & Choromanska 2022, arXiv:2201.08025",
        summary="SGD on a Gaussian-smoothed loss (Monte-Carlo, filter-wise radius)",
        deviations={"complex": "the filter-wise Gaussian radius is defined for real weights",
                    "grad_replaced": "the Monte-Carlo smoothed gradient is what the step descends, and the "
                                     "estimate users inspect"},
    ))


_register()
