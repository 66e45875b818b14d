"""Checks that need no training and create nothing: tracking URIs, database drivers, devices, world sizes.

Every sub-command runs its pre-flight before it creates an experiment, a database or a run, so a bad
flag or config leaves nothing behind (no empty ``mlflow.db``).
"""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.request
from collections.abc import Sequence

from lightning_optsurvey.cli._common import CLIError

_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_HTTP_SCHEMES = ("http", "https")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> str:
    """Validate a tracking URI; for a server, check that it answers.

    Raises:
        CLIError: For a file store (deprecated in MLflow 3), an unknown scheme, a missing database
            driver, a sqlite file in a folder that does not exist, or a server that does not answer.
    """
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in _HTTP_SCHEMES:
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status != 200:
                    raise CLIError(f"MLflow tracking server {uri} answered {response.status} at /health")
        except (urllib.error.URLError, OSError) as err:
            raise CLIError(f"MLflow tracking server {uri} does not answer ({err})") from None
        return uri
    if scheme.split("+")[0] in _DB_SCHEMES:
        check_database_driver(uri)
        if scheme == "sqlite":
            path = sqlite_path(uri)
            folder = os.path.dirname(os.path.abspath(path)) if path else ""
            if not path or not os.path.isdir(folder):
                raise CLIError(f"sqlite tracking URI {uri!r} must name a file in an existing folder")
        return uri
    raise CLIError(
        f"unsupported tracking URI {uri!r}: use sqlite:///PATH.db, http(s)://HOST:PORT, or a database URI "
        f"({', '.join(_DB_SCHEMES)}); MLflow's file store is deprecated"
    )


def sqlite_path(uri: str) -> str:
    """The file of a ``sqlite:///PATH`` URI (``""`` for any other)."""
    return uri.split(":///", 1)[1] if uri.lower().startswith("sqlite:///") else ""


def check_outbox(uri: str) -> str:
    """The outbox must be a local store (a database), never a server."""
    if uri.split(":", 1)[0].lower() in _HTTP_SCHEMES:
        raise CLIError(f"--outbox must be a local store (sqlite:///PATH.db), got {uri!r}")
    return check_tracking_uri(uri)


def check_database_driver(uri: str) -> None:
    """The database URI parses and its Python driver imports (``postgresql://`` needs ``psycopg2``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(uri).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise CLIError(f"tracking URI {uri!r} is not a database URI SQLAlchemy understands ({err})") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        module = getattr(err, "name", None) or str(err)
        raise CLIError(f"tracking URI {uri!r} needs the database driver {module!r}, which is not installed "
                       f"(pip install {module}); or use sqlite:///mlflow.db") from None


def check_compare(args: argparse.Namespace, strategies: Sequence[str | None]) -> None:
    """``optsurvey compare``'s checks of names, world sizes, devices and limits.

    Raises:
        CLIError: Naming the flag and what it allows.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    if not args.experiment.strip():
        raise CLIError("--experiment must be a non-empty name")
    if args.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise CLIError("--accelerator gpu: no CUDA GPU is available here; use --accelerator cpu (or auto)")
        if args.devices > torch.cuda.device_count():
            raise CLIError(f"--devices {args.devices}: only {torch.cuda.device_count()} GPU(s) are available")
    world_size = args.devices * args.num_nodes
    for name in strategies:
        if name is None:
            continue
        strategy = StrategyRegistry.get(name)
        validate = getattr(strategy, "_validate_world_size", None)
        if validate is not None:
            try:
                validate(world_size)
            except ValueError as err:
                raise CLIError(f"--strategy {name} with --devices {args.devices} --num-nodes {args.num_nodes}: "
                               f"{err}") from None


def check_user_classes(module: str | None, datamodule: str | None, with_kwargs: bool) -> None:
    """Import ``--module`` / ``--datamodule`` and check that the module takes the grid's optimizer."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_optsurvey import user_classes as uc

    try:
        if module:
            uc.check_module_class(uc.load_class(module, LightningModule, "--module"), with_kwargs=with_kwargs)
        if datamodule:
            uc.load_class(datamodule, LightningDataModule, "--datamodule")
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
