"""What an optimizer needs from the training loop, and the guard that refuses to step without it.

Pure PyTorch (no Lightning import), and public because the Lightning side reads it: the Lightning side is
:class:`~lightning_optsurvey.callbacks.OptimizerLoopAdapter`, which reads :func:`loop_needs` and *adopts*
the optimizers it serves. :func:`~lightning_optsurvey.optim.create_optimizer` tags every optimizer with its
spec and, when it has loop needs, installs a step pre-hook (:class:`GuardLoop`): stepped from Lightning's
training loop by an optimizer that no adapter adopted, it raises an error naming the optimizer and the line
to add, instead of training silently wrong (BatchNorm statistics counted several times per step, the
perturbed losses logged, plain SGD where SVRG was asked for, ...). In a plain PyTorch loop the closure is
the user's own and nothing is checked.

The needs (:data:`NEEDS`):

- ``"repeated_evaluations"``: ``step`` evaluates the closure several times (L-BFGS, the SAM family,
  Entropy-SGD, LPF-SGD, SVRG); only the first evaluation may update BatchNorm statistics and log;
  gradient accumulation and ``16-mixed`` cannot work;
- ``"create_graph"``: the backward pass must keep its graph (AdaHessian, Sophia-H);
- ``"snapshot"``: SVRG's full gradient at a snapshot once per epoch;
- ``"fisher_sampling"``: K-FAC with ``fisher="mc"`` back-propagates a loss on targets sampled from the
  network's outputs.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.optim import Optimizer

NEEDS = ("repeated_evaluations", "create_graph", "snapshot", "fisher_sampling")

#: The line that the guard's error asks for.
ADAPTER_LINE = "Trainer(..., callbacks=[OptimizerLoopAdapter()])"
ADAPTER_IMPORT = "from lightning_optsurvey.callbacks import OptimizerLoopAdapter"

# optimizer -> (registry name, spec, weak reference to the model given to create_optimizer or None)
_TAGS: weakref.WeakKeyDictionary[Optimizer, tuple[str, Any, Any]] = weakref.WeakKeyDictionary()
_ADOPTED: weakref.WeakSet[Optimizer] = weakref.WeakSet()


def tag(optimizer: Optimizer, name: str, spec: Any, model: nn.Module | None) -> None:
    """Remember which registry entry built ``optimizer`` (and for which model)."""
    _TAGS[optimizer] = (name, spec, weakref.ref(model) if model is not None else None)


def spec_of(optimizer: Optimizer) -> tuple[str, Any] | None:
    """``(name, spec)`` of the registry entry behind ``optimizer``, or ``None``.

    Optimizers built by ``create_optimizer`` carry their entry; others are matched by class against
    the entries whose factory *is* a class (``SAM(...)`` built by hand is found, ``torch.optim.SGD`` is
    ``"sgd"``).
    """
    tagged = _TAGS.get(optimizer)
    if tagged is not None:
        return tagged[0], tagged[1]
    from lightning_optsurvey.optim.registry import _REGISTRY, _ensure_loaded

    _ensure_loaded()
    for name, spec in _REGISTRY.items():
        if inspect.isclass(spec.factory) and type(optimizer) is spec.factory:
            return name, spec
    return None


def model_of(optimizer: Optimizer) -> nn.Module | None:
    """The model given to ``create_optimizer`` (K-FAC's network), if any and still alive."""
    tagged = _TAGS.get(optimizer)
    if tagged is None or tagged[2] is None:
        return None
    return tagged[2]()


def loop_needs(optimizer: Optimizer) -> tuple[str, ...]:
    """The subset of :data:`NEEDS` that ``optimizer`` has (empty for plain gradient steppers)."""
    found = spec_of(optimizer)
    needs = []
    if found is not None and found[1].needs_closure:
        needs.append("repeated_evaluations")
    if found is not None and found[1].create_graph:
        needs.append("create_graph")
    if getattr(type(optimizer), "requires_snapshot_callback", False):
        needs.append("snapshot")
    if callable(getattr(optimizer, "sample_fisher", None)) and optimizer.defaults.get("fisher") == "mc":
        needs.append("fisher_sampling")
    return tuple(needs)


def adopt(optimizer: Optimizer) -> None:
    """Mark ``optimizer`` as served by a loop adapter (the guard then lets it step)."""
    _ADOPTED.add(optimizer)


def release(optimizer: Optimizer) -> None:
    """Undo :func:`adopt`."""
    _ADOPTED.discard(optimizer)


def is_adopted(optimizer: Optimizer) -> bool:
    """Whether a loop adapter serves ``optimizer`` now."""
    return optimizer in _ADOPTED


def _from_lightning(obj: Any, depth: int = 0) -> bool:
    """Whether a closure was made by Lightning's loop (its precision plugin wraps every closure it passes)."""
    if obj is None or depth > 4:
        return False
    if isinstance(obj, functools.partial):
        return _from_lightning(obj.func, depth + 1) or any(_from_lightning(a, depth + 1) for a in obj.args)
    owner = getattr(obj, "__self__", None)
    candidates = [type(obj), getattr(obj, "__func__", obj)]
    if owner is not None:
        candidates.append(type(owner))
    for candidate in candidates:
        classes = candidate.__mro__ if inspect.isclass(candidate) else (candidate,)
        for cls in classes:
            module = getattr(cls, "__module__", None) or ""
            if module.startswith(("lightning.", "pytorch_lightning.")):
                return True
    return False


def describe(needs: tuple[str, ...]) -> str:
    """The needs in words, for error messages."""
    words = {
        "repeated_evaluations": "BatchNorm statistics and logging frozen on its repeated closure evaluations",
        "create_graph": "a backward pass with create_graph=True",
        "snapshot": "a full-gradient snapshot every epoch",
        "fisher_sampling": "Monte-Carlo Fisher sampling from the network's outputs",
    }
    return ", ".join(words[n] for n in needs)


class GuardLoop:
    """A step pre-hook refusing a Lightning step of an optimizer that no adapter adopted.

    A class rather than a closure so that an optimizer carrying it still pickles.
    """

    def __init__(self, name: str, needs: tuple[str, ...]) -> None:
        self.name, self.needs = name, needs

    def __call__(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if optimizer in _ADOPTED:
            return
        closure = kwargs.get("closure", args[0] if args else None)
        if _from_lightning(closure):
            raise RuntimeError(
                f"optimizer {self.name!r} needs {describe(self.needs)} from Lightning's training loop, and no "
                f"OptimizerLoopAdapter is attached to this Trainer. Add the one line "
                f"`{ADAPTER_LINE}` ({ADAPTER_IMPORT}), or return [OptimizerLoopAdapter()] from your "
                "LightningModule's configure_callbacks. (An installed lightning-optsurvey attaches it to "
                "every Trainer through Lightning's `lightning.pytorch.callbacks_factory` entry point.)"
            )


def install_guard(optimizer: Optimizer, name: str) -> None:
    """Install :class:`GuardLoop` on ``optimizer`` when it has loop needs."""
    needs = loop_needs(optimizer)
    if needs:
        optimizer.register_step_pre_hook(GuardLoop(name, needs))


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
