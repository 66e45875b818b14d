"""Sharpness-aware minimization (SAM) and its adaptive form (ASAM), wrapped around any base optimizer.

Why ours and not pytorch-optimizer's ``SAM`` (4.1.0): its ``step(closure)`` assumes the gradient at the
current weights was computed *before* ``step`` and evaluates the closure only once, at the perturbed
weights. Under Lightning's automatic optimization the forward/backward happens *inside* the closure, so
the ascent direction is the gradient left over from the previous step (29 steps gave 29 ``training_step``
calls instead of 58). It also makes the wrapper and the base optimizer own the same ``param_groups`` and
``state`` objects, which ``load_state_dict`` has to re-tie by hand.

Here ``step(closure)`` evaluates the closure twice (at ``w`` and at ``w + e(w)``); the base optimizer is a
private engine re-pointed at this object's ``param_groups`` and ``state`` before every use, so there is
one set of groups (learning-rate schedulers, ``add_param_group`` and checkpoints see it) and all state is in
``self.state``. Nothing of SAM's own is stored between steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_optsurvey.optim._common import WrappedBaseMixin, call_closure, require_closure, unhooked_step
from lightning_optsurvey.validation import check_bool, check_number

BaseOptimizer = str | type[Optimizer] | Callable[..., Optimizer]


def _build_base(base: BaseOptimizer, groups: list[dict[str, Any]], base_kwargs: dict[str, Any]) -> Optimizer:
    from lightning_optsurvey.optim.registry import create_optimizer, get_spec

    if isinstance(base, str):
        spec = get_spec(base)
        if spec.needs_closure or spec.create_graph or spec.needs_model:
            raise ValueError(
                f"base optimizer {base!r} cannot be wrapped: the base must take a plain step on the gradient "
                f"(needs_closure={spec.needs_closure}, create_graph={spec.create_graph}, "
                f"needs_model={spec.needs_model})"
            )
        return create_optimizer(base, groups, **base_kwargs)
    if inspect.isclass(base) and issubclass(base, Optimizer):
        return base(groups, **base_kwargs)
    raise TypeError(
        f"base must be a registered optimizer name or a torch.optim.Optimizer subclass, got {base!r}"
    )


class SAM(WrappedBaseMixin, Optimizer):
    r"""Sharpness-aware minimization around any base optimizer.

    Each step solves the inner maximization of :math:`\min_w \max_{\|\epsilon\|\le\rho} L(w+\epsilon)` to first
    order and hands the gradient at the perturbed point to the base optimizer:

    .. math::
        g = \nabla L(w), \quad
        \hat\epsilon = \rho\, \frac{T_w^2\, g}{\| T_w\, g \|_2}, \quad
        w \leftarrow \mathrm{base}\big(w, \nabla L(w + \hat\epsilon)\big),

    with :math:`T_w = I` for SAM and :math:`T_w = \mathrm{diag}(|w| + \eta)` for ASAM (``adaptive=True``).
    The norm is taken over all parameter groups; ``rho``, ``adaptive`` and ``eta`` may differ per group.
    A group with ``maximize=True`` (when the base optimizer takes ``maximize``) maximizes the loss: its
    perturbation points down the gradient and the base ascends.

    The base optimizer's ``step`` runs without step hooks: hooks registered on this optimizer, and the
    global ones (``torch.optim.optimizer.register_optimizer_step_pre_hook``), fire once per ``step``.
    ``copy.deepcopy`` and pickling keep the base, so a copy continues identically.

    ``step(closure)`` calls the closure twice; the closure must zero the gradients, recompute the loss and
    call ``backward`` (Lightning's automatic optimization passes such a closure). The loss returned is the
    one at :math:`w`. Under Lightning, gradient clipping applies to both gradients (harmless for the
    ascent, which is normalized); gradient accumulation is refused by ``ClassifierModule`` because the
    second evaluation would only see the last micro-batch.

    Args:
        params: Parameters or parameter groups.
        base: The base optimizer: a registry name (``"sgd"``, ``"adam"``, ...) or a
            ``torch.optim.Optimizer`` subclass.
        rho: Radius of the neighbourhood, ``>= 0``; ``rho=0`` reproduces the base optimizer.
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset in :math:`T_w` (``>= 0``); ignored unless ``adaptive``.
        **base_kwargs: Hyperparameters of the base optimizer (registry defaults apply to names).

    Raises:
        ValueError: For a negative ``rho``/``eta``, an unknown base name or a base that needs a closure,
            Hessian graph or model.
        TypeError: For a ``base`` that is neither a name nor an optimizer class.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(3, 1)
        >>> opt = SAM(net.parameters(), base="sgd", rho=0.05, lr=0.1, momentum=0.9)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = net(torch.ones(4, 3)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)

    References:
        Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
        Generalization", ICLR 2021, arXiv:2010.01412.
        Kwon, Kim, Park & Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
        of Deep Neural Networks", ICML 2021, arXiv:2102.11600.
    """

    def __init__(
        self,
        params: Any,
        base: BaseOptimizer = "sgd",
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        check_number("rho", rho)
        check_number("eta", eta)
        check_bool("adaptive", adaptive)
        super().__init__(params, {"rho": rho, "adaptive": adaptive, "eta": eta})
        engine = _build_base(base, self.param_groups, dict(base_kwargs))
        self._adopt_base(engine)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_base"):
            self._bind_base()

    def _perturbation(self) -> tuple[list[Tensor], list[Tensor]]:
        r"""Parameters with a gradient and their ascent perturbations :math:`\hat\epsilon`."""
        per_group: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] = []
        squares: list[Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["adaptive"]:
                scales = torch._foreach_add(torch._foreach_abs(params), group["eta"])
                scaled = torch._foreach_mul(grads, scales)
            else:
                scales, scaled = None, grads
            squares.extend(torch._foreach_norm(scaled))
            per_group.append((group, params, scales if scales is not None else []))
        if not squares:
            return [], []
        norm = torch.linalg.vector_norm(torch.stack([s.to(squares[0].device) for s in squares]))
        all_params: list[Tensor] = []
        perturbations: list[Tensor] = []
        for group, params, scales in per_group:
            factor = group["rho"] / (norm + 1e-12)
            if group.get("maximize", False):
                factor = -factor  # ascend the loss: the worst neighbour is downhill
            grads = [p.grad for p in params]
            if group["adaptive"]:
                e = torch._foreach_mul(grads, torch._foreach_mul(scales, scales))
                torch._foreach_mul_(e, factor)
            else:
                e = torch._foreach_mul(grads, factor)
            all_params.extend(params)
            perturbations.extend(e)
        return all_params, perturbations

    def _descent_gradients(self, params: list[Tensor], ascent_grads: list[Tensor]) -> dict[Tensor, Tensor]:
        """The base's input where it is not the gradient at the perturbed point in ``p.grad`` (SAM: none)."""
        return {}

    def _needs_ascent_grads(self) -> bool:
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Two closure evaluations, then one step of the base optimizer.

        Args:
            closure: Zeroes the gradients, recomputes the loss and calls ``backward``; required.

        Returns:
            The loss at the unperturbed weights (the first evaluation).

        Raises:
            ValueError: If no closure is given.
        """
        closure = require_closure(type(self).__name__, closure)
        self._bind_base()
        loss = call_closure(closure)
        params, perturbations = self._perturbation()
        if params:
            ascent = [p.grad.clone() for p in params] if self._needs_ascent_grads() else []
            saved = [p.detach().clone() for p in params]
            torch._foreach_add_(params, perturbations)
            try:
                call_closure(closure)
            finally:
                torch._foreach_copy_(params, saved)
            directions = self._descent_gradients(params, ascent)
        else:
            directions = {}
        # The base reads .grad: hand it the directions, then give back the gradients the closure computed.
        computed = {p: p.grad for p in directions}
        for p, d in directions.items():
            p.grad = d
        try:
            unhooked_step(self._base)
        finally:
            for p, g in computed.items():
                p.grad = g
        return loss


#: What SAM-type entries declare (shared with GSAM).
_DEVIATIONS = {"complex": "the neighbourhood radius is defined for real weights only"}


def _register() -> None:
    from functools import partial

    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    register(OptimizerSpec(
        "sam", SAM, "landscape", needs_closure=True, strict=False,
        defaults={"base": "momentum", "rho": 0.05},
        reference="Foret, Kleiner, Mobahi & Neyshabur 2021, arXiv:2010.01412",
        summary="sharpness-aware minimization around a base optimizer (two closure evaluations)",
        deviations=_DEVIATIONS,
    ))
    register(OptimizerSpec(
        "asam", partial(SAM, adaptive=True), "landscape", needs_closure=True, strict=False,
        defaults={"base": "momentum", "rho": 0.5, "eta": 0.01},
        reference="Kwon, Kim, Park & Choi 2021, arXiv:2102.11600",
        summary="adaptive (scale-invariant) SAM",
        deviations=_DEVIATIONS,
    ))


_register()
