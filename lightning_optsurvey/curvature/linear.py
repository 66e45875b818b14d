r"""Linear operators: what the estimators need of a Hessian, and operators built from one.

:func:`~lightning_optsurvey.curvature.lanczos`, the trace and diagonal estimators and
:func:`~lightning_optsurvey.curvature.spectral_density` take any :class:`LinearOperator`: an object with
``numel`` and ``op @ v`` (a vector of length ``numel``) or ``op @ V`` (a ``(numel, m)`` block of columns),
optionally with ``dtype`` and ``device`` (where the estimators keep their vectors) and ``num_matvecs``.
:class:`~lightning_optsurvey.curvature.HessianOperator` is one; so are the operators below, which wrap
one:

- :class:`ScaledOperator`: :math:`D^{1/2} H D^{1/2}` for a diagonal :math:`D` of per-parameter step sizes
  (its top eigenvalue is the preconditioned sharpness, the edge-of-stability quantity of adaptive
  methods); :func:`stability_scaling` reads :math:`D` and the stability threshold off an optimizer;
- :class:`ShiftedOperator`: :math:`H + \sigma I` (e.g. to make an indefinite Hessian's smallest
  eigenvalues the largest in magnitude).

Why our own: ``scipy.sparse.linalg.LinearOperator`` is NumPy (a host round trip per product, no GPU) and
curvlinops is not a dependency; the protocol here is the three attributes the estimators read.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_optsurvey.validation import check_float

__all__ = [
    "LinearOperator",
    "ScaledOperator",
    "ShiftedOperator",
    "apply",
    "operator_info",
    "stability_scaling",
    "working_dtype",
]


@runtime_checkable
class LinearOperator(Protocol):
    """What the estimators need: a symmetric ``numel x numel`` operator applied with ``@``."""

    numel: int
    num_matvecs: int

    def __matmul__(self, v: Tensor) -> Tensor: ...


def operator_info(op: LinearOperator) -> tuple[int, torch.device]:
    """``(numel, device)`` of an operator (device: its ``device`` attribute, else the CPU).

    Raises:
        TypeError: If ``op`` has no positive integer ``numel``.
    """
    numel = getattr(op, "numel", None)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise TypeError(f"op must have a positive integer `numel` and support `op @ v`, got {op!r}")
    device = getattr(op, "device", None)
    return numel, torch.device(device) if device is not None else torch.device("cpu")


def working_dtype(op: LinearOperator) -> torch.dtype:
    """The dtype the estimators keep vectors of length ``numel`` in: the operator's, at least float32.

    Products arrive in the operator's dtype and carry its roundoff, so a float64 recurrence on float32
    products buys no accuracy but costs a conversion of every vector and twice the memory traffic, which
    dominate the overhead on models with millions of parameters. Operators without a ``dtype`` are
    treated as float64.
    """
    dtype = getattr(op, "dtype", torch.float64)
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64


def apply(op: LinearOperator, v: Tensor) -> Tensor:
    """``op @ v`` in ``v``'s dtype and device, safe to update in place (a copy only if it aliases ``v``)."""
    out = (op @ v).to(dtype=v.dtype, device=v.device)
    if out.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
        out = out.clone()  # e.g. an identity operator returning its argument
    return out


class _Wrapped:
    """An operator defined through another one: same dimension, device and dtype; its products counted."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op
        self.numel, _ = operator_info(op)
        self.device = getattr(op, "device", None)
        self.dtype = getattr(op, "dtype", torch.float64)

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs


class ScaledOperator(_Wrapped):
    r"""The symmetric operator :math:`D^{1/2} H D^{1/2}` for a diagonal :math:`D` given by ``d_sqrt``.

    Args:
        op: The operator :math:`H`.
        d_sqrt: :math:`D^{1/2}`, a flat tensor of length ``op.numel``.

    Raises:
        TypeError: If ``d_sqrt`` is not a tensor.
        ValueError: If its shape is not ``(op.numel,)``.
    """

    def __init__(self, op: LinearOperator, d_sqrt: Tensor) -> None:
        super().__init__(op)
        if not isinstance(d_sqrt, Tensor):
            raise TypeError(f"d_sqrt must be a tensor, got {type(d_sqrt).__name__}")
        if d_sqrt.shape != (self.numel,):
            raise ValueError(f"d_sqrt must have shape ({self.numel},), got {tuple(d_sqrt.shape)}")
        self.d_sqrt = d_sqrt

    def __matmul__(self, v: Tensor) -> Tensor:
        d = self.d_sqrt.to(v.dtype)
        d = d if v.ndim == 1 else d.unsqueeze(1)
        return d * (self.op @ (d * v).to(self.dtype)).to(v.dtype)


class ShiftedOperator(_Wrapped):
    r"""The operator :math:`H + \sigma I`.

    Args:
        op: The operator :math:`H`.
        shift: :math:`\sigma`, a finite real number.

    Raises:
        TypeError: If ``shift`` is not a real number.
        ValueError: If it is not finite.
    """

    def __init__(self, op: LinearOperator, shift: float) -> None:
        super().__init__(op)
        self.shift = check_float("shift", shift)

    def __matmul__(self, v: Tensor) -> Tensor:
        out = (self.op @ v).to(v.dtype)
        if out.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
            out = out.clone()
        return out.add_(v, alpha=self.shift)


def stability_scaling(
    optimizer: torch.optim.Optimizer, params: list[Tensor]
) -> tuple[Tensor, float | None, str]:
    r"""Per-parameter effective step sizes ``D`` and the threshold for :math:`\lambda_{\max}(D^{1/2} H D^{1/2})`.

    - SGD (``torch.optim.SGD``): :math:`D = \eta (1 - \tau)` (``tau`` the dampening); threshold 2, or
      :math:`2 + 2\beta` with momentum :math:`\beta`, :math:`(2 + 2\beta)/(1 + 2\beta)` with Nesterov.
    - Adam / AdamW (any optimizer with ``exp_avg_sq`` state and ``betas``):
      :math:`D = \eta / P`, :math:`P = (1 - \beta_1^t)(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon)`;
      threshold :math:`(2 + 2\beta_1)/(1 - \beta_1)` (38 for :math:`\beta_1 = 0.9`).
    - Others: :math:`D = \eta` and no known threshold (``None``).

    Weight decay is not part of the model (it adds ``eta * wd`` to every eigenvalue of the update's
    linearization and is left out, as in the papers' experiments). Parameters the optimizer does not
    hold get ``D = 0``.

    Args:
        optimizer: The training optimizer.
        params: The parameters in the Hessian operator's order.

    Returns:
        ``(D, threshold, rule)`` with ``D`` flat over ``params`` and ``rule`` one of ``"gd"``,
        ``"heavy_ball"``, ``"nesterov"``, ``"adam"``, ``"unknown"``.

    References:
        Cohen, Kaur, Li, Kolter, Talwalkar. Gradient Descent on Neural Networks Typically Occurs at the Edge
        of Stability. ICLR 2021. https://arxiv.org/abs/2103.00065
        Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl, Gilmer. Adaptive
        Gradient Methods at the Edge of Stability. 2022. https://arxiv.org/abs/2207.14484
    """
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    pieces: list[Tensor] = []
    thresholds: set[tuple[float | None, str]] = set()
    for p in params:
        group = where.get(id(p))
        if group is None:
            pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            continue
        lr = float(group.get("lr", 0.0))
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state and "betas" in group:
            beta1, beta2 = group["betas"]
            step = float(state["step"])
            v = state["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in state else state["exp_avg_sq"]
            precond = (1 - beta1**step) * ((v / (1 - beta2**step)).sqrt() + group["eps"])
            pieces.append((lr / precond).reshape(-1).to(p.dtype))
            thresholds.add(((2 + 2 * beta1) / (1 - beta1), "adam"))
        elif isinstance(optimizer, torch.optim.SGD):
            beta, tau = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
            pieces.append(torch.full((p.numel(),), lr * (1 - tau if beta > 0 else 1.0), dtype=p.dtype,
                                     device=p.device))
            if beta == 0:
                thresholds.add((2.0, "gd"))
            elif group.get("nesterov"):
                thresholds.add(((2 + 2 * beta) / (1 + 2 * beta), "nesterov"))
            else:
                thresholds.add((2 + 2 * beta, "heavy_ball"))
        else:
            pieces.append(torch.full((p.numel(),), lr, dtype=p.dtype, device=p.device))
            thresholds.add((None, "unknown"))
    if len(thresholds) != 1:
        return torch.cat(pieces), None, "unknown"
    threshold, rule = thresholds.pop()
    return torch.cat(pieces), threshold, rule
