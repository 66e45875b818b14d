"""The curvature engine: Hessian-vector products, Lanczos, trace and spectral density (no Lightning here).

Everything is a plain function of a :class:`HessianOperator`, so any of it can be called directly on a
model: ``lanczos(HessianOperator(model, loss_fn, batches), k=5)``.
"""

from lightning_optsurvey.curvature.operator import HessianOperator

__all__ = ["HessianOperator"]
