"""Every access of lightning_optsurvey to Lightning's internals, in one place.

Lightning's private names (attributes and functions that start with ``_``, the layout of its training-epoch
loop, the entries of its strategy registry) may change in any release without a deprecation. The package
reads and patches them only through the functions below, each with a comment naming the Lightning version it
was checked against, so an upgrade breaks in this file only, and ``tests/test_compat.py`` names the accessor
whose target is gone (:func:`missing_targets`) or says that the installed Lightning is outside
:data:`TESTED_LIGHTNING` (the range ``pyproject.toml`` declares).

Lightning has no public API for these needs (a strategy without the DDP wrapper that still refuses
``sync_batchnorm`` early, the SIGTERM broadcast before every batch that an asynchronous method must not make,
the epoch loop's validation decision, the logger step, the epoch-level logged results), which is why this
module exists rather than public calls.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric, _Sync
from torch import nn

__all__ = [
    "TESTED_LIGHTNING",
    "StrategyRegistryType",
    "attached_trainer",
    "checkpoint_saves_mid_epoch",
    "current_hook_name",
    "decide_validation",
    "describe_result_metric",
    "empty_result_metric",
    "epoch_loop",
    "epoch_results",
    "lightning_version",
    "logging_step",
    "missing_targets",
    "optimizer_to_device",
    "optimizers_to_device",
    "patch_epoch_loop",
    "process_group_backend",
    "process_group_timeout",
    "processed_batches",
    "refuse_layer_sync",
    "registered_strategy",
    "replace_sigterm_broadcast",
    "restore_epoch_loop",
    "set_process_group_timeout",
    "setup_without_ddp",
    "sync_module_states",
    "uses_distributed_sampler",
    "val_check_time_interval",
    "wants_validation",
]

TESTED_LIGHTNING = ">=2.6,<2.7"
"""The Lightning versions the accessors below were checked against (``pyproject.toml`` declares the same)."""

# Checked against Lightning 2.6.6: the fabric registry's class (lightning.fabric.strategies._StrategyRegistry),
# the type of ``register_strategies``' argument.
StrategyRegistryType = _StrategyRegistry

# Checked against Lightning 2.6.6 (lightning.fabric.utilities.optimizer): move optimizer state to a device.
optimizer_to_device = _optimizer_to_device
optimizers_to_device = _optimizers_to_device


def sync_module_states(module: nn.Module) -> None:
    """Broadcast rank 0's parameters and buffers to every rank (what the DDP wrapper does at construction).

    Checked against Lightning 2.6.6: ``lightning.pytorch.overrides.distributed._sync_module_states``.
    """
    _sync_module_states(module)


# ---------------------------------------------------------------------------------------------------------------
# LightningModule and Trainer attributes
# ---------------------------------------------------------------------------------------------------------------
def attached_trainer(module: LightningModule | None) -> Trainer | None:
    """The Trainer ``module`` is attached to, or ``None`` (the public ``module.trainer`` raises then).

    Checked against Lightning 2.6.6: ``LightningModule._trainer``.
    """
    return None if module is None else module._trainer


def current_hook_name(module: LightningModule) -> str | None:
    """The name of the LightningModule hook running now (``"training_step"``, ``"optimizer_step"``, ...).

    Checked against Lightning 2.6.6: ``LightningModule._current_fx_name`` (what ``self.log`` checks).
    """
    return module._current_fx_name


def val_check_time_interval(trainer: Trainer) -> Any:
    """``Trainer(val_check_interval=<a time>)``'s interval, ``None`` if validation is not time-based.

    Checked against Lightning 2.6.6: ``Trainer._val_check_time_interval``.
    """
    return trainer._val_check_time_interval


def uses_distributed_sampler(trainer: Trainer) -> bool:
    """``Trainer(use_distributed_sampler=...)`` (``True``: Lightning splits the data over the ranks).

    Checked against Lightning 2.6.6: ``Trainer._accelerator_connector.use_distributed_sampler``.
    """
    return bool(getattr(trainer._accelerator_connector, "use_distributed_sampler", True))


def checkpoint_saves_mid_epoch(callback: ModelCheckpoint) -> bool:
    """Whether a ``ModelCheckpoint`` saves every n training steps or on a time interval (inside epochs).

    Checked against Lightning 2.6.6: ``ModelCheckpoint._every_n_train_steps`` and ``_train_time_interval``.
    """
    return callback._every_n_train_steps > 0 or callback._train_time_interval is not None


def registered_strategy(name: str) -> tuple[type | None, dict[str, Any]]:
    """The class and the init parameters registered under ``name`` in ``StrategyRegistry`` (``(None, {})``).

    Checked against Lightning 2.6.6: an entry is a dict with keys ``"strategy"`` and ``"init_params"``.
    """
    entry = dict.get(StrategyRegistry, name) or {}
    kind = entry.get("strategy")
    return (kind if isinstance(kind, type) else None), dict(entry.get("init_params", {}))


# ---------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------
def refuse_layer_sync(reason: str) -> Callable[[type], type]:
    """Class decorator: ``Trainer(strategy=cls(), sync_batchnorm=True)`` raises ``ValueError`` in ``Trainer.__init__``.

    ``reason`` completes "<class> does not support sync_batchnorm=True: ...".

    Checked against Lightning 2.6.6: ``ParallelStrategy.__init__`` sets ``self._layer_sync = None`` and the
    accelerator connector assigns ``strategy._layer_sync`` (a ``TorchSyncBatchNorm`` when asked) in
    ``Trainer.__init__``; ``DDPStrategy.setup`` applies it when not ``None``. A property that refuses any
    other value makes the error early and keeps the layer sync from ever being applied.
    """

    def decorate(cls: type) -> type:
        def get(self: Any) -> None:
            return None

        def set_(self: Any, value: Any) -> None:
            if value is not None:
                raise ValueError(f"{type(self).__name__} does not support sync_batchnorm=True: {reason}")

        cls._layer_sync = property(get, set_)  # type: ignore[attr-defined]
        return cls

    return decorate


def process_group_backend(strategy: DDPStrategy) -> str:
    """The backend the strategy's process group uses (given, or the device's default), recorded on it.

    Checked against Lightning 2.6.6: ``DDPStrategy._process_group_backend`` (given or ``None``) and
    ``_get_process_group_backend()`` (the default by device), as ``DDPStrategy.setup_distributed`` resolves it.
    """
    strategy._process_group_backend = strategy._get_process_group_backend()
    return strategy._process_group_backend


def process_group_timeout(strategy: DDPStrategy) -> Any:
    """The timeout ``DDPStrategy.setup_distributed`` gives the process group.

    Checked against Lightning 2.6.6: ``DDPStrategy._timeout``.
    """
    return strategy._timeout


def set_process_group_timeout(strategy: DDPStrategy, timeout: Any) -> None:
    """Set the timeout ``DDPStrategy.setup_distributed`` will give the process group (call before it)."""
    strategy._timeout = timeout


def setup_without_ddp(strategy: DDPStrategy, trainer: Trainer) -> None:
    """``Strategy.setup`` for a DDP subclass outside fitting, without DDP's broadcast of rank 0's module.

    Checked against Lightning 2.6.6: ``DDPStrategy.setup`` outside fitting is ``Strategy.setup`` (accelerator,
    precision conversion, device, ``_setup_model``, precision plugin) plus ``_sync_module_states`` on the
    model, because it does not wrap. A strategy whose ranks keep their own models after a fit must not be
    overwritten by rank 0's; its ``_setup_model`` decides whether to broadcast.
    """
    super(ParallelStrategy, strategy).setup(trainer)


# ---------------------------------------------------------------------------------------------------------------
# The training-epoch loop
# ---------------------------------------------------------------------------------------------------------------
_EPOCH_LOOP_PATCHES = ("_broadcast_sigterm_tensor", "run", "on_advance_end", "_should_check_val_fx")


def epoch_loop(trainer: Trainer) -> Any:
    """The fit's training-epoch loop (``max_steps``, ``global_step``, ``batch_progress``, ``val_loop``, ...).

    Checked against Lightning 2.6.6: ``trainer.fit_loop.epoch_loop`` (a ``_TrainingEpochLoop``).
    """
    return trainer.fit_loop.epoch_loop


def processed_batches(trainer: Trainer) -> int:
    """Training batches processed in the current epoch (restored with a mid-epoch checkpoint).

    Checked against Lightning 2.6.6: ``fit_loop.epoch_loop.batch_progress.current.processed``.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def is_last_batch(trainer: Trainer) -> bool:
    """Whether the batch just processed was the last of its epoch.

    Checked against Lightning 2.6.6: ``fit_loop.epoch_loop.batch_progress.is_last_batch``.
    """
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def logging_step(trainer: Trainer) -> int:
    """The step Lightning passes to ``logger.log_metrics`` (optimizer steps taken, counted once per batch).

    Checked against Lightning 2.6.6: ``fit_loop.epoch_loop._batches_that_stepped``.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def epoch_results(trainer: Trainer) -> Any:
    """The training loop's logged results (a ``_ResultCollection``: key -> ``_ResultMetric``).

    Checked against Lightning 2.6.6: ``fit_loop.epoch_loop._results``.
    """
    return trainer.fit_loop.epoch_loop._results


def replace_sigterm_broadcast(trainer: Trainer, check: Callable[[], None]) -> bool:
    """Replace the broadcast of rank 0's SIGTERM flag before every training batch by ``check``.

    Returns whether the loop has that broadcast (``False``: nothing was replaced). Undone by
    :func:`restore_epoch_loop`.

    Checked against Lightning 2.6.6: ``_TrainingEpochLoop.advance`` calls ``self._broadcast_sigterm_tensor()``
    (a collective since Lightning 2.5).
    """
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_broadcast_sigterm_tensor"):
        return False
    loop._broadcast_sigterm_tensor = check
    return True


def patch_epoch_loop(trainer: Trainer, **methods: Callable[..., Any]) -> Any | None:
    """Replace public methods of this fit's epoch loop (``run``, ``on_advance_end``) on the instance.

    Returns the loop, or ``None`` (and patches nothing) if this Lightning's loop lacks what the uneven-data
    protocol hooks into. Undone by :func:`restore_epoch_loop`.

    Checked against Lightning 2.6.6: ``_TrainingEpochLoop.run(data_fetcher)`` and
    ``on_advance_end(data_fetcher)``, ``done``, ``val_loop``, ``_should_check_val_fx``, ``_skip_next_val``.
    """
    loop = trainer.fit_loop.epoch_loop
    needed = ("_broadcast_sigterm_tensor", "_should_check_val_fx", "_skip_next_val", "val_loop", "done", *methods)
    if not all(hasattr(loop, name) for name in needed):
        return None
    for name, method in methods.items():
        setattr(loop, name, method)
    return loop


def restore_epoch_loop(trainer: Trainer) -> None:
    """Undo :func:`patch_epoch_loop`, :func:`replace_sigterm_broadcast` and :func:`decide_validation`."""
    loop = trainer.fit_loop.epoch_loop
    for name in _EPOCH_LOOP_PATCHES:
        loop.__dict__.pop(name, None)


def wants_validation(loop: Any, data_fetcher: Any) -> bool:
    """Whether the epoch loop would run validation after the current batch.

    Checked against Lightning 2.6.6: ``_TrainingEpochLoop._should_check_val_fx(data_fetcher)`` and
    ``_skip_next_val`` (set after a mid-epoch resume).
    """
    return bool(loop._should_check_val_fx(data_fetcher)) and not loop._skip_next_val


@contextlib.contextmanager
def decide_validation(loop: Any, decision: bool) -> Iterator[None]:
    """Inside the block, the epoch loop validates after the current batch iff ``decision``.

    Checked against Lightning 2.6.6: ``on_advance_end`` asks ``self._should_check_val_fx(data_fetcher)``.
    """
    loop._should_check_val_fx = lambda _fetcher: decision
    try:
        yield
    finally:
        loop.__dict__.pop("_should_check_val_fx", None)


def describe_result_metric(metric: Any) -> dict[str, Any]:
    """A picklable description of a logged result, from which :func:`empty_result_metric` rebuilds it empty.

    Checked against Lightning 2.6.6: ``_ResultMetric.meta`` (a ``_Metadata``), ``is_tensor``, ``value``.
    """
    meta = metric.meta
    return {
        "fx": meta.fx, "name": meta.name, "prog_bar": meta.prog_bar, "logger": meta.logger,
        "on_step": meta.on_step, "on_epoch": meta.on_epoch,
        "reduce_fx": "max" if meta.is_max_reduction else "min" if meta.is_min_reduction
        else "sum" if meta.is_sum_reduction else "mean",
        "enable_graph": meta.enable_graph, "add_dataloader_idx": meta.add_dataloader_idx,
        "dataloader_idx": meta.dataloader_idx, "metric_attribute": meta.metric_attribute,
        "sync_dist": meta.sync.should, "rank_zero_only": meta.sync.rank_zero_only,
        "is_tensor": metric.is_tensor,
        "dtype": metric.value.dtype if metric.is_tensor else None,
    }


def empty_result_metric(description: Mapping[str, Any], reduce: Callable[..., Any], value: Any = None) -> Any:
    """A result entry with nothing accumulated, as :func:`describe_result_metric` described one.

    ``reduce`` is the strategy's reduce (the sync function); ``value`` is the torchmetrics object of a
    non-tensor entry. The entry's ``has_reset`` is ``True`` (it takes part in no reduction until set).

    Checked against Lightning 2.6.6: ``_Metadata(...)``, ``_Sync(_should=, fn=, rank_zero_only=)``,
    ``_ResultMetric(meta, is_tensor)`` and torchmetrics' ``Metric._defaults`` (what ``reset`` restores).
    """
    meta = _Metadata(
        fx=description["fx"], name=description["name"], prog_bar=description["prog_bar"],
        logger=description["logger"], on_step=description["on_step"], on_epoch=description["on_epoch"],
        reduce_fx=description["reduce_fx"], enable_graph=description["enable_graph"],
        add_dataloader_idx=description["add_dataloader_idx"], dataloader_idx=description["dataloader_idx"],
        metric_attribute=description["metric_attribute"],
    )
    meta.sync = _Sync(_should=description["sync_dist"], fn=reduce, rank_zero_only=description["rank_zero_only"])
    metric = _ResultMetric(meta, description["is_tensor"])
    if description["is_tensor"]:  # the others' dtype (the default dtype differs outside forward contexts)
        metric.value = metric.value.to(description["dtype"])
        metric._defaults["value"] = metric._defaults["value"].to(description["dtype"])
    else:
        metric.value = value
    return metric


# ---------------------------------------------------------------------------------------------------------------
# The check of every accessor's target
# ---------------------------------------------------------------------------------------------------------------
def _probes() -> dict[str, Callable[[], bool]]:
    from lightning.pytorch.strategies import DDPStrategy as _DDP
    from lightning.pytorch.trainer.connectors import accelerator_connector

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    loop = trainer.fit_loop.epoch_loop
    module = LightningModule()
    checkpoint = ModelCheckpoint()
    metric = _ResultMetric(_Metadata(fx="training_step", name="x"), True)
    loop_source = inspect.getsource(type(loop))
    return {
        "attached_trainer: LightningModule._trainer": lambda: hasattr(module, "_trainer"),
        "current_hook_name: LightningModule._current_fx_name": lambda: hasattr(module, "_current_fx_name"),
        "val_check_time_interval: Trainer._val_check_time_interval":
            lambda: hasattr(trainer, "_val_check_time_interval"),
        "uses_distributed_sampler: Trainer._accelerator_connector.use_distributed_sampler":
            lambda: hasattr(trainer._accelerator_connector, "use_distributed_sampler"),
        "checkpoint_saves_mid_epoch: ModelCheckpoint._every_n_train_steps/_train_time_interval":
            lambda: hasattr(checkpoint, "_every_n_train_steps") and hasattr(checkpoint, "_train_time_interval"),
        "registered_strategy: StrategyRegistry entries with 'strategy' and 'init_params'":
            lambda: {"strategy", "init_params"} <= set(dict.get(StrategyRegistry, "ddp", {})),
        "refuse_layer_sync: the accelerator connector assigns strategy._layer_sync":
            lambda: "strategy._layer_sync = " in inspect.getsource(accelerator_connector)
            and "_layer_sync" in inspect.getsource(ParallelStrategy.__init__),
        "setup_without_ddp: DDPStrategy.setup calls configure_ddp when fitting, _sync_module_states otherwise":
            lambda: "self.configure_ddp()" in inspect.getsource(_DDP.setup)
            and "_sync_module_states(self.model)" in inspect.getsource(_DDP.setup),
        "LocalModelStrategy: DDPStrategy.configure_ddp calls _setup_model":
            lambda: "self._setup_model(" in inspect.getsource(_DDP.configure_ddp),
        "LocalModelStrategy: the accelerator connector calls strategy._configure_launcher() in Trainer.__init__":
            lambda: "self.strategy._configure_launcher()" in inspect.getsource(accelerator_connector),
        "process_group_backend/process_group_timeout: DDPStrategy._process_group_backend, _timeout":
            lambda: hasattr(_DDP(), "_timeout") and hasattr(_DDP(), "_process_group_backend")
            and callable(getattr(_DDP, "_get_process_group_backend", None))
            and '"timeout": self._timeout' in inspect.getsource(_DDP.setup_distributed),
        "epoch_loop/processed_batches: trainer.fit_loop.epoch_loop.batch_progress.current.processed":
            lambda: hasattr(loop.batch_progress.current, "processed"),
        "logging_step: epoch_loop._batches_that_stepped": lambda: hasattr(loop, "_batches_that_stepped"),
        "epoch_results: epoch_loop._results": lambda: hasattr(loop, "_results"),
        "replace_sigterm_broadcast: epoch_loop calls self._broadcast_sigterm_tensor()":
            lambda: "self._broadcast_sigterm_tensor()" in loop_source,
        "patch_epoch_loop: epoch_loop.run/on_advance_end/done/val_loop":
            lambda: all(hasattr(loop, n) for n in ("run", "on_advance_end", "done", "val_loop", "max_steps")),
        "wants_validation/decide_validation: epoch_loop._should_check_val_fx and _skip_next_val":
            lambda: "self._should_check_val_fx(data_fetcher)" in loop_source and hasattr(loop, "_skip_next_val"),
        "describe/empty_result_metric: _ResultMetric meta, is_tensor, value, _defaults['value']":
            lambda: all(hasattr(metric, n) for n in ("meta", "is_tensor", "value", "has_reset"))
            and "value" in metric._defaults,
        "optimizer_to_device/optimizers_to_device/sync_module_states": lambda: all(
            callable(f) for f in (_optimizer_to_device, _optimizers_to_device, _sync_module_states)),
        "StrategyRegistryType: lightning.fabric.strategies._StrategyRegistry":
            lambda: isinstance(StrategyRegistry, _StrategyRegistry),
    }


def missing_targets() -> list[str]:
    """The accessors of this module whose Lightning target is missing in the installed Lightning (``[]``: none).

    Builds a CPU Trainer, a LightningModule and a ModelCheckpoint (no fit) and checks that each attribute,
    method or call the accessors rely on is there.
    """
    missing = []
    for name, probe in _probes().items():
        try:
            ok = probe()
        except Exception as err:  # an accessor's target may fail in any way when Lightning changed
            ok, name = False, f"{name} ({type(err).__name__}: {err})"
        if not ok:
            missing.append(name)
    return missing


def lightning_version() -> str:
    """The installed Lightning version."""
    return lightning.__version__
