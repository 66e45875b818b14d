"""Registry entries for the survey's methods that pytorch-optimizer implements well enough to reuse.

Each class is used through a thin subclass (:func:`conforming`) that makes it behave as a
``torch.optim.Optimizer`` in the respects PyTorch's generic optimizer tests check
(``tests/optim/test_torch_battery.py``), which the library's classes (4.1.0) do not:

- ``maximize`` is honoured per parameter group (the library reads one instance attribute, so a group's
  ``maximize`` was silently ignored) and the gradient is negated into a copy: the library negates
  ``.grad`` in place (and LARS overwrites ``.grad`` at every step), so after ``step`` the caller's
  gradients were changed. The subclass hands the library copies and puts the originals back.
- ``lr`` is validated as torch does: a tensor ``lr`` is refused at construction with a ``ValueError``
  (the library accepted a ``(1,)`` tensor and crashed at ``step``, and a 2-element one gave
  ``Boolean value of Tensor ... is ambiguous``); NaN, infinite or non-numeric values are refused by the
  registry's shared rule.
- ``copy.deepcopy`` and pickling keep the instance attributes the library's ``step`` reads (torch's
  ``Optimizer.__getstate__`` drops them); a state dict saved without ``maximize``/``foreach`` loads.
- the library's ``step`` is called without firing the step hooks a second time.
- AdaBound: a group added by ``add_param_group`` gets its base learning rate (the library indexed a
  list built at construction: ``IndexError`` at the first step after it).
- AdaHessian, Sophia-H: a parameter whose gradient does not depend on the parameters (a loss linear in
  it) has a zero Hessian; the library's Hutchinson product raised for it. Without any gradient graph the
  error says to call ``backward(create_graph=True)``.

The price is one copy of the gradients per step (the library writes into what it is given):
``benchmarks/optimizer_step.py`` times each entry beside the raw library class (``po:<name>``); on the
1.1M-parameter MLP the iteration cost rose by 8-21% on a shared 2-core CPU (AdaBelief, Yogi, AdaHessian).

Lookahead is ours (:mod:`~lightning_optsurvey.optim.lookahead`): no wrapper can give the library's
class a standard state dict.

Each entry passed the registry-wide conformance suite (``tests/optim/test_conformance.py``). Those that
did not are ours, each in its own module with the reason in its docstring: ``sam``/``asam``
(:mod:`~lightning_optsurvey.optim.sam`: one closure evaluation under Lightning, stale ascent) and
``gsam`` (:mod:`~lightning_optsurvey.optim.gsam`: needs the model and a rho scheduler to be built),
``shampoo`` (:mod:`~lightning_optsurvey.optim.shampoo`: zero updates until the first root computation,
diverges on digits).

``adahessian`` is pytorch-optimizer's with the paper's ``eps=1e-4``: with the library's default
``eps=1e-16`` a bias feeding a BatchNorm layer (zero gradient and zero Hessian up to round-off) gets
steps of size ``lr * 1e-9 / 1e-16``; training loss still falls (BatchNorm removes the bias in train mode)
but the running mean cannot follow, and validation accuracy stays at chance. The conformance suite
trains a BatchNorm MLP and judges validation accuracy in eval mode to catch exactly this.

pytorch-optimizer signals some bad values with its own exception classes (``NegativeLRError``,
``NegativeStepError``) that are not ``ValueError``; the factories here translate them, so every registry
entry rejects bad hyperparameters the same way. Defaults are tuned for the digits task.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytorch_optimizer as po
import torch
from pytorch_optimizer.base.exception import NegativeLRError, NegativeStepError
from torch import Tensor
from torch.optim import Optimizer

from lightning_optsurvey.optim._common import FullStateMixin
from lightning_optsurvey.optim.lookahead import Lookahead
from lightning_optsurvey.optim.registry import OptimizerSpec, register
from lightning_optsurvey.validation import check_bool

#: Library classes whose ``step`` takes Hutchinson products of the gradient (``create_graph`` backward).
_HESSIAN = (po.AdaHessian, po.SophiaH)


def _raw_step(cls: type[Optimizer]) -> Callable[..., Any]:
    step = cls.step
    return getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step


def conforming(cls: type[Optimizer]) -> type[Optimizer]:
    """A subclass of a pytorch-optimizer class that behaves as a ``torch.optim.Optimizer`` (module docstring).

    The constructor's signature is the library's (so the registry's keyword checks apply).
    """

    class Conforming(FullStateMixin, cls):  # type: ignore[valid-type, misc]
        def __init__(self, params: Any, *args: Any, maximize: bool = False, **hparams: Any) -> None:
            check_bool("maximize", maximize)
            lr = hparams.get("lr", args[0] if args else None)
            if isinstance(lr, Tensor):
                raise ValueError(f"{cls.__name__}: lr as a Tensor is not supported; pass a float, got {lr!r}")
            try:
                super().__init__(params, *args, **hparams)
            except (NegativeLRError, NegativeStepError) as err:
                raise ValueError(f"{cls.__name__}: {err}") from err
            self.maximize = False  # the library's one flag; the groups' own flags are applied in step
            self.defaults["maximize"] = maximize
            for group in self.param_groups:
                group.setdefault("maximize", maximize)

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            super().add_param_group(param_group)
            base_lrs = self.__dict__.get("base_lrs")
            if base_lrs is not None and len(base_lrs) < len(self.param_groups):  # AdaBound
                base_lrs.extend(group["lr"] for group in self.param_groups[len(base_lrs):])

        def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            originals: list[tuple[Tensor, Tensor]] = []
            hessian = isinstance(self, _HESSIAN)
            with torch.enable_grad():  # copies keep a create_graph gradient's graph
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        g = p.grad
                        originals.append((p, g))
                        p.grad = -g if group["maximize"] else g.clone()
                if hessian and originals:
                    self._graph_every_gradient([p for p, _ in originals])
            try:
                _raw_step(cls)(self)
            finally:
                for p, g in originals:
                    p.grad = g
            return loss

        @staticmethod
        def _graph_every_gradient(params: list[Tensor]) -> None:
            if not any(p.grad.requires_grad for p in params):
                raise RuntimeError(
                    f"{cls.__name__} takes Hessian-vector products of the gradient: run "
                    "loss.backward(create_graph=True) before step (the registry's spec says create_graph)"
                )
            for p in params:
                # A gradient that does not depend on p (a loss linear in p, or a bias after BatchNorm)
                # has a zero Hessian block; a zero-weight link to p makes autograd say so instead of
                # raising that p "appears to not have been used in the graph".
                p.grad = p.grad + p * 0

    Conforming.__name__ = Conforming.__qualname__ = cls.__name__
    Conforming.__module__ = __name__
    Conforming.__doc__ = (cls.__doc__ or "") + "\n\n(pytorch-optimizer's class, made torch-conforming by " \
        "lightning_optsurvey.optim._external.conforming.)"
    Conforming.__signature__ = inspect.signature(cls)  # type: ignore[attr-defined]
    globals()[cls.__name__] = Conforming  # picklable by qualified name
    return Conforming


def _translated(cls: type[Optimizer]) -> type[Optimizer]:
    """The conforming subclass, used as the registry factory (a module-level class: specs pickle)."""
    return conforming(cls)


def lookahead(params: Any, base: str = "adam", k: int = 5, alpha: float = 0.5, pullback_momentum: str = "none",
              **base_kwargs: Any) -> Optimizer:
    """:class:`~lightning_optsurvey.optim.lookahead.Lookahead` (kept as a function for the registry)."""
    return Lookahead(params, base=base, k=k, alpha=alpha, pullback_momentum=pullback_momentum, **base_kwargs)


_DEVIATIONS = {"complex": "not claimed by the library", "tensor_lr": "the library uses lr as a Python float"}
_HUTCHINSON = {**_DEVIATIONS, "global_rng": "the library's Hutchinson probes come from torch's global RNG",
               "linear_loss": "Hessian-vector products need the gradient's graph"}

_PO = "pytorch-optimizer"

_ENTRIES = [
    OptimizerSpec(
        "adabound", _translated(po.AdaBound), "adaptive", defaults={"lr": 1e-3, "final_lr": 0.1},
        reference="Luo, Xiong, Liu & Sun 2019, arXiv:1902.09843",
        summary=f"Adam whose steps are clipped into bounds converging to SGD ({_PO})",
        deviations={**_DEVIATIONS, "bounded_step": "the method: steps are clipped into bounds converging to "
                                                  "final_lr (scaled by lr / the group's initial lr)"},
    ),
    OptimizerSpec(
        "adabelief", _translated(po.AdaBelief), "adaptive", defaults={"lr": 1e-3},
        reference="Zhuang et al. 2020, arXiv:2010.07468",
        summary=f"Adam with the variance of the gradient around its mean ({_PO})", deviations=_DEVIATIONS,
    ),
    OptimizerSpec(
        "yogi", _translated(po.Yogi), "adaptive", defaults={"lr": 1e-2},
        reference="Zaheer, Reddi, Sachan, Kale & Kumar 2018, NeurIPS (papers.nips.cc/paper/8186)",
        summary=f"Adam with an additive, sign-controlled second-moment update ({_PO})",
        deviations={**_DEVIATIONS, "moves_at_zero_grad": "the library starts the first moment at "
                                                        "initial_accumulator (1e-6), not at zero"},
    ),
    OptimizerSpec(
        "lars", _translated(po.LARS), "adaptive",
        defaults={"lr": 0.1, "momentum": 0.9, "trust_coefficient": 0.05},
        reference="You, Gitman & Ginsburg 2017, arXiv:1708.03888",
        summary=f"layer-wise trust-ratio scaled momentum SGD ({_PO})", deviations=_DEVIATIONS,
    ),
    OptimizerSpec(
        "lamb", _translated(po.Lamb), "adaptive", defaults={"lr": 1e-2},
        reference="You et al. 2020, arXiv:1904.00962",
        summary=f"layer-wise trust-ratio scaled Adam ({_PO})", deviations=_DEVIATIONS,
    ),
    OptimizerSpec(
        "lookahead", lookahead, "first_order", strict=False,
        defaults={"base": "adam", "lr": 1e-2, "k": 5, "alpha": 0.5},
        reference="Zhang, Lucas, Hinton & Ba 2019, arXiv:1907.08610",
        summary="slow weights pulled towards k fast steps of a base optimizer",
        deviations={"complex": "the slow weights are kept for real parameters"},
    ),
    OptimizerSpec(
        "adahessian", _translated(po.AdaHessian), "second_order", create_graph=True,
        defaults={"lr": 0.1, "eps": 1e-4},
        reference="Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney 2021, arXiv:2006.00719",
        summary=f"Adam with a Hutchinson estimate of the Hessian diagonal ({_PO})", deviations=_HUTCHINSON,
    ),
    OptimizerSpec(
        "sophiah", _translated(po.SophiaH), "second_order", create_graph=True,
        defaults={"lr": 0.3, "p": 0.05, "update_period": 5},
        reference="Liu, Li, Hall, Liang & Ma 2024, arXiv:2305.14342",
        summary=f"clipped Newton-like steps with a Hutchinson Hessian diagonal ({_PO})", deviations=_HUTCHINSON,
    ),
]

for _spec in _ENTRIES:
    register(_spec)
