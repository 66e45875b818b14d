"""Small helpers shared by our optimizers.

Closure calls, generator state in ``self.state``, the heavy-ball update, copy/pickle support. Argument
checks are :mod:`lightning_optsurvey.validation`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_optsurvey.validation import check_int, check_lr, check_number

_RNG_KEY = "generator"


def reject_complex(owner: str, param_groups: list[dict[str, Any]]) -> None:
    """Raise a ``ValueError`` if any parameter is complex (``owner`` does not support complex parameters).

    Raises:
        ValueError: Naming the first complex parameter's shape and dtype.
    """
    for group in param_groups:
        for p in group["params"]:
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(
                    f"{owner} does not support complex parameters (got one of shape {tuple(p.shape)} and dtype "
                    f"{p.dtype}); optimize torch.view_as_real(param) instead"
                )


class FullStateMixin:
    """Mixin for our ``torch.optim.Optimizer`` subclasses: copies, pickles and old checkpoints continue.

    ``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, so a
    ``copy.deepcopy`` or pickle of a subclass loses every other attribute (a base optimizer, a generator,
    a schedule) and the copy's ``step`` fails. Here every attribute is kept except the hook registries
    (torch does not copy hooks either) and the names in ``_TRANSIENT`` (rebuilt by ``_restore``).
    ``__setstate__`` (which ``load_state_dict`` calls too) fills every group's missing keys from
    ``defaults``, so a state dict saved before a flag existed (``maximize``, ``foreach``, ...) loads.
    """

    _TRANSIENT: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {
            k: v for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_") and k not in self._TRANSIENT
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)  # type: ignore[misc]
        if not had_differentiable:
            # torch's __setstate__ adds it for its own optimizers' decorators; ours never read it, and a
            # loaded optimizer's state dict should equal a fresh one's.
            self.defaults.pop("differentiable", None)  # type: ignore[attr-defined]
        for group in self.param_groups:  # type: ignore[attr-defined]
            for key, value in self.defaults.items():  # type: ignore[attr-defined]
                group.setdefault(key, value)
        self._restore()

    def _restore(self) -> None:
        """Rebuild what ``_TRANSIENT`` dropped (after unpickling and after ``load_state_dict``)."""


class WrappedBaseMixin(FullStateMixin):
    """A wrapper optimizer (SAM, Lookahead) that shares one set of ``param_groups`` and ``state`` with its base.

    :meth:`_adopt_base` fills the wrapper's groups with the base's defaults and binds the base to them, so
    checkpoints, schedulers and ``add_param_group`` see a single optimizer.
    """

    _base: torch.optim.Optimizer

    def _adopt_base(self, engine: torch.optim.Optimizer) -> None:
        # A base that copied the group dicts still gets its defaults into ours, the one set of groups.
        for ours, theirs in zip(self.param_groups, engine.param_groups):  # type: ignore[attr-defined]
            for key, value in theirs.items():
                ours.setdefault(key, value)
        self.defaults = {**engine.defaults, **self.defaults}  # type: ignore[has-type]
        self._base = engine
        self._bind_base()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self._base).__name__}, groups={len(self.param_groups)})"  # type: ignore[attr-defined]

    def _bind_base(self) -> None:
        self._base.param_groups = self.param_groups  # type: ignore[attr-defined]
        self._base.state = self.state  # type: ignore[attr-defined]

    def _restore(self) -> None:
        if "_base" in self.__dict__:
            # The base's own __setstate__ applies its backward-compatibility fixes (flags missing from
            # old groups, Python-number steps) to the one set of groups and state, and re-binds it.
            self._base.__setstate__({"state": self.state, "param_groups": self.param_groups})  # type: ignore[attr-defined]
            self._bind_base()


def unhooked_step(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
    """Call ``optimizer.step`` without its step hooks and without the global ones.

    ``torch.optim.Optimizer`` wraps every subclass's ``step`` so that it fires the global
    ``register_optimizer_step_pre/post_hook`` hooks; an optimizer that steps an inner one (SAM's base,
    Lookahead's fast optimizer) would otherwise fire them twice per step.
    """
    step = type(optimizer).step
    raw = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
    return raw(optimizer) if closure is None else raw(optimizer, closure)


def require_closure(name: str, closure: Callable[[], Any] | None) -> Callable[[], Any]:
    """Return ``closure`` or raise a ``ValueError`` explaining that ``name`` evaluates it itself."""
    if closure is None or not callable(closure):
        raise ValueError(
            f"{name}.step needs a closure that zeroes the gradients, recomputes the loss and calls backward; "
            f"got {closure!r}. Under Lightning's automatic optimization the closure is passed for you."
        )
    return closure


def call_closure(closure: Callable[[], Any]) -> Any:
    """Evaluate a closure with gradients enabled (``step`` itself runs under ``torch.no_grad``)."""
    with torch.enable_grad():
        return closure()


def params_with_grad(param_groups: list[dict[str, Any]]) -> list[Tensor]:
    """Parameters of all groups whose gradient is not ``None``, in group order."""
    return [p for group in param_groups for p in group["params"] if p.grad is not None]


def heavy_ball(state: dict[Any, Any], p: Tensor, d_p: Tensor, momentum: float) -> Tensor:
    r"""The heavy-ball direction :math:`b \leftarrow m b + d`, kept in ``state[p]["momentum_buffer"]``.

    As ``torch.optim.SGD`` without dampening: the first call starts the buffer at a copy of ``d_p``. With
    ``momentum == 0`` nothing is stored (``state[p]`` is not even created) and ``d_p`` is returned.
    """
    if not momentum:
        return d_p
    param_state = state[p]
    buf = param_state.get("momentum_buffer")
    if buf is None:
        param_state["momentum_buffer"] = buf = d_p.clone()
    else:
        buf.mul_(momentum).add_(d_p)
    return buf


class StateGenerator:
    """A ``torch.Generator`` whose state lives in an optimizer's ``state`` (so checkpoints resume exactly).

    ``fetch`` returns a generator on ``device`` positioned where the last ``store`` left it, or seeded with
    ``seed`` on first use; ``store`` writes its position back into ``state``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The position lives in the optimizer's state; the generator object is a cache.
        return {"seed": self.seed, "_generator": None}

    def fetch(self, state: dict[Any, Any], device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        saved = state.get(_RNG_KEY)
        if saved is None:
            self._generator.manual_seed(self.seed)
        else:
            # Checkpoint loaders may have moved the byte tensor to the parameters' device.
            self._generator.set_state(saved["state"].cpu())
        return self._generator

    def store(self, state: dict[Any, Any]) -> None:
        if self._generator is not None:
            state[_RNG_KEY] = {"state": self._generator.get_state()}


def check_heavy_ball(lr: Any, momentum: Any) -> None:
    """Check the learning rate (``> 0``) and the heavy-ball momentum (in ``[0, 1)``) of a momentum method."""
    check_lr(lr)
    check_number("momentum", momentum, high=1.0, high_open=True)


class SeededClosureOptimizer(FullStateMixin, Optimizer):
    """Base of the optimizers whose step evaluates the closure several times at randomly moved weights.

    Entropy-SGD and LPF-SGD: a generator seeded with ``seed`` whose position lives in ``self.state`` (so a
    checkpoint resumes the same noise), a step counter in ``self.state[_STEP_KEY]``, and a required closure.
    """

    _STEP_KEY = ""

    def __init__(self, params: Any, defaults: dict[str, Any], seed: int) -> None:
        check_int("seed", seed, low=0)
        super().__init__(params, defaults)  # type: ignore[call-arg]
        self._rng = StateGenerator(seed)

    def _begin_step(self, closure: Callable[[], Any] | None) -> tuple[Callable[[], Any], dict[str, int]]:
        """The closure (``ValueError`` if missing) and the step counter."""
        closure = require_closure(type(self).__name__, closure)
        return closure, self.state.setdefault(self._STEP_KEY, {"step": 0})  # type: ignore[attr-defined]
