"""The curvature engine: Hessian-vector products, Lanczos, trace and spectral density (no Lightning here).

Everything is a plain function of a :class:`HessianOperator`, so any of it can be called directly on a
model: ``lanczos(HessianOperator(model, loss_fn, batches), k=5)``.
"""

from lightning_optsurvey.curvature.density import SpectralDensity, spectral_density
from lightning_optsurvey.curvature.kernels import MissingDerivativeError, derivative_kernels
from lightning_optsurvey.curvature.lanczos import EigenResult, lanczos
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
    "MissingDerivativeError",
    "ModuleLoss",
    "PairLoss",
    "SpectralDensity",
    "TraceResult",
    "as_batch_loss",
    "derivative_kernels",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "spectral_density",
]
