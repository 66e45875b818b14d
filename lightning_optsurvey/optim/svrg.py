"""SVRG: stochastic variance-reduced gradient, with the snapshot taken by a Lightning callback.

Why ours: no maintained package offers SVRG as an optimizer that fits a training loop; it needs the
full gradient at a snapshot once per epoch and a second gradient evaluation, on the same mini-batch, at
the snapshot. :class:`SVRG` does the second evaluation inside ``step(closure)`` (at the snapshot weights,
with the same random state, so dropout masks match) and keeps the snapshot and its full gradient in
``self.state``; :class:`~lightning_optsurvey.callbacks.SVRGSnapshot` (Lightning-side, so not here) computes
the full gradient at the start of each epoch, and :class:`~lightning_optsurvey.callbacks.OptimizerLoopAdapter`
runs one for any module whose optimizer is SVRG.
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
    check_heavy_ball,
    heavy_ball,
    require_closure,
)
from lightning_optsurvey.validation import check_number

_SNAPSHOT_KEY = "svrg"


def _rng_states(params: list[Tensor]) -> list[tuple[str, Any]]:
    states: list[tuple[str, Any]] = [("cpu", torch.get_rng_state())]
    for device in {p.device for p in params if p.device.type == "cuda"}:
        states.append((str(device), torch.cuda.get_rng_state(device)))
    return states


def _set_rng_states(states: list[tuple[str, Any]]) -> None:
    for device, state in states:
        if device == "cpu":
            torch.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state, device)


class SVRG(FullStateMixin, Optimizer):
    r"""Stochastic variance-reduced gradient (with optional momentum).

    With a snapshot :math:`\tilde w` and its full gradient :math:`\tilde\mu = \nabla F(\tilde w)`, each step on a
    mini-batch :math:`i` uses

    .. math::
        v = \nabla f_i(w) - \nabla f_i(\tilde w) + \tilde\mu, \qquad b \leftarrow m b + v + \text{wd}\,w,
        \qquad w \leftarrow w - \eta b .

    ``step(closure)`` evaluates the closure at :math:`w` (the evaluation that is logged and whose loss is
    returned) and, once a snapshot exists, again at :math:`\tilde w` with the same RNG state. Before the first
    snapshot the step is plain SGD, and so it is for parameters added (``add_param_group``) after the last
    one: they stay at their current values in the second evaluation. :meth:`snapshot` stores the current
    weights and their ``.grad`` (which the caller has filled with the full gradient); :class:`SVRGSnapshot`
    does this every epoch under Lightning. A snapshot at every step makes the method full-batch gradient descent.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate :math:`\eta > 0`.
        momentum: Momentum :math:`m \in [0, 1)` (0 in the paper).
        weight_decay: L2 coefficient, ``>= 0``.

    Raises:
        ValueError: For an out-of-range hyperparameter.

    References:
        Johnson & Zhang, "Accelerating Stochastic Gradient Descent using Predictive Variance Reduction",
        NeurIPS 2013, papers.nips.cc/paper/4937.
    """

    #: Under Lightning the snapshot is taken by ``callbacks.SVRGSnapshot``, which ``OptimizerLoopAdapter`` runs.
    requires_snapshot_callback = True

    def __init__(self, params: Any, lr: float = 0.05, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        check_heavy_ball(lr, momentum)
        check_number("weight_decay", weight_decay)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @property
    def snapshot_tag(self) -> Any:
        """The ``tag`` given to the last :meth:`snapshot` (``None`` before the first)."""
        return self.state.get(_SNAPSHOT_KEY, {}).get("tag")

    @torch.no_grad()
    def snapshot(self, tag: Any = None) -> None:
        """Take the current weights as the snapshot and their ``.grad`` as its full gradient.

        Parameters without a gradient get a zero full gradient.

        Args:
            tag: Any value remembered with the snapshot (the callback stores the epoch).
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["snapshot"] = p.detach().clone()
                state["full_grad"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        self.state[_SNAPSHOT_KEY] = {"tag": tag}  # type: ignore[index]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One variance-reduced step.

        Args:
            closure: Zeroes the gradients, recomputes the loss and calls ``backward``; required.

        Returns:
            The loss at the current weights.

        Raises:
            ValueError: If no closure is given.
        """
        closure = require_closure("SVRG", closure)
        params = [p for group in self.param_groups for p in group["params"]]
        have_snapshot = _SNAPSHOT_KEY in self.state
        rng = _rng_states(params) if have_snapshot else []
        loss = call_closure(closure)
        directions: dict[Tensor, Tensor] = {p: p.grad.clone() for p in params if p.grad is not None}
        # Parameters added after the snapshot (add_param_group) stay put and take SGD steps until the next.
        snapped = [p for p in params if "snapshot" in self.state.get(p, {})]
        if have_snapshot and directions and snapped:
            current = [p.detach().clone() for p in snapped]
            torch._foreach_copy_(snapped, [self.state[p]["snapshot"] for p in snapped])
            _set_rng_states(rng)  # same dropout masks as the first evaluation
            try:
                call_closure(closure)
            finally:
                torch._foreach_copy_(snapped, current)
            for p in snapped:
                v = directions.get(p)
                if v is None:
                    continue
                if p.grad is not None:
                    v.sub_(p.grad)
                v.add_(self.state[p]["full_grad"])
        for group in self.param_groups:
            lr, m, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p not in directions:
                    continue
                d_p = directions[p]
                if wd:
                    d_p.add_(p, alpha=wd)
                d_p = heavy_ball(self.state, p, d_p, m)
                p.add_(d_p, alpha=-lr)
        return loss


def _register() -> None:
    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    register(OptimizerSpec(
        "svrg", SVRG, "first_order", needs_closure=True,
        defaults={"lr": 0.05, "momentum": 0.9},
        reference="Johnson & Zhang 2013, papers.nips.cc/paper/4937",
        summary="variance-reduced SGD (here with momentum) with a full gradient each epoch",
        deviations={"complex": "the snapshot correction is implemented for real weights"},
    ))


_register()
