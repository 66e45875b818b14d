"""Small helpers shared by our optimizers and the task module.

Argument checks, closure calls, generator state in ``self.state``, the heavy-ball update, and forward
passes that leave BatchNorm's running statistics alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_optsurvey.validation import (  # noqa: F401  (re-exported: the optimizers import them here)
    check_bool,
    check_float_hparam,
    check_int,
    check_lr,
    check_number,
    describe,
    is_real,
)

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


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Run forward passes in train mode without changing any BatchNorm running statistic.

    Batch statistics are still used for normalization, exactly as in a normal training forward. The
    running statistics are not *restored* afterwards but never written: ``track_running_stats`` is switched
    off for the duration, so the buffers are not even touched in place. (Copying saved values back after
    the forward bumps the buffers' autograd version, and the backward of that forward then fails with
    "modified by an inplace operation".)
    """
    switched = [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


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
