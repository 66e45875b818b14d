"""The ``optsurvey`` command.

- ``optsurvey compare``: trains optimizers (and strategies) on the digits task, or on the user's own
  classes (``--module pkg.mod:MyModule --datamodule pkg.mod:MyData``; see
  :mod:`lightning_optsurvey.user_classes`), one MLflow run each, then prints a summary table and the
  command that opens the MLflow UI on those runs.
- ``optsurvey list``: the registered optimizers, strategies and callbacks.
- ``optsurvey theory``: runs the survey's theorems as executable checks.
- ``optsurvey fit|validate|test``: Lightning's CLI over any ``LightningModule`` and ``LightningDataModule``
  (``model: class_path: ...``; ``ClassifierModule`` and ``DigitsDataModule`` when none is named), so YAML
  configs with ``class_path`` work for the user's classes, our callbacks, optimizers and strategies. Its
  config is saved as an MLflow artifact when the logger is an ``MLFlowLogger`` (Lightning's own
  ``SaveConfigCallback`` needs a ``log_dir``, which a remote tracking URI does not have).

This module and :mod:`lightning_optsurvey.tracking` are the only places in the package that import
``mlflow``: this one creates and tags experiments, checks that a tracking server answers before anything
trains, and reads the finished runs back; with a tracking *server*, compare logs every run to a local
outbox first and the tracking module delivers it (``optsurvey sync`` uploads what an outage left).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "optsurvey-compare"
DEFAULT_OPTIMIZERS = ("sgd", "momentum", "adam", "sam")
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_HTTP_SCHEMES = ("http", "https")
_SUMMARY_METRICS = ("val/acc", "val/loss", "train/loss")
# What the measuring callbacks log that belongs in the summary table, in this order (when present).
_MEASURED_METRICS = ("hessian/eig_1", "hessian/eig_2", "hessian/trace", "sharpness/sam", "gen_gap/loss",
                     "gen_gap/acc", "gossip/consensus_distance", "comm/bytes_sent")


class CLIError(Exception):
    """A user error found before any training starts."""


# --------------------------------------------------------------------------------------------- helpers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if any(not 0 <= v < 2**32 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be in [0, 2**32) (NumPy's seed range), got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def _hparam(text: str) -> tuple[str, str, Any]:
    """Parse ``OPTIMIZER.KEY=VALUE`` (VALUE as a Python literal, else a string)."""
    head, sep, raw = text.partition("=")
    name, dot, key = head.partition(".")
    if not sep or not dot or not name or not key:
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER.KEY=VALUE (e.g. adam.lr=0.003), got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:  # nan, inf, -inf: numbers (that the finite check then refuses), not strings
            value = float(raw)
        except ValueError:
            value = raw
    return name.strip(), key.strip(), value


def _limit_batches(text: str) -> float | int:
    """``--limit-train-batches``: a fraction in (0, 1] or a whole number of batches >= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1] or a number of batches, got {text!r}") from None
    if not math.isfinite(value) or value <= 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1] or a whole number of batches >= 1, got {text!r}")
    return int(value) if value > 1 else value


def check_tracking_uri(uri: str, timeout: float = 5.0) -> str:
    """Validate a tracking URI; for a server, check that it answers.

    Raises:
        CLIError: For a file store (deprecated in MLflow 3), an unknown scheme, or a server that does
            not answer its health check.
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
        _check_database_driver(uri)
        if scheme == "sqlite":
            path = uri.split(":///", 1)[1] if ":///" in uri else ""
            folder = os.path.dirname(os.path.abspath(path)) if path else ""
            if not path or not os.path.isdir(folder):
                raise CLIError(f"sqlite tracking URI {uri!r} must name a file in an existing folder")
        return uri
    raise CLIError(
        f"unsupported tracking URI {uri!r}: use sqlite:///PATH.db, http(s)://HOST:PORT, or a database URI "
        f"({', '.join(_DB_SCHEMES)}); MLflow's file store is deprecated"
    )


def _check_database_driver(uri: str) -> None:
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


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create (or find) the experiment and tag it so the MLflow UI opens on its runs table."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    key, value = EXPERIMENT_KIND_TAG
    if experiment is None:
        return client.create_experiment(name, tags={key: value})
    if experiment.lifecycle_stage != "active":
        raise CLIError(f"experiment {name!r} is deleted in {tracking_uri}; restore it or choose another name")
    if experiment.tags.get(key) != value:
        client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def ui_hint(tracking_uri: str, experiment_id: str) -> tuple[str, str]:
    """The command that shows the runs, and the address of the experiment's runs view."""
    if tracking_uri.split(":", 1)[0].lower() in _HTTP_SCHEMES:
        return (f"(server already running at {tracking_uri})",
                f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs")
    # The mlflow beside this interpreter, by its full path unless it is the one on PATH (an unactivated venv).
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    if not os.path.exists(mlflow_bin) or shutil.which("mlflow") == mlflow_bin:
        mlflow_bin = "mlflow"
    return (f"{mlflow_bin} ui --backend-store-uri {tracking_uri} --port 5000",
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")


# --------------------------------------------------------------------------------------------- compare


@dataclass
class RunConfig:
    """One training run of ``optsurvey compare``."""

    optimizer: str
    seed: int
    strategy: str | None
    model: str = "cnn"
    devices: int = 1
    num_nodes: int = 1
    max_epochs: int = 10
    batch_size: int = 64
    accelerator: str = "cpu"
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str = DEFAULT_TRACKING_URI
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    measure: bool = True
    limit_train_batches: float | int | None = None
    stop_on_divergence: bool = False
    module: str | None = None  # "pkg.mod:Class" of the user's LightningModule (default: ClassifierModule)
    datamodule: str | None = None  # "pkg.mod:Class" of the user's LightningDataModule (default: digits)
    swa: bool = False  # stochastic weight averaging (callbacks.SWA) over the last quarter of the epochs
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_rank: int = 2
    timeout: float | None = None  # seconds a collective may wait for a peer (None: the strategy's default)

    @property
    def run_name(self) -> str:
        base = f"{self.optimizer}-seed{self.seed}"
        base = f"{base}-{self.strategy}" if self.strategy else base
        return f"{base}-swa" if self.swa else base


def _strategy(config: RunConfig) -> Any:
    """The run's strategy: its registered name, or the registered object with ``--timeout`` applied."""
    if config.strategy is None:
        return "auto"
    if config.timeout is None:
        return config.strategy
    from datetime import timedelta

    from lightning.pytorch.strategies import StrategyRegistry

    entry = StrategyRegistry[config.strategy]
    return entry["strategy"](**{**entry["init_params"], "timeout": timedelta(seconds=config.timeout)})


def train_one(config: RunConfig) -> dict[str, Any]:
    """Train one configuration, logging to MLflow.

    Returns:
        ``{"run_id", "seconds"}`` on global rank 0, ``{}`` on the other ranks.
    """
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger

    from lightning_optsurvey.callbacks import SWA, DivergenceMonitor, OptimizerLoopAdapter, default_callbacks
    from lightning_optsurvey.optim import get_spec

    L.seed_everything(config.seed, workers=True, verbose=False)
    module, datamodule, model_name, task = _build_run_classes(config)
    logger = MLFlowLogger(
        experiment_name=config.experiment,
        run_name=config.run_name,
        tracking_uri=config.tracking_uri,
        tags={"task": task, "optimizer": config.optimizer, "strategy": config.strategy or "single"},
    )
    trainer_kwargs: dict[str, Any] = {}
    if config.limit_train_batches is not None:
        trainer_kwargs["limit_train_batches"] = config.limit_train_batches
    trainer = L.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=_strategy(config),
        logger=logger,
        callbacks=[DivergenceMonitor(stop=config.stop_on_divergence),
                   *(default_callbacks(config.devices * config.num_nodes, config.strategy) if config.measure
                     else []),
                   OptimizerLoopAdapter(),  # what registry optimizers need from the loop, for any module
                   *([SWA()] if config.swa else [])],
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        **trainer_kwargs,
    )
    effective = {**get_spec(config.optimizer).defaults, **config.optimizer_kwargs}
    logger.log_hyperparams(
        {
            "optimizer": config.optimizer,
            **{f"optimizer.{k}": v for k, v in effective.items()},
            "strategy": config.strategy or "single",
            "world_size": config.devices * config.num_nodes,
            "model": model_name,
            "task": task,
            "seed": config.seed,
            "max_epochs": config.max_epochs,
            "swa": config.swa,
        }
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    logger.log_metrics({"time/train_seconds": seconds}, step=trainer.global_step)
    logger.finalize("success")
    return {"run_id": logger.run_id, "seconds": seconds}


def _build_run_classes(config: RunConfig) -> tuple[Any, Any, str, str]:
    """The run's module and data module (the user's classes or ours), its model name and task name."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_optsurvey import user_classes as uc
    from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

    if config.module:
        module_cls = uc.load_class(config.module, LightningModule, "--module")
        module = uc.build_module(module_cls, config.optimizer, config.optimizer_kwargs)
        model_name = uc.class_path(module_cls)
    else:
        module, model_name = ClassifierModule(config.model, config.optimizer, config.optimizer_kwargs), config.model
    if config.datamodule:
        data_cls = uc.load_class(config.datamodule, LightningDataModule, "--datamodule")
        datamodule = uc.build_datamodule(data_cls, batch_size=config.batch_size, seed=config.seed)
        task = uc.class_path(data_cls)
    else:
        datamodule = DigitsDataModule(batch_size=config.batch_size, seed=config.seed, partition=config.partition,
                                      alpha=config.alpha, shards_per_rank=config.shards_per_rank)
        task = "digits"
    return module, datamodule, model_name, task


def _train_in_subprocess(config: RunConfig) -> dict[str, Any]:
    # Lightning's DDP launcher re-executes the current command line for each extra rank; a fresh
    # process per run keeps that re-execution to exactly this one run.
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "lightning_optsurvey.cli", "_run-one",
                   json.dumps(asdict(config)), result_file]
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0 or not os.path.exists(result_file):
            raise RuntimeError(f"run {config.run_name} failed (exit code {completed.returncode})")
        with open(result_file) as f:
            return json.load(f)


def _validate_compare(args: argparse.Namespace) -> list[RunConfig]:
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_optsurvey.optim import available_optimizers, create_optimizer, get_spec
    from lightning_optsurvey.tasks import available_models, build_model
    from lightning_optsurvey.tasks.classifier import check_optimizer_kwargs

    known = available_optimizers()
    unknown = [o for o in args.optimizers if o not in known]
    if unknown:
        raise CLIError(f"unknown optimizer(s) {', '.join(unknown)}; known optimizers: {', '.join(known)}")
    if args.model not in available_models():
        raise CLIError(f"unknown model {args.model!r}; known models: {', '.join(available_models())}")
    _check_user_classes(args)
    strategies: list[str | None] = list(args.strategy) if args.strategy else [None]
    known_strategies = sorted(StrategyRegistry.available_strategies())
    for s in strategies:
        if s is not None and s not in known_strategies:
            raise CLIError(f"unknown strategy {s!r}; known strategies: {', '.join(known_strategies)}")
    if args.devices * args.num_nodes > 1 and strategies == [None]:
        strategies = ["ddp"]
    _preflight_compare(args, strategies)
    kwargs: dict[str, dict[str, Any]] = {o: {} for o in args.optimizers}
    for name, key, value in args.hparam or []:
        if name not in kwargs:
            raise CLIError(f"--hparam names optimizer {name!r}, which is not among --optimizers {args.optimizers}")
        kwargs[name][key] = value
    # Build each optimizer once on a throw-away model: bad hyperparameters fail here, before any run.
    for name in args.optimizers:
        probe = build_model(args.model)
        try:
            check_optimizer_kwargs(name, kwargs[name], where="--hparam")
            create_optimizer(name, probe.parameters(), model=probe if get_spec(name).needs_model else None,
                             **kwargs[name])
        except (TypeError, ValueError) as err:
            raise CLIError(f"optimizer {name!r}: {err}") from None
    from lightning_optsurvey.tasks.partition import check_partition_args

    try:
        check_partition_args(args.partition, args.alpha, args.shards_per_rank)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    if args.datamodule and args.partition != "iid":
        raise CLIError(
            f"--partition {args.partition} splits the digits task; with --datamodule, split in your datamodule"
        )
    check_tracking_uri(args.tracking_uri)
    return [
        RunConfig(
            optimizer=o, seed=s, strategy=st, model=args.model, devices=args.devices, num_nodes=args.num_nodes,
            max_epochs=args.max_epochs, batch_size=args.batch_size, accelerator=args.accelerator,
            experiment=args.experiment, tracking_uri=args.tracking_uri, optimizer_kwargs=kwargs[o],
            measure=not args.no_measure, limit_train_batches=args.limit_train_batches,
            stop_on_divergence=args.stop_on_divergence,
            module=args.module, datamodule=args.datamodule, swa=args.swa,
            partition=args.partition, alpha=args.alpha, shards_per_rank=args.shards_per_rank,
            timeout=args.timeout,
        )
        for st in strategies
        for o in args.optimizers
        for s in args.seeds
    ]


def _timeout_seconds(text: str) -> float:
    """``--timeout``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def _preflight_compare(args: argparse.Namespace, strategies: Sequence[str | None]) -> None:
    """Checks that need no training and no experiment: names, world sizes, devices, limits.

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


def _check_user_classes(args: argparse.Namespace) -> None:
    """Import ``--module`` / ``--datamodule`` and check that the module takes the grid's optimizer."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_optsurvey import user_classes as uc

    try:
        if args.module:
            module_cls = uc.load_class(args.module, LightningModule, "--module")
            uc.check_module_class(module_cls, with_kwargs=bool(args.hparam))
        if args.datamodule:
            uc.load_class(args.datamodule, LightningDataModule, "--datamodule")
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) + " |" for r in rows]
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> int:
    """Run ``optsurvey compare``; returns the exit code."""
    from mlflow.tracking import MlflowClient

    configs = _validate_compare(args)
    delivery = _start_delivery(args)  # a tracking server: runs are logged locally, delivered behind them
    if delivery is not None:
        configs = [replace(c, tracking_uri=delivery.local_uri) for c in configs]
    experiment_id = ensure_experiment(args.tracking_uri, args.experiment)
    client = MlflowClient(tracking_uri=configs[0].tracking_uri)
    rows: list[dict[str, Any]] = []
    for i, config in enumerate(configs, start=1):
        print(f"run {i}/{len(configs)}: {config.run_name}", file=sys.stderr, flush=True)
        multi = config.devices * config.num_nodes > 1
        result = _train_in_subprocess(config) if multi else train_one(config)
        if delivery is not None:
            delivery.submit(result["run_id"])
        run = client.get_run(result["run_id"])
        row = {"optimizer": config.optimizer, "seed": config.seed, "strategy": config.strategy or "single",
               "seconds": result["seconds"], **run.data.metrics}
        if run.data.tags.get("diverged") == "true":
            row["diverged"] = f"step {run.data.tags.get('diverged_step')}"
        rows.append(row)
    columns = ["optimizer", "seed"]
    if any(c.strategy for c in configs):
        columns.append("strategy")
    columns += [*_SUMMARY_METRICS, "seconds", *(m for m in _MEASURED_METRICS if any(m in r for r in rows))]
    if any("diverged" in r for r in rows):
        columns.append("diverged")
    print()
    print(_format_table(rows, columns))
    best = max(rows, key=lambda r: r.get("val/acc", float("-inf")))
    command, address = ui_hint(args.tracking_uri, experiment_id)
    print(f"\nbest: {best['optimizer']} (seed {best['seed']}) val/acc={best.get('val/acc', float('nan')):.4f}")
    print(f"\n{len(rows)} runs in experiment {args.experiment!r} (id {experiment_id}) at {args.tracking_uri}")
    print(f"open the MLflow UI:  {command}")
    print(f"then browse:         {address}")
    if delivery is not None:
        _finish_delivery(delivery, args)
    return 0


def _start_delivery(args: argparse.Namespace) -> Any:
    """For an http(s) tracking URI: the local outbox and the thread that delivers runs to the server."""
    if args.tracking_uri.split(":", 1)[0].lower() not in _HTTP_SCHEMES:
        return None
    from lightning_optsurvey.tracking import Delivery

    check_tracking_uri(args.outbox)
    if args.outbox.split(":", 1)[0].lower() in _HTTP_SCHEMES:
        raise CLIError(f"--outbox must be a local store (sqlite:///PATH.db), got {args.outbox!r}")
    ensure_experiment(args.outbox, args.experiment)
    return Delivery(args.outbox, args.tracking_uri, args.experiment)


def _finish_delivery(delivery: Any, args: argparse.Namespace) -> None:
    from lightning_optsurvey.tracking import upload_command

    if delivery.pending:
        print(f"delivering {len(delivery.pending)} run(s) to {args.tracking_uri} "
              f"(waiting up to {args.sync_wait:g} s) ...", file=sys.stderr, flush=True)
    report = delivery.finish(args.sync_wait)
    if report.pending:
        print(f"\nthe tracking server {args.tracking_uri} did not answer; {len(report.pending)} run(s) are kept "
              f"in {args.outbox} (every metric, param and artifact). Upload them when it is back:\n  "
              f"{upload_command(args.outbox, args.tracking_uri, args.experiment)}", file=sys.stderr)


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train optimizers/strategies on digits as MLflow runs and compare them",
                       description="Train each optimizer (x seed x strategy) on the digits task with the measuring "
                                   "callbacks, one MLflow run each, then print a summary table.")
    p.add_argument("--optimizers", type=_name_list, default=list(DEFAULT_OPTIMIZERS),
                   help=f"comma-separated registry names (default: {','.join(DEFAULT_OPTIMIZERS)})")
    p.add_argument("--model", default="cnn", help="model name of the built-in ClassifierModule (default: cnn)")
    p.add_argument("--module", default=None, metavar="PKG.MOD:CLASS",
                   help="your LightningModule, importable from the working directory; it is built as "
                        "Class(optimizer=NAME[, optimizer_kwargs={...}]) for each optimizer "
                        "(default: ClassifierModule)")
    p.add_argument("--datamodule", default=None, metavar="PKG.MOD:CLASS",
                   help="your LightningDataModule, given batch_size and seed when it takes them (default: digits)")
    p.add_argument("--strategy", type=_name_list, default=None,
                   help="comma-separated strategy names (default: single device, or ddp with --devices > 1)")
    p.add_argument("--devices", type=_positive_int, default=1, help="processes (or GPUs) per node")
    p.add_argument("--num-nodes", type=_positive_int, default=1, help="nodes")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"], help="default: cpu")
    p.add_argument("--max-epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds (default: 0)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"default: {DEFAULT_EXPERIMENT}")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help=f"default: {DEFAULT_TRACKING_URI}")
    p.add_argument("--hparam", type=_hparam, action="append", metavar="OPT.KEY=VALUE",
                   help="override a hyperparameter, e.g. --hparam adam.lr=0.003 (repeatable)")
    p.add_argument("--no-measure", action="store_true", help="skip the measuring callbacks")
    p.add_argument("--partition", default="iid", help="training data over ranks: iid (default), dirichlet, shards")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet")
    p.add_argument("--shards-per-rank", type=int, default=2, help="shards per rank for --partition shards")
    p.add_argument("--swa", action="store_true",
                   help="stochastic weight averaging (Izmailov et al. 2018) over the last quarter of the epochs, "
                        "BatchNorm recomputed; validation and the swa/ measurements are of the averaged model")
    p.add_argument("--limit-train-batches", type=_limit_batches, default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=_timeout_seconds, default=None,
                   help="seconds a rank waits for its peers before the run stops with an error naming the "
                        "rank that failed (default: the strategy's; 300 for ours on CPU)")
    p.add_argument("--stop-on-divergence", action="store_true",
                   help="end a run at the step its loss becomes non-finite (it is reported either way)")
    p.add_argument("--outbox", default="sqlite:///optsurvey-outbox.db",
                   help="with an http(s) --tracking-uri: the local store runs are logged to first and "
                        "delivered from, so an outage loses nothing and stalls nothing")
    p.add_argument("--sync-wait", type=float, default=120.0,
                   help="seconds to wait at the end for a server that is away (default: 120)")


def sync_command(args: argparse.Namespace) -> int:
    """``optsurvey sync``: deliver the runs an outage left in the outbox."""
    from lightning_optsurvey.tracking import pending_runs, sync

    check_tracking_uri(args.source)
    check_tracking_uri(args.target)
    before = len(pending_runs(args.source, args.experiment))
    report = sync(args.source, args.target, args.experiment)
    print(f"delivered {len(report.delivered)} of {before} pending run(s) to {args.target}")
    if report.pending:
        print(f"optsurvey sync: error: {len(report.pending)} run(s) still pending ({report.last_error})",
              file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------- list


def list_available(args: argparse.Namespace) -> int:
    """Print the registered optimizers, strategies and callbacks."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_optsurvey import callbacks as cb
    from lightning_optsurvey import strategies as st
    from lightning_optsurvey.optim import available_optimizers, get_spec, methods_markdown

    if args.markdown:
        print(methods_markdown())
        return 0
    rows = [{"name": n, "family": get_spec(n).family, "reference": get_spec(n).reference}
            for n in available_optimizers()]
    print("Optimizers\n" + _format_table(rows, ["name", "family", "reference"]))
    from lightning_optsurvey.callbacks.swa import REFERENCE

    # SWA averages any of them, so it is a callback and not a registry entry; listed beside them.
    print(f"+ weight averaging (landscape), with any optimizer above: swa, {REFERENCE} "
          "(callbacks.SWA; `optsurvey compare --swa`)")
    ours = sorted(getattr(st, "STRATEGY_NAMES", ()))
    others = sorted(set(StrategyRegistry.available_strategies()) - set(ours))
    print("\nStrategies (ours): " + (", ".join(ours) or "none"))
    print("Strategies (Lightning): " + ", ".join(others))
    from lightning.pytorch.callbacks import Callback

    loop = ("OptimizerLoopAdapter", "SVRGSnapshot", "SWA")  # training, not measurements
    measuring = sorted(n for n in cb.__all__ if isinstance(getattr(cb, n), type) and n not in loop
                       and issubclass(getattr(cb, n), Callback) and getattr(cb, n) is not cb.MeasuringCallback)
    print("\nCallbacks: " + ", ".join(measuring))
    print("Training-loop callbacks: " + ", ".join(loop[:2]))
    return 0


# --------------------------------------------------------------------------------------------- theory


def theory(args: argparse.Namespace) -> int:
    """Run the executable theorems; exit code 1 if any fails."""
    from lightning_optsurvey import theory as th

    if args.tracking_uri:
        check_tracking_uri(args.tracking_uri)  # before the checks run, not after
    try:
        outcomes = th.run_checks(only=args.only, seed=args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None
    print(th.format_table(outcomes))
    if args.tracking_uri:
        _log_theory(args.tracking_uri, args.experiment, outcomes)
    return 0 if all(o.outcome.holds for o in outcomes) else 1


def _log_theory(tracking_uri: str, experiment: str, outcomes: Sequence[Any]) -> None:
    import mlflow
    from matplotlib import pyplot as plt

    from lightning_optsurvey import theory as th

    check_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    for item in outcomes:
        run = client.create_run(experiment_id, run_name=item.result.name)
        client.log_param(run.info.run_id, "reference", item.result.reference[:250])
        client.log_metric(run.info.run_id, "holds", float(item.outcome.holds))
        for key in ("predicted", "measured"):
            value = getattr(item.outcome, key)
            if isinstance(value, (int, float)):
                client.log_metric(run.info.run_id, f"theory/{key}", float(value))
        figure = th.plot_outcome(item.result, item.outcome)
        client.log_figure(run.info.run_id, figure, f"theory/{item.result.name}.png")
        plt.close(figure)
        client.set_terminated(run.info.run_id, "FINISHED" if item.outcome.holds else "FAILED")


# --------------------------------------------------------------------------------------------- Lightning CLI


def _class_paths(argv: list[str]) -> dict[str, str]:
    """The ``model`` / ``data`` class paths that ``argv`` (its ``--config`` files, then flags) chooses."""
    import yaml

    found: dict[str, str] = {}
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if key in ("-c", "--config") and os.path.isfile(value):
            with open(value) as f:
                config = yaml.safe_load(f) or {}
            for section in ("model", "data"):
                entry = config.get(section) if isinstance(config, dict) else None
                if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
                    found[section] = entry["class_path"]
                elif isinstance(entry, str):
                    found[section] = entry
        for section in ("model", "data"):
            if key in (f"--{section}", f"--{section}.class_path") and value and not value.startswith("-"):
                found[section] = value
    return found


def _check_fit_classes(argv: list[str]) -> None:
    """One-line errors for a ``model``/``data`` class that does not import or takes no ``optimizer``."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_optsurvey import user_classes as uc

    paths = _class_paths(argv)
    try:
        if "." in paths.get("model", "") or ":" in paths.get("model", ""):
            uc.check_module_class(uc.load_class(paths["model"], LightningModule, "model.class_path"),
                                  with_kwargs=False)
        if "." in paths.get("data", "") or ":" in paths.get("data", ""):
            uc.load_class(paths["data"], LightningDataModule, "data.class_path")
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


def _lightning_cli(argv: list[str]) -> int:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import MLFlowLogger

    from lightning_optsurvey.callbacks import OptimizerLoopAdapter

    try:
        _check_fit_classes(argv)
    except CLIError as err:
        print(f"optsurvey {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # an unreadable config: the parser below reports it in one line
        pass

    class MLflowSaveConfigCallback(SaveConfigCallback):
        """Save the resolved config as an MLflow artifact when logging to MLflow, else to ``log_dir``."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            mlflow_loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
            if not mlflow_loggers:
                super().setup(trainer, pl_module, stage)
                return
            if self.already_saved:
                return
            if trainer.is_global_zero:
                text = self.parser.dump(self.config, skip_none=False)
                for lg in mlflow_loggers:
                    key, value = EXPERIMENT_KIND_TAG
                    lg.experiment.set_experiment_tag(lg.experiment_id, key, value)
                    lg.experiment.log_text(lg.run_id, text, self.config_filename)
            self.already_saved = True
            self.already_saved = trainer.strategy.broadcast(self.already_saved)

    class CLI(LightningCLI):
        """Any LightningModule / LightningDataModule by ``class_path``; ours when none is named.

        It checks the tracking server before anything is built, and marks where configuration ends and
        work begins (errors before that are one line).
        """

        configured = False

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.set_defaults({"model": {"class_path": "lightning_optsurvey.tasks.ClassifierModule"},
                                 "data": {"class_path": "lightning_optsurvey.tasks.DigitsDataModule"}})

        def before_instantiate_classes(self) -> None:
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            for uri in _config_tracking_uris(config):
                check_tracking_uri(uri)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer = super().instantiate_trainer(**kwargs)
            if not any(isinstance(cb, OptimizerLoopAdapter) for cb in trainer.callbacks):
                trainer.callbacks.append(OptimizerLoopAdapter())  # what registry optimizers need, any module
            return trainer

        def _run_subcommand(self, subcommand: str) -> None:
            CLI.configured = True
            super()._run_subcommand(subcommand)

    try:
        CLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"exit_on_error": False},  # errors come back to us, for a one-line message
            save_config_callback=MLflowSaveConfigCallback,
            trainer_defaults={
                # MLFlowLogger has no local save_dir for sqlite/http URIs; keep checkpoints out of the cwd's top.
                "default_root_dir": "lightning_logs",
                "logger": {
                    "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                    "init_args": {"experiment_name": "optsurvey", "tracking_uri": DEFAULT_TRACKING_URI},
                },
            },
            args=None if argv == sys.argv[1:] else argv,  # Lightning warns when given both
        )
    except SystemExit:
        raise
    except Exception as err:
        if CLI.configured:
            raise  # an error while working: keep its traceback
        raise CLIError(_config_error_line(err, argv)) from None
    return 0


def _config_tracking_uris(config: Any) -> list[str]:
    """The ``tracking_uri`` of every MLflow logger in a parsed ``fit`` config."""
    loggers = getattr(getattr(config, "trainer", None), "logger", None)
    found = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = str(getattr(logger, "class_path", "") or "")
        init_args = getattr(logger, "init_args", None)
        uri = getattr(init_args, "tracking_uri", None) if init_args is not None else None
        if class_path.endswith("MLFlowLogger") and uri:
            found.append(str(uri))
    return found


_CLI_KEYS = {"ClassifierModule": "model", "DigitsDataModule": "data", "Trainer": "trainer"}


def _config_error_line(err: BaseException, argv: list[str]) -> str:
    """One line for a configuration error: the config key, then the reason (not jsonargparse's stack)."""
    import re

    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if isinstance(err, CLIError):
        return str(err)
    # The innermost error raised by our (or the user's) code, not by the parser: the real reason.
    for exc in reversed(chain):
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and "jsonargparse" not in frames[-1].filename and not frames[-1].filename.endswith("cli.py"):
            owner = _raising_class(exc)
            key = _config_key_of(owner, argv) if owner else None
            where = f"{key} ({owner})" if key and key != _CLI_KEYS.get(owner or "") else (key or owner or "config")
            return f"{where}: {' '.join(str(exc).split())}"
    # Nested parsers (subclass mode: model -> its init args) each name their part of the key.
    keys: list[str] = []
    message = str(err)
    for exc in chain:
        if (match := re.match(r'Parser key "([^"]+)"', str(exc))) is not None:
            if not keys or keys[-1] != match.group(1):
                keys.append(match.group(1))
            message = str(exc)
    key = ".".join(keys) or None
    bullets = [b.strip()[2:] for b in message.splitlines() if re.match(r"\s+- ", b)]
    given = re.search(r"Given value: (.*)", message)
    given_type = re.search(r"Given value type: <class '([\w.]+)'>", message)
    expected = [re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", b[len("Expected a "):]).replace("NoneType", "None")
                for b in bullets if b.startswith("Expected a ")]
    reasons = [b for b in bullets if not b.endswith(":") and not b.startswith((
        "Expected a ", "Not a valid subclass", "a class path", "a dict with", "a dict without"))]
    if key is None:  # a class given by class_path: name it by where it is configured
        named = re.search(r"class_path='(?:[\w]+\.)*(\w+)'", message)
        key = _config_key_of(named.group(1), argv) if named else None
    if reasons:
        return f"{key or 'config'}: {'; '.join(reasons)}"
    innermost = str(chain[-1]).strip()
    if innermost and "\n" not in innermost and not innermost.startswith("Expected a "):
        return f"{key or 'config'}: {innermost}"
    if key and expected:
        got = f", got {given_type.group(1) if given_type else 'value'} {given.group(1)!r}" if given else ""
        return f"{key}: expected {' or '.join(expected)}{got}"
    return " ".join(message.split())[:400]


def _raising_class(exc: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``exc`` (innermost), if any."""
    tb = exc.__traceback__
    owner = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            owner = type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return owner


def _config_key_of(class_name: str, argv: list[str]) -> str | None:
    """Where ``class_name`` is configured: ``model``/``data``/``trainer``, or a path like ``trainer.callbacks[0]``."""
    if class_name in _CLI_KEYS:
        return _CLI_KEYS[class_name]
    import yaml

    def walk(node: Any, path: str) -> str | None:
        if isinstance(node, dict):
            class_path = str(node.get("class_path", ""))
            if class_path == class_name or class_path.endswith("." + class_name):
                return path
            for key, value in node.items():
                if (found := walk(value, f"{path}.{key}" if path else str(key))) is not None:
                    return found
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if (found := walk(value, f"{path}[{i}]")) is not None:
                    return found
        return None

    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            try:
                with open(argv[i + 1]) as handle:
                    if (found := walk(yaml.safe_load(handle), "")) is not None:
                        return found
            except (OSError, yaml.YAMLError):
                continue
    return None


# --------------------------------------------------------------------------------------------- entry point

_USAGE = """usage: optsurvey {compare,list,theory,sync,fit,validate,test} ...

  compare    train optimizers (and strategies) on digits, one MLflow run each, and compare them
  list       print the registered optimizers, strategies and callbacks
  theory     run the survey's theorems as executable checks
  sync       deliver runs kept locally during a tracking-server outage
  fit, validate, test
             Lightning's CLI over your LightningModule/LightningDataModule (model.class_path, data.class_path)
             or ClassifierModule and DigitsDataModule (see `optsurvey fit --help`)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optsurvey`` console script."""
    import lightning_optsurvey  # noqa: F401  (registers the strategy names)

    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args_list else 2
    command = args_list[0]
    if command == "_run-one":
        config = RunConfig(**json.loads(args_list[1]))
        result = train_one(config)
        if result:  # global rank 0 only
            with open(args_list[2], "w") as f:
                json.dump(result, f)
        return 0
    if command in ("fit", "validate", "test", "predict"):
        try:
            return _lightning_cli(args_list)
        except CLIError as err:
            print(f"optsurvey {command}: error: {err}", file=sys.stderr)
            return 2

    parser = argparse.ArgumentParser(prog="optsurvey")
    sub = parser.add_subparsers(dest="command", required=True)
    _compare_parser(sub)
    p_list = sub.add_parser("list", help="print the registered optimizers, strategies and callbacks")
    p_list.add_argument("--markdown", action="store_true", help="print the optimizer table of the README")
    p_theory = sub.add_parser("theory", help="run the survey's theorems as executable checks")
    p_theory.add_argument("--only", default=None, help="run only the result of this name")
    p_theory.add_argument("--seed", type=int, default=0, help="seed of the synthetic problems (default: 0)")
    p_theory.add_argument("--tracking-uri", default=None, help="also log each check as an MLflow run")
    p_theory.add_argument("--experiment", default="optsurvey-theory")
    p_sync = sub.add_parser("sync", help="deliver runs kept locally during a tracking-server outage")
    p_sync.add_argument("--from", dest="source", required=True, help="the local store, e.g. sqlite:///optsurvey-outbox.db")
    p_sync.add_argument("--to", dest="target", required=True, help="the tracking server, http(s)://HOST:PORT")
    p_sync.add_argument("--experiment", default=None, help="only this experiment's runs (default: all)")
    args = parser.parse_args(args_list)
    handlers = {"compare": compare, "list": list_available, "theory": theory, "sync": sync_command}
    try:
        return handlers[args.command](args)
    except CLIError as err:
        print(f"optsurvey {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
