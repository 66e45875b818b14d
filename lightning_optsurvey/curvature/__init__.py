"""The curvature engine: Hessian-vector products, Lanczos, trace and spectral density (no Lightning here).

Everything is a plain function of a :class:`LinearOperator` such as a :class:`HessianOperator`, so any of
it can be called directly on a model: ``lanczos(HessianOperator(model, loss_fn, batches), k=5)``.

Modules, from the bottom up: ``batches`` (what a batch is: sizes, pieces, checks), ``linear`` (the
operator protocol and operators built from one), ``objective`` (the loss of one batch), ``operator``
(the Hessian), ``lanczos`` (eigenpairs, and the three-term step), ``trace`` and ``density``.
"""

from lightning_optsurvey.curvature.density import SpectralDensity, spectral_density
from lightning_optsurvey.curvature.kernels import MissingDerivativeError, derivative_kernels
from lightning_optsurvey.curvature.lanczos import EigenResult, lanczos
from lightning_optsurvey.curvature.linear import LinearOperator, ScaledOperator, ShiftedOperator, stability_scaling
from lightning_optsurvey.curvature.objective import BatchLoss, ModuleLoss, PairLoss, as_batch_loss
from lightning_optsurvey.curvature.operator import HessianOperator
from lightning_optsurvey.curvature.trace import (
    DiagonalResult,
    TraceResult,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
)

__all__ = [
    "BatchLoss",
    "DiagonalResult",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "MissingDerivativeError",
    "ModuleLoss",
    "PairLoss",
    "ScaledOperator",
    "ShiftedOperator",
    "SpectralDensity",
    "TraceResult",
    "as_batch_loss",
    "derivative_kernels",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "spectral_density",
    "stability_scaling",
]
