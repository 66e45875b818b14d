"""``optsurvey compare``: train optimizers (x seed x strategy) as MLflow runs and print a summary table.

Each run is a :class:`RunConfig`. One-process runs train in this process; a multi-process run is launched
as ``python -m lightning_optsurvey.cli.worker RUN.json RESULT.json`` (Lightning's DDP launcher re-executes
that command line for each extra rank, so a fresh process per run keeps the re-execution to this one run),
the run read from a config file written by :func:`write_run_config`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from lightning_optsurvey.cli import _common as common
from lightning_optsurvey.cli._common import DEFAULT_TRACKING_URI, CLIError
from lightning_optsurvey.cli.preflight import check_compare, check_tracking_uri, check_user_classes
from lightning_optsurvey.cli.sync import start_delivery

DEFAULT_EXPERIMENT = "optsurvey-compare"
DEFAULT_OPTIMIZERS = ("sgd", "momentum", "adam", "sam")
_SUMMARY_METRICS = ("val/acc", "val/loss", "train/loss")
# What the measuring callbacks log that belongs in the summary table, in this order (when present).
_MEASURED_METRICS = ("hessian/eig_1", "hessian/eig_2", "hessian/trace", "sharpness/sam", "gen_gap/loss",
                     "gen_gap/acc", "gossip/consensus_distance", "comm/bytes_sent")


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


def write_run_config(config: RunConfig, path: str) -> None:
    """Write ``config`` as a JSON file that :func:`read_run_config` reads back."""
    with open(path, "w") as handle:
        json.dump(asdict(config), handle, indent=1)


def read_run_config(path: str) -> RunConfig:
    """The :class:`RunConfig` of a file written by :func:`write_run_config`.

    Raises:
        ValueError: If the file holds keys that are not fields of :class:`RunConfig`.
    """
    with open(path) as handle:
        data = json.load(handle)
    unknown = sorted(set(data) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise ValueError(f"run config {path} has unknown keys {unknown}")
    return RunConfig(**data)


def build_strategy(config: RunConfig) -> Any:
    """The run's strategy: its registered name, or the registered object with ``--timeout`` applied."""
    if config.strategy is None:
        return "auto"
    if config.timeout is None:
        return config.strategy
    from datetime import timedelta

    from lightning_optsurvey._compat import registered_strategy

    kind, init_params = registered_strategy(config.strategy)
    return kind(**{**init_params, "timeout": timedelta(seconds=config.timeout)})


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
        strategy=build_strategy(config),
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
    with tempfile.TemporaryDirectory() as tmp:
        run_file, result_file = os.path.join(tmp, "run.json"), os.path.join(tmp, "result.json")
        write_run_config(config, run_file)
        command = [sys.executable, "-m", "lightning_optsurvey.cli.worker", run_file, result_file]
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0 or not os.path.exists(result_file):
            raise RuntimeError(f"its processes failed (exit code {completed.returncode})")
        with open(result_file) as f:
            return json.load(f)


def plan(args: argparse.Namespace) -> list[RunConfig]:
    """Every check of the grid (nothing is created), then its runs."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_optsurvey.optim import available_optimizers, create_optimizer, get_spec
    from lightning_optsurvey.tasks import available_models, build_model
    from lightning_optsurvey.tasks.classifier import check_optimizer_kwargs
    from lightning_optsurvey.tasks.partition import check_partition_args

    known = available_optimizers()
    unknown = [o for o in args.optimizers if o not in known]
    if unknown:
        raise CLIError(f"unknown optimizer(s) {', '.join(unknown)}; known optimizers: {', '.join(known)}")
    if args.model not in available_models():
        raise CLIError(f"unknown model {args.model!r}; known models: {', '.join(available_models())}")
    check_user_classes(args.module, args.datamodule, with_kwargs=bool(args.hparam))
    strategies: list[str | None] = list(args.strategy) if args.strategy else [None]
    known_strategies = sorted(StrategyRegistry.available_strategies())
    for s in strategies:
        if s is not None and s not in known_strategies:
            raise CLIError(f"unknown strategy {s!r}; known strategies: {', '.join(known_strategies)}")
    if args.devices * args.num_nodes > 1 and strategies == [None]:
        strategies = ["ddp"]
    check_compare(args, strategies)
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
    try:
        check_partition_args(args.partition, args.alpha, args.shards_per_rank)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    if args.datamodule and args.partition != "iid":
        raise CLIError(
            f"--partition {args.partition} splits the digits task; with --datamodule, split in your datamodule's "
            f"train_dataloader (lightning_optsurvey.tasks.partition_indices and PartitionSampler.for_rank)"
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


def run(args: argparse.Namespace) -> int:
    """Run ``optsurvey compare``; returns the exit code."""
    from lightning_optsurvey.tracking import (
        deliver_pending,
        ensure_experiment,
        fail_unfinished_runs,
        read_run,
        ui_hint,
        upload_command,
    )

    configs = plan(args)
    delivery = start_delivery(args.tracking_uri, args.outbox, args.experiment)
    if delivery is not None:  # a tracking server: runs are logged locally, delivered behind them
        configs = [replace(c, tracking_uri=delivery.local_uri) for c in configs]
    try:
        experiment_id = ensure_experiment(args.tracking_uri, args.experiment)
    except ValueError as err:
        raise CLIError(str(err)) from None
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    for i, config in enumerate(configs, start=1):
        print(f"run {i}/{len(configs)}: {config.run_name}", file=sys.stderr, flush=True)
        multi = config.devices * config.num_nodes > 1
        try:
            result = _train_in_subprocess(config) if multi else train_one(config)
        except Exception as err:  # one failed run (a crash in the user's module, a dead rank) ends only itself
            if not multi:
                traceback.print_exc()
            fail_unfinished_runs(config.tracking_uri, config.experiment, config.run_name)  # a killed rank's run
            print(f"optsurvey compare: run {config.run_name} failed: {type(err).__name__}: {err}", file=sys.stderr,
                  flush=True)
            failed.append(config.run_name)
            continue
        if delivery is not None:
            delivery.submit(result["run_id"])
        metrics, tags = read_run(config.tracking_uri, result["run_id"])
        row = {"optimizer": config.optimizer, "seed": config.seed, "strategy": config.strategy or "single",
               "seconds": result["seconds"], **metrics}
        if tags.get("diverged") == "true":
            row["diverged"] = f"step {tags.get('diverged_step')}"
        rows.append(row)
    if not rows:
        where = ""
        if delivery is not None:  # end the delivery thread; the failed runs' records stay in the outbox
            deliver_pending(delivery, args.sync_wait, args.outbox, args.experiment)
            command = upload_command(args.outbox, args.tracking_uri, args.experiment)
            where = f"; their records are in {args.outbox} ({command})"
        raise CLIError(f"every run failed ({', '.join(failed)}); see the errors above{where}")
    columns = ["optimizer", "seed"]
    if any(c.strategy for c in configs):
        columns.append("strategy")
    columns += [*_SUMMARY_METRICS, "seconds", *(m for m in _MEASURED_METRICS if any(m in r for r in rows))]
    if any("diverged" in r for r in rows):
        columns.append("diverged")
    print()
    print(common.format_table(rows, columns))
    best = max(rows, key=lambda r: r.get("val/acc", float("-inf")))
    command, address = ui_hint(args.tracking_uri, experiment_id)
    print(f"\nbest: {best['optimizer']} (seed {best['seed']}) val/acc={best.get('val/acc', float('nan')):.4f}")
    print(f"\n{len(rows)} runs in experiment {args.experiment!r} (id {experiment_id}) at {args.tracking_uri}")
    print(f"open the MLflow UI:  {command}")
    print(f"then browse:         {address}")
    if delivery is not None:
        deliver_pending(delivery, args.sync_wait, args.outbox, args.experiment)
    if failed:
        print(f"optsurvey compare: error: {len(failed)} of {len(configs)} runs failed (marked FAILED in MLflow): "
              f"{', '.join(failed)}", file=sys.stderr)
        if delivery is not None:  # only finished runs are delivered behind the grid; sync takes the failed ones
            print(f"their records stay in {args.outbox}; upload them with:\n  "
                  f"{upload_command(args.outbox, args.tracking_uri, args.experiment)}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    """Add ``compare`` to the sub-command parsers ``sub``."""
    p = sub.add_parser("compare", help="train optimizers/strategies on digits as MLflow runs and compare them",
                       description="Train each optimizer (x seed x strategy) on the digits task with the measuring "
                                   "callbacks, one MLflow run each, then print a summary table.")
    p.add_argument("--optimizers", type=common.name_list, default=list(DEFAULT_OPTIMIZERS),
                   help=f"comma-separated registry names (default: {','.join(DEFAULT_OPTIMIZERS)})")
    p.add_argument("--model", default="cnn", help="model name of the built-in ClassifierModule (default: cnn)")
    p.add_argument("--module", default=None, metavar="PKG.MOD:CLASS",
                   help="your LightningModule, importable from the working directory; it is built as "
                        "Class(optimizer=NAME[, optimizer_kwargs={...}]) for each optimizer "
                        "(default: ClassifierModule)")
    p.add_argument("--datamodule", default=None, metavar="PKG.MOD:CLASS",
                   help="your LightningDataModule, given batch_size and seed when it takes them (default: digits)")
    p.add_argument("--strategy", type=common.name_list, default=None,
                   help="comma-separated strategy names (default: single device, or ddp with --devices > 1)")
    p.add_argument("--devices", type=common.positive_int, default=1, help="processes (or GPUs) per node")
    p.add_argument("--num-nodes", type=common.positive_int, default=1, help="nodes")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"], help="default: cpu")
    p.add_argument("--max-epochs", type=common.positive_int, default=10)
    p.add_argument("--batch-size", type=common.positive_int, default=64)
    p.add_argument("--seeds", type=common.int_list, default=[0], help="comma-separated seeds (default: 0)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"default: {DEFAULT_EXPERIMENT}")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help=f"default: {DEFAULT_TRACKING_URI}")
    p.add_argument("--hparam", type=common.hparam, action="append", metavar="OPT.KEY=VALUE",
                   help="override a hyperparameter, e.g. --hparam adam.lr=0.003 (repeatable)")
    p.add_argument("--no-measure", action="store_true", help="skip the measuring callbacks")
    p.add_argument("--partition", default="iid", help="training data over ranks: iid (default), dirichlet, shards")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --partition dirichlet")
    p.add_argument("--shards-per-rank", type=int, default=2, help="shards per rank for --partition shards")
    p.add_argument("--swa", action="store_true",
                   help="stochastic weight averaging (Izmailov et al. 2018) over the last quarter of the epochs, "
                        "BatchNorm recomputed; validation and the swa/ measurements are of the averaged model")
    p.add_argument("--limit-train-batches", type=common.limit_batches, default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=common.seconds, default=None,
                   help="seconds a rank waits for its peers before the run stops with an error naming the "
                        "rank that failed (default: the strategy's; 300 for ours on CPU)")
    p.add_argument("--stop-on-divergence", action="store_true",
                   help="end a run at the step its loss becomes non-finite (it is reported either way)")
    common.add_outbox_arguments(p)
    p.set_defaults(handler=run)
