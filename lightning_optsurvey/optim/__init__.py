"""Optimizers of the survey behind one registry (see :mod:`lightning_optsurvey.optim.registry`).

``create_optimizer(name, params, **hparams)`` builds any of them; ``available_optimizers()`` lists them.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from lightning_optsurvey.optim import (
    _external,  # noqa: F401  (registers pytorch-optimizer's methods)
    _torch,  # noqa: F401  (registers torch.optim's methods)
)
from lightning_optsurvey.optim.entropy_sgd import EntropySGD
from lightning_optsurvey.optim.gsam import GSAM
from lightning_optsurvey.optim.kfac import KFAC, KFACConfig
from lightning_optsurvey.optim.lookahead import Lookahead
from lightning_optsurvey.optim.lpf_sgd import LPFSGD
from lightning_optsurvey.optim.registry import (
    DEVIATIONS,
    FAMILIES,
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_spec,
    methods_markdown,
    register,
)
from lightning_optsurvey.optim.sam import SAM
from lightning_optsurvey.optim.shampoo import Shampoo
from lightning_optsurvey.optim.svrg import SVRG

__all__ = [
    "DEVIATIONS",
    "FAMILIES",
    "GSAM",
    "KFAC",
    "LPFSGD",
    "SAM",
    "SVRG",
    "EntropySGD",
    "KFACConfig",
    "Lookahead",
    "OptimizerSpec",
    "Shampoo",
    "available_optimizers",
    "create_optimizer",
    "get_spec",
    "methods_markdown",
    "register",
]

# Every public module of this package registers its entries when imported, so a new optimizer is one new file
# here (its tests: the conformance suite and PyTorch's battery run over every registered name).
for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")
