"""Registry entries for the survey's methods that pytorch-optimizer implements well enough to reuse.

Each entry passed the registry-wide conformance suite (``tests/test_optim_conformance.py``). Those that
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

import functools
from collections.abc import Callable
from typing import Any

import pytorch_optimizer as po
from pytorch_optimizer.base.exception import NegativeLRError, NegativeStepError
from torch.optim import Optimizer

from lightning_optsurvey.optim._common import check_int
from lightning_optsurvey.optim.registry import OptimizerSpec, create_optimizer, get_spec, register


def _translated(cls: type[Optimizer]) -> Callable[..., Optimizer]:
    """``cls`` with pytorch-optimizer's range errors raised as ``ValueError`` (signature kept)."""

    @functools.wraps(cls, updated=())
    def factory(params: Any, **hparams: Any) -> Optimizer:
        try:
            return cls(params, **hparams)
        except (NegativeLRError, NegativeStepError) as err:
            raise ValueError(f"{cls.__name__}: {err}") from err

    return factory


def lookahead(params: Any, base: str = "adam", k: int = 5, alpha: float = 0.5, pullback_momentum: str = "none",
              **base_kwargs: Any) -> Optimizer:
    r"""Lookahead (pytorch-optimizer's) around a registered base optimizer.

    Args:
        params: Parameters or parameter groups.
        base: Registry name of the fast (inner) optimizer; it must not need a closure, a Hessian graph
            or the model.
        k: Fast steps between slow-weight updates (>= 1).
        alpha: Slow-weight step :math:`\phi \leftarrow \phi + \alpha (\theta - \phi)`, in [0, 1).
        pullback_momentum: ``"none"``, ``"reset"`` or ``"pullback"``.
        **base_kwargs: Hyperparameters of the base optimizer (its registry defaults apply).

    Raises:
        ValueError: For an unknown or unsuitable base, or a bad ``k``/``alpha``/``pullback_momentum``.

    References:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019,
        arXiv:1907.08610.
    """
    spec = get_spec(base)
    if spec.needs_closure or spec.create_graph or spec.needs_model:
        raise ValueError(f"lookahead's base must take plain gradient steps; {base!r} cannot")
    check_int("k", k)
    inner = create_optimizer(base, params, **base_kwargs)
    return _translated(po.Lookahead)(inner, k=k, alpha=alpha, pullback_momentum=pullback_momentum)


_PO = "pytorch-optimizer"

_ENTRIES = [
    OptimizerSpec(
        "adabound", _translated(po.AdaBound), "adaptive", defaults={"lr": 1e-3, "final_lr": 0.1},
        reference="Luo, Xiong, Liu & Sun 2019, arXiv:1902.09843",
        summary=f"Adam whose steps are clipped into bounds converging to SGD ({_PO})",
    ),
    OptimizerSpec(
        "adabelief", _translated(po.AdaBelief), "adaptive", defaults={"lr": 1e-3},
        reference="Zhuang et al. 2020, arXiv:2010.07468",
        summary=f"Adam with the variance of the gradient around its mean ({_PO})",
    ),
    OptimizerSpec(
        "yogi", _translated(po.Yogi), "adaptive", defaults={"lr": 1e-2},
        reference="Zaheer, Reddi, Sachan, Kale & Kumar 2018, NeurIPS (papers.nips.cc/paper/8186)",
        summary=f"Adam with an additive, sign-controlled second-moment update ({_PO})",
    ),
    OptimizerSpec(
        "lars", _translated(po.LARS), "adaptive",
        defaults={"lr": 0.1, "momentum": 0.9, "trust_coefficient": 0.05},
        reference="You, Gitman & Ginsburg 2017, arXiv:1708.03888",
        summary=f"layer-wise trust-ratio scaled momentum SGD ({_PO})",
    ),
    OptimizerSpec(
        "lamb", _translated(po.Lamb), "adaptive", defaults={"lr": 1e-2},
        reference="You et al. 2020, arXiv:1904.00962",
        summary=f"layer-wise trust-ratio scaled Adam ({_PO})",
    ),
    OptimizerSpec(
        "lookahead", lookahead, "first_order", strict=False,
        defaults={"base": "adam", "lr": 1e-2, "k": 5, "alpha": 0.5},
        reference="Zhang, Lucas, Hinton & Ba 2019, arXiv:1907.08610",
        summary=f"slow weights pulled towards k fast steps of a base optimizer ({_PO})",
    ),
    OptimizerSpec(
        "adahessian", _translated(po.AdaHessian), "second_order", create_graph=True,
        defaults={"lr": 0.1, "eps": 1e-4},
        reference="Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney 2021, arXiv:2006.00719",
        summary=f"Adam with a Hutchinson estimate of the Hessian diagonal ({_PO})",
    ),
    OptimizerSpec(
        "sophiah", _translated(po.SophiaH), "second_order", create_graph=True,
        defaults={"lr": 0.3, "p": 0.05, "update_period": 5},
        reference="Liu, Li, Hall, Liang & Ma 2024, arXiv:2305.14342",
        summary=f"clipped Newton-like steps with a Hutchinson Hessian diagonal ({_PO})",
    ),
]

for _spec in _ENTRIES:
    register(_spec)
