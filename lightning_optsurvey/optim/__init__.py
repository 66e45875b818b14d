"""Optimizers of the survey behind one registry (see :mod:`lightning_optsurvey.optim.registry`).

``create_optimizer(name, params, **hparams)`` builds any of them; ``available_optimizers()`` lists them.
"""

from lightning_optsurvey.optim import _torch  # noqa: F401  (registers torch.optim's methods)
from lightning_optsurvey.optim.registry import (
    FAMILIES,
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_spec,
    methods_markdown,
    register,
)

__all__ = [
    "FAMILIES",
    "OptimizerSpec",
    "available_optimizers",
    "create_optimizer",
    "get_spec",
    "methods_markdown",
    "register",
]
