"""Lookahead around any registered base optimizer.

Why ours and not pytorch-optimizer's ``Lookahead`` (4.1.0), which the registry used before: a wrapper
cannot make it behave as a ``torch.optim.Optimizer``. Its ``state_dict`` has a layout of its own
(``lookahead_state``/``base_optimizer``, no ``param_groups``/``state``), so checkpoint tools and
torch's state-dict hooks fail (the hooks raise ``AttributeError``: its ``__init__`` never creates their
registries); its ``step`` calls the base optimizer's hooked ``step``, so the global step hooks
(``register_optimizer_step_pre/post_hook``) fire twice per step; and ``copy.deepcopy`` fails. The
algorithm is a few lines, so it is written here in the same shape as
:class:`~lightning_optsurvey.optim.sam.SAM`: the base optimizer is a private engine re-pointed at this
object's ``param_groups`` and ``state`` before every use (one set of groups for schedulers and
``add_param_group``; one ``state`` holding the base's buffers and the slow weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_optsurvey.optim._common import WrappedBaseMixin, unhooked_step
from lightning_optsurvey.validation import check_choice, check_int, check_number

_PULLBACK = ("none", "reset", "pullback")
_STEP_KEY = "lookahead"


class Lookahead(WrappedBaseMixin, Optimizer):
    r"""Lookahead: ``k`` fast steps of a base optimizer, then the slow weights move part of the way.

    Slow weights :math:`\phi` start at the weights of the first step; after every ``k``-th base step,

    .. math:: \phi \leftarrow \phi + \alpha (\theta - \phi), \qquad \theta \leftarrow \phi .

    ``pullback_momentum`` treats the base's ``momentum_buffer`` (SGD-type bases) at that moment: ``"none"``
    leaves it, ``"reset"`` zeroes it, ``"pullback"`` interpolates it with a slow copy in the same way.
    They are stored in the groups as ``lookahead_k``, ``lookahead_alpha`` and
    ``lookahead_pullback_momentum`` (a base may have an ``alpha`` of its own) and may differ per group (a
    group counts its own steps in ``lookahead_step``).

    Args:
        params: Parameters or parameter groups.
        base: Registry name of the fast optimizer; it must not need a closure, a Hessian graph or the model.
        k: Fast steps between slow-weight updates (>= 1).
        alpha: Slow-weight step size, in [0, 1].
        pullback_momentum: ``"none"``, ``"reset"`` or ``"pullback"``.
        **base_kwargs: Hyperparameters of the base optimizer (its registry defaults apply).

    Raises:
        ValueError: For an unknown or unsuitable base, or a bad ``k``/``alpha``/``pullback_momentum``.
        TypeError: For a ``k`` that is not an integer or an ``alpha`` that is not a number.

    References:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019,
        arXiv:1907.08610.
    """

    def __init__(self, params: Any, base: str = "adam", k: int = 5, alpha: float = 0.5,
                 pullback_momentum: str = "none", **base_kwargs: Any) -> None:
        from lightning_optsurvey.optim.registry import create_optimizer, get_spec

        check_int("k", k)
        check_number("alpha", alpha, high=1.0)
        check_choice("pullback_momentum", pullback_momentum, _PULLBACK)
        spec = get_spec(base)
        if spec.needs_closure or spec.create_graph or spec.needs_model:
            raise ValueError(f"lookahead's base must take plain gradient steps; {base!r} cannot")
        # Prefixed group keys: a base may have its own "alpha" (RMSprop) or "k".
        super().__init__(params, {"lookahead_k": k, "lookahead_alpha": alpha,
                                  "lookahead_pullback_momentum": pullback_momentum})
        engine = create_optimizer(base, self.param_groups, **base_kwargs)
        self._adopt_base(engine)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; one saved by pytorch-optimizer's ``Lookahead`` (earlier releases) is converted."""
        if "lookahead_state" in state_dict and "base_optimizer" in state_dict:
            state_dict = _from_pytorch_optimizer(state_dict)
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "_base" in self.__dict__:
            self._bind_base()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One fast step of the base optimizer; every ``k``-th, the slow-weight update.

        Args:
            closure: Optional; passed to the base optimizer.

        Returns:
            The closure's loss, or ``None``.
        """
        self._bind_base()
        # Slow weights start at the weights before the first step; stored after the base's step, whose
        # lazy state initialization looks for an empty per-parameter state.
        starts = {p: p.detach().clone() for group in self.param_groups for p in group["params"]
                  if "slow_params" not in self.state.get(p, {})}
        if closure is None:
            loss = unhooked_step(self._base)
        else:
            loss = unhooked_step(self._base, closure)
        for p, start in starts.items():
            if p.grad is not None:
                self.state[p]["slow_params"] = start
        for group in self.param_groups:
            group["lookahead_step"] = group.get("lookahead_step", 0) + 1
            if group["lookahead_step"] % group["lookahead_k"]:
                continue
            alpha = group["lookahead_alpha"]
            for p in group["params"]:
                state = self.state[p]
                slow = state.get("slow_params")
                if slow is None:
                    continue
                slow.add_(p - slow, alpha=alpha)
                p.copy_(slow)
                buf = state.get("momentum_buffer")
                if buf is None:
                    continue
                if group["lookahead_pullback_momentum"] == "reset":
                    buf.zero_()
                elif group["lookahead_pullback_momentum"] == "pullback":
                    slow_buf = state.setdefault("slow_momentum", torch.zeros_like(buf))
                    slow_buf.add_(buf - slow_buf, alpha=alpha)
                    buf.copy_(slow_buf)
        return loss


def _from_pytorch_optimizer(saved: dict[str, Any]) -> dict[str, Any]:
    """A state dict of pytorch-optimizer's Lookahead as a standard one of :class:`Lookahead`.

    Its layout: ``lookahead_state`` keyed by (group, index), and the base's state dict in ``base_optimizer``.
    """
    base = saved["base_optimizer"]
    state = {k: dict(v) for k, v in base["state"].items()}
    groups = []
    for gi, group in enumerate(base["param_groups"]):
        group = dict(group)
        if "counter" in group:
            group["lookahead_step"] = group.pop("counter")
        for pi, index in enumerate(group["params"]):
            extra = saved["lookahead_state"].get((gi, pi), {})
            if "slow_params" in extra:
                state.setdefault(index, {})["slow_params"] = extra["slow_params"]
            if "slow_momentum" in extra:
                state.setdefault(index, {})["slow_momentum"] = extra["slow_momentum"]
        groups.append(group)
    return {"state": state, "param_groups": groups}
