"""The user's own ``LightningModule`` and ``LightningDataModule`` for ``optsurvey compare``, by import path.

``optsurvey compare --module pkg.mod:MyModule --datamodule pkg.mod:MyData`` imports both (the working
directory is on the import path, as for ``python -m``) and builds one module per run with
``MyModule(optimizer=<registry name>, optimizer_kwargs={...})``; the module builds its optimizer in
``configure_optimizers`` with :func:`~lightning_optsurvey.optim.create_optimizer`. The data module gets
``batch_size`` and ``seed`` when its constructor takes them. Everything is checked before the first run:
a path that does not import, a class of the wrong kind, a module that takes no ``optimizer`` argument.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule

#: How the grid passes the registry name (and the ``--hparam`` overrides) to the user's module.
OPTIMIZER_ARG = "optimizer"
OPTIMIZER_KWARGS_ARG = "optimizer_kwargs"


def load_class(path: str, base: type, what: str) -> type:
    """Import ``"package.module:Class"`` (or ``"package.module.Class"``) and check it subclasses ``base``.

    Args:
        path: The import path.
        base: The class it must derive from.
        what: What it is, for messages (``"--module"``).

    Raises:
        ValueError: For a malformed path, a module that cannot be imported or has no such attribute.
        TypeError: For an object that is not a subclass of ``base``.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be an import path 'package.module:Class', got {path!r}")
    module_name, sep, attr = path.strip().partition(":")
    if not sep:
        module_name, _, attr = module_name.rpartition(".")
    if not module_name or not attr or not attr.replace(".", "").replace("_", "").isalnum():
        raise ValueError(f"{what} must be an import path 'package.module:Class', got {path!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ValueError(
                f"cannot import {what} {path!r}: no module named {err.name!r} (searched the working "
                f"directory {cwd} and sys.path)"
            ) from None
        raise ValueError(f"cannot import {what} {path!r}: importing {module_name!r} failed: {err}") from err
    except Exception as err:
        raise ValueError(
            f"cannot import {what} {path!r}: importing {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"cannot import {what} {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not inspect.isclass(obj) or not issubclass(obj, base):
        raise TypeError(f"{what} {path!r} is {obj!r}, not a subclass of {base.__module__}.{base.__qualname__}")
    return obj


def takes(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes a keyword ``name`` (explicitly or through ``**kwargs``)."""
    parameters = inspect.signature(cls).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def check_module_class(cls: type, *, with_kwargs: bool) -> None:
    """Refuse a module class that cannot be given the grid's optimizer.

    Raises:
        TypeError: If ``cls`` takes no ``optimizer`` argument, or no ``optimizer_kwargs`` while
            ``with_kwargs`` (``--hparam`` overrides were given).
    """
    if not takes(cls, OPTIMIZER_ARG):
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} takes no `{OPTIMIZER_ARG}` argument, through which the grid "
            f"passes each registry name; give its __init__ `{OPTIMIZER_ARG}: str` and build the optimizer in "
            f"configure_optimizers with `create_optimizer(self.hparams.{OPTIMIZER_ARG}, self.parameters())`"
        )
    if with_kwargs and not takes(cls, OPTIMIZER_KWARGS_ARG):
        raise TypeError(
            f"--hparam overrides need {cls.__module__}.{cls.__qualname__} to take an `{OPTIMIZER_KWARGS_ARG}` "
            f"argument (a dict passed on to create_optimizer); it takes: "
            f"{', '.join(inspect.signature(cls).parameters)}"
        )


def build_module(cls: type, optimizer: str, optimizer_kwargs: dict[str, Any]) -> LightningModule:
    """``cls(optimizer=..., optimizer_kwargs=...)`` (the latter only when given or taken explicitly)."""
    kwargs: dict[str, Any] = {OPTIMIZER_ARG: optimizer}
    if optimizer_kwargs or OPTIMIZER_KWARGS_ARG in inspect.signature(cls).parameters:
        kwargs[OPTIMIZER_KWARGS_ARG] = dict(optimizer_kwargs)
    return cls(**kwargs)


def build_datamodule(cls: type, *, batch_size: int, seed: int) -> LightningDataModule:
    """``cls(batch_size=..., seed=...)``, passing each only when the constructor names it."""
    parameters = inspect.signature(cls).parameters
    offered = {"batch_size": batch_size, "seed": seed}
    return cls(**{k: v for k, v in offered.items() if k in parameters})


def class_path(cls: type) -> str:
    """``"module:QualName"`` of ``cls``, as logged for the run's ``model``/``task``."""
    return f"{cls.__module__}:{cls.__qualname__}"
