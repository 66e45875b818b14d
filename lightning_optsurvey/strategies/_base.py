"""Bases for strategies in which every rank trains its own copy of the model.

Gossip (D-PSGD, SGP) and the centralized model-averaging methods (local SGD, EASGD, LSGD) share the
same skeleton, which :class:`LocalModelStrategy` (a :class:`~lightning.pytorch.strategies.DDPStrategy`
subclass) provides so each method only writes its communication:

- No ``DistributedDataParallel`` wrapper: each rank steps on its own gradient. ``reduce``,
  ``barrier``, ``broadcast`` and ``all_gather`` stay global (inherited from DDP), so
  ``self.log(..., sync_dist=True)``, ``ModelCheckpoint`` and ``EarlyStopping`` work unchanged.
- At the first fit the ranks start from rank 0's parameters and buffers (as DDP does); later stages
  of the same Trainer (validate/test after fit) and resumed runs keep each rank's own model.
- ``Trainer(sync_batchnorm=True)`` raises ``ValueError`` in ``Trainer.__init__``: per-rank models
  normalize with their own statistics.
- World size 1: a warning, no process group, local training.
- Every ``optimizer_step`` calls :meth:`LocalModelStrategy._pre_optimizer_step` and
  :meth:`LocalModelStrategy._post_optimizer_step` around the step (the closure, i.e. forward and
  backward, runs inside the step, and :meth:`LocalModelStrategy._after_backward` after each closure
  evaluation, before gradient clipping), then logs ``comm/bytes_sent``: the bytes this rank sent in the
  current batch, counted by :attr:`LocalModelStrategy.comm` (a :class:`~._comm.CommCounter`).
- At train start, :meth:`LocalModelStrategy._logged_params` go to every logger's
  ``log_hyperparams`` (``world_size`` and whatever the subclass adds, e.g. ``topology``,
  ``spectral_gap``).
- Checkpoints: :meth:`lightning_module_state_dict` returns :meth:`consensus_state_dict` (the average
  over ranks of the floating-point entries, weighted by :meth:`_consensus_weight` if given), so a
  checkpoint loads into a single-device Trainer as the consensus model. :meth:`save_checkpoint`
  gathers every rank's own module state, optimizer states and :meth:`_rank_state` to rank 0 and
  stores them under ``checkpoint["per_rank_states"]``; a run resumed with the same strategy and world
  size loads its own rank's entry and continues exactly, other runs load the consensus.

One model per run: :meth:`LocalModelStrategy.checkpoint_model_state` is the run's model (the consensus
average; EASGD's center). Checkpoints store it, and validation, test and predict evaluate it on every
rank (loaded into the module at ``on_validation_start``/``on_test_start``/``on_predict_start``, each
rank's own model put back at the end), so the metrics Lightning logs, and ``ModelCheckpoint``'s score,
describe the file. ``validate/test/predict(ckpt_path=...)`` outside a resumed fit load the checkpoint's
model on every rank, equal to a 1-process evaluation of the file.

Uneven data (ranks with different numbers of training batches in an epoch, none included): a rank that
runs out of batches keeps answering the others' communication until every rank has finished the
epoch (a join, as ``torch.distributed.algorithms.Join`` does for DDP). The protocol is one control
message per training batch, an all-reduce of a few integers that replaces the SIGTERM broadcast Lightning
2.6's loop makes before every batch: each rank's state (training, out of data with or without steps not
yet communicated), SIGTERM flags, and, while a rank is out of data, an announcement before each round and
each ``reduce``/``barrier``/``broadcast`` of the strategy (``self.log(..., sync_dist=True)`` then
averages over the ranks that log). Ranks out of data take part in rounds as each method's docstring
says (local SGD, EASGD and GRAWA weight them 0 unless they have steps not yet communicated; gossip
relays with a zero update; LSGD picks the leader among ranks with fresh losses). After the epoch the
ranks agree on validating (every rank validates, on the run's model) and on stopping (``max_steps`` on
one rank stops all), the step schedule follows the rank that ran the most steps, epoch-level logged
values are reduced over the batches that were run, and every rank's number of batches is logged as
``data/batches_rank_<r>`` (and kept in ``batches_per_rank``). Features that communicate in the middle
of an epoch, where a rank out of data cannot take part (validation inside the epoch, ``ModelCheckpoint``
every n steps, ``ConsensusDistance`` every n steps, post-local SGD's warm-up), stop all ranks with a clear
``RuntimeError`` as soon as their batches differ. A sized train loader of length 0 on a rank ends
Lightning's fit on that rank, so use an iterable loader for a rank without data.

Peers: ``timeout`` defaults to :data:`DEFAULT_CPU_TIMEOUT` (5 minutes) with gloo, and when a
collective fails, the error names the failed rank (a rank that raised stores its error in the process
group's TCP store; survivors check in there and name the ranks that do not).

Subclass hooks (all optional): ``_validate_world_size(n)`` (raise ``ValueError`` early; called in
``Trainer.__init__`` and at setup), ``_on_fit_setup()`` (model and optimizers are on the device),
``_pre_optimizer_step(optimizer)``, ``_after_backward(optimizer)``, ``_post_optimizer_step(optimizer)``,
``_rank_state()`` /
``_load_rank_state(state)`` (extra per-rank state; call ``super()``), ``_logged_params()`` (call
``super()``), ``_consensus_weight()``. Helpers: :meth:`synced_tensors` lists what a method should
communicate (the optimizers' parameters, then the module's floating-point buffers);
:meth:`_log_metric` logs a per-step value from inside the optimizer step.

:class:`PeriodicSyncStrategy` adds the schedule every method here shares: communicate after every
``sync_every``-th optimizer step (gossip's ``gossip_every``; local SGD, EASGD and LSGD's period), with
the step and synchronization counters in each rank's checkpointed state, and flat buffers over
:meth:`LocalModelStrategy.synced_tensors`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.data import sized_len
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey import _compat
from lightning_optsurvey.strategies._comm import (
    CommCounter,
    FlatBuffers,
    all_reduce_mean_,
    all_reduce_sum_,
    is_distributed,
)
from lightning_optsurvey.validation import check_float, check_int, check_type

__all__ = [
    "DEFAULT_CPU_TIMEOUT",
    "PER_RANK_STATES_KEY",
    "LocalModelStrategy",
    "PeriodicSyncStrategy",
    "check_ddp_kwargs",
    "check_timeout",
    "log_run_params",
    "log_step_metric",
]

PER_RANK_STATES_KEY = "per_rank_states"
"""Checkpoint key of the per-rank states: ``{"strategy", "world_size", "ranks": [state_0, ...]}``."""

_DDP_STRATEGY_KWARGS = frozenset({
    "accelerator",
    "parallel_devices",
    "cluster_environment",
    "checkpoint_io",
    "precision_plugin",
    "process_group_backend",
    "timeout",
    "start_method",
})
_LOGGING_HOOKS = frozenset({"optimizer_step", "training_step"})

# The uneven-data protocol (see "Uneven data" in the module docstring). One control message is an
# all-reduce (MAX) of an int64 vector: _NUM_FIELDS fields, then one state slot per rank, one batch count
# per rank, and the number of batches each rank's loader has this epoch (0: unknown) (each rank writes only
# its own slots).
_OP_WAIT, _OP_STEP, _OP_ROUND, _OP_REDUCE, _OP_BARRIER, _OP_BROADCAST = range(6)
_IDLE, _PENDING, _ACTIVE, _LAST = range(4)  # a rank's slot: out of data (with / without an unsent update),
# training this batch (and more / and this is its last)
(_F_OP, _F_ARG1, _F_ARG2, _F_ARG3, _F_SIGTERM, _F_REFUSE, _F_VALIDATE, _F_STOP, _F_STEPS, _NUM_FIELDS) = range(10)
_REDUCE_OPS = ("sum", "mean", "max", "min")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8)
_REFUSALS = {
    1: "validation inside the epoch (val_check_interval < 1 epoch, a time interval, or check_val_every_n_epoch=None)",
    2: "ModelCheckpoint saving every n training steps or on a time interval",
    4: "post-local SGD's synchronous warm-up (gradients averaged every step)",
    8: "ConsensusDistance measuring every n steps",
    16: "a gossip algorithm whose per-rank state advances with every rank's step (d2, gradient_tracking, choco)",
}


def log_step_metric(module: LightningModule | None, name: str, value: float) -> None:
    """``module.log(name, value)`` at this step, from inside a strategy's ``optimizer_step``.

    A no-op outside the training hooks, where Lightning refuses ``self.log`` (e.g. a manual ``optimizer.step()``
    in ``on_train_epoch_end``), and without a Trainer.
    """
    if _compat.attached_trainer(module) is None or _compat.current_hook_name(module) not in _LOGGING_HOOKS:
        return
    module.log(name, value, on_step=True, on_epoch=False)


def log_run_params(module: LightningModule | None, params: Mapping[str, Any]) -> None:
    """Send a strategy's parameters to every logger of the module's Trainer (none without a Trainer)."""
    trainer = _compat.attached_trainer(module)
    if trainer is not None:
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(params))


def _to_cpu_copy(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().to("cpu", copy=True))


def check_ddp_kwargs(owner: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming any keyword that is not a wrapper-free DDPStrategy argument.

    For subclasses that take ``**ddp_kwargs``: a clearer message than Python's "unexpected keyword".
    """
    unknown = sorted(set(kwargs) - _DDP_STRATEGY_KWARGS)
    if unknown:
        raise TypeError(
            f"{owner} does not wrap the model in DistributedDataParallel, so it does not take {unknown}; "
            f"it takes: {sorted(_DDP_STRATEGY_KWARGS)}"
        )


@_compat.refuse_layer_sync(
    "each rank keeps its own model and BatchNorm statistics (they are averaged with the parameters). "
    "Use sync_batchnorm=False."
)
class LocalModelStrategy(DDPStrategy):
    """DDP without the DDP wrapper: per-rank models, consensus checkpoints, byte accounting.

    The keyword arguments are those of :class:`~lightning.pytorch.strategies.DDPStrategy` that make sense
    without the wrapper. They are named explicitly (no ``**kwargs``), so LightningCLI's ``class_path``
    configs resolve exactly these and never ``DistributedDataParallel``'s.

    Args:
        accelerator: See :class:`~lightning.pytorch.strategies.DDPStrategy`.
        parallel_devices: Devices of this node (set by the Trainer).
        cluster_environment: Cluster environment (set by the Trainer).
        checkpoint_io: Checkpoint IO plugin.
        precision_plugin: Precision plugin.
        process_group_backend: ``"gloo"``, ``"nccl"``, ... (default: by device).
        timeout: How long a collective waits for a peer before failing, as a ``timedelta`` or in
            seconds. Default: :data:`DEFAULT_CPU_TIMEOUT` (5 minutes) with gloo (CPU), Lightning's
            30 minutes otherwise. A frozen peer thus stops a CPU run after 5 minutes, not 30.
        start_method: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``.

    Raises:
        TypeError: For any other keyword (``find_unused_parameters``, ``ddp_comm_hook``, ...): those
            configure ``DistributedDataParallel``, which these strategies do not use.
    """

    uneven_data_join: bool = True
    """Whether ranks out of data keep answering the others' rounds (one control message per batch).

    Asynchronous methods, whose ranks never wait for each other per step, set it to ``False``."""
    evaluate_run_model: bool = True
    """Whether validation, test and predict evaluate :meth:`checkpoint_model_state` on every rank."""
    registry_entries: ClassVar[Mapping[str, tuple[str, Mapping[str, Any]]]] = {}
    """The names a class registers in Lightning's ``StrategyRegistry``: name -> (description, init parameters).

    Only the class's own table is registered (see :meth:`register_strategies`), never an inherited one."""
    rank_counters: ClassVar[Mapping[str, type]] = {}
    """Scalar counters every rank saves in checkpoints: key -> type, kept in the attribute ``_<key>``.

    A subclass extends its parent's table (``{**Parent.rank_counters, "key": int}``); :meth:`_rank_state`
    saves them in table order and :meth:`_load_rank_state` restores them (``type(0)`` when a checkpoint
    lacks one)."""

    def __init__(
        self,
        *,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | float | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        self._timeout_given = check_timeout(timeout)
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin, process_group_backend=process_group_backend,
            timeout=self._timeout_given or default_pg_timeout, start_method=start_method,
        )
        self._monitor: _PeerMonitor | None = None
        self._first_evaluation = False
        self.comm = CommCounter()
        self._restored_rank_state = False
        self._models_diverged = False
        self._models_in_sync = False  # this fit started from rank 0's broadcast model (set in setup)
        self._warned_consensus_load = False
        self._own_state: dict[str, Any] | None = None
        self._eval_state: dict[str, Any] | None = None
        # Uneven data (the join protocol)
        self._join_trainer: Trainer | None = None
        self._live = False
        self._contrib: list[float] | None = None
        self._unsent_steps = False
        self._joined_epoch = False
        self._epoch_batches = 0
        self._live_active: list[bool] = []
        self._refusals_epoch = -1
        self._static_refusals = 0
        self.batches_per_rank: list[int] = []
        """Training batches each rank ran in the latest epoch (logged as ``data/batches_rank_<r>``)."""

    # ----------------------------------------------------------------------------------------------
    # Configuration
    # ----------------------------------------------------------------------------------------------
    def _validate_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` if the method cannot run on ``world_size`` ranks."""

    @override
    def _configure_launcher(self) -> None:  # Lightning calls it in Trainer.__init__ (a _compat probe checks)
        super()._configure_launcher()
        if self.parallel_devices is not None:
            self._validate_world_size(self.num_nodes * self.num_processes)

    @override
    def setup_distributed(self) -> None:
        if self._timeout_given is None:
            gloo = _compat.process_group_backend(self) == "gloo"
            _compat.set_process_group_timeout(self, DEFAULT_CPU_TIMEOUT if gloo else default_pg_timeout)
        if self.num_nodes * self.num_processes == 1:
            reset_seed()
            self.set_world_ranks()
            _compat.process_group_backend(self)
            rank_zero_warn(
                f"{type(self).__name__} runs on a single process: there is nothing to communicate, so it trains "
                "the local model only. Use devices > 1 or num_nodes > 1 to train in parallel."
            )
            return
        super().setup_distributed()
        if self._monitor is None and self.cluster_environment is not None:
            self._monitor = _PeerMonitor.shared(self.cluster_environment.main_address,
                                                self.cluster_environment.main_port, self.global_rank, self.world_size)

    @property
    def timeout(self) -> timedelta | None:
        """The process group's timeout (see the ``timeout`` argument)."""
        return _compat.process_group_timeout(self)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _compat.StrategyRegistryType) -> None:
        """Register the class's own :attr:`registry_entries` (``override=True``: re-imports are harmless).

        Inherited tables are not registered, so DDP's names ("ddp", ...) keep pointing at DDPStrategy and a
        user's subclass does not take over its parent's names.
        """
        for name, (description, params) in vars(cls).get("registry_entries", {}).items():
            strategy_registry.register(name, cls, description=description, override=True, **params)

    # ----------------------------------------------------------------------------------------------
    # Setup: no DDP wrapper
    # ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer) -> None:
        """DDP's setup, with :meth:`configure_ddp` and :meth:`_setup_model` leaving the model unwrapped.

        Outside fitting, DDP broadcasts rank 0's module (it has no wrapper to do so); after a fit the ranks
        keep their own models here, so evaluation runs the base ``Strategy.setup`` (whose ``_setup_model``
        is the one below).
        """
        self._validate_world_size(self.world_size)
        if trainer.state.fn != TrainerFn.FITTING:
            _compat.setup_without_ddp(self, trainer)
            return
        super().setup(trainer)
        self._models_diverged = True
        self._on_fit_setup()
        if is_distributed() and self.uneven_data_join:
            self._install_join(trainer)

    @override
    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel`` wrapper (and so no DDP communication hooks)."""
        self.model = self._setup_model(self.model)

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model itself; at the first fit every rank starts from rank 0's parameters and buffers."""
        self._models_in_sync = is_distributed() and not (self._restored_rank_state or self._models_diverged)
        if self._models_in_sync:
            _compat.sync_module_states(model)
        return model

    def _on_fit_setup(self) -> None:
        """Called at the end of setup when fitting: model and optimizers are on the device."""

    def synced_tensors(self) -> list[Tensor]:
        """What a method communicates: the optimizers' parameters, then the floating-point buffers.

        Parameters are listed once, in optimizer order; buffers in ``named_buffers`` order. The list is
        the same on every rank for the same model and optimizers.
        """
        module = self.lightning_module
        assert module is not None
        seen: set[int] = set()
        tensors: list[Tensor] = []
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in seen:
                        seen.add(id(param))
                        tensors.append(param)
        return tensors + self._float_buffers()

    def _float_buffers(self) -> list[Tensor]:
        """The module's floating-point buffers, in ``named_buffers`` order."""
        module = self.lightning_module
        assert module is not None
        return [b for _, b in module.named_buffers() if b is not None and b.is_floating_point()]

    # ----------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.comm.start_step()
        self._first_evaluation = True
        if self._join_trainer is not None:
            self._epoch_batches += 1
            slot = _LAST if self._predict_epoch_end() else _ACTIVE
            self._message(_OP_STEP, slot, refuse=self._join_refusals())

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: LightningModule | torch.nn.Module | None = None, **kwargs: Any) -> Any:
        inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        announce = self._live and self._round_due()
        self._pre_optimizer_step(inner)
        output = super().optimizer_step(optimizer, partial(self._run_closure, inner, closure), model, **kwargs)
        self._unsent_steps = True
        if announce:
            # Ranks out of data take part in this round. While some are, a round's communication starts
            # only here, after the step (the closure may send other announced collectives before).
            self._message(_OP_ROUND, _ACTIVE)
        self._post_optimizer_step(inner)
        self._log_metric("comm/bytes_sent", float(self.comm.step_bytes))
        return output

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        output = super().training_step(*args, **kwargs)
        if self._first_evaluation:
            # Only the first evaluation of a batch: closure optimizers (SAM, L-BFGS) evaluate again.
            self._first_evaluation = False
            loss = output.get("loss") if isinstance(output, Mapping) else output
            if isinstance(loss, Tensor) and loss.numel() == 1:
                self._record_batch_loss(loss.detach())
        return output

    def _record_batch_loss(self, loss: Tensor) -> None:
        """Called with the (detached, one-element) training loss of each batch's first evaluation."""

    def _run_closure(self, optimizer: Optimizer, closure: Callable[[], Any]) -> Any:
        output = closure()
        self._after_backward(optimizer)
        return output

    def _round_due(self) -> bool:
        """Whether the optimizer step about to be taken ends with a communication round."""
        return False

    def _shadow_round(self) -> None:
        """Take part in a round as a rank that has run out of data (it takes no optimizer step)."""
        raise NotImplementedError(f"{type(self).__name__} has no communication rounds")

    def _pre_optimizer_step(self, optimizer: Optimizer) -> None:
        """Called before the optimizer step (before the closure computes the gradient)."""

    def _after_backward(self, optimizer: Optimizer) -> None:
        """Called after every evaluation of the closure (forward and backward), before gradient clipping."""

    def _post_optimizer_step(self, optimizer: Optimizer) -> None:
        """Called after the optimizer step; communicate here."""

    def _log_metric(self, name: str, value: float) -> None:
        """Log ``name`` at this step from inside ``optimizer_step`` (a no-op outside training hooks)."""
        log_step_metric(self.lightning_module, name, value)

    def _logged_params(self) -> dict[str, Any]:
        """Parameters recorded by every logger at train start."""
        return {"world_size": self.world_size}

    @override
    def on_train_end(self) -> None:
        self._uninstall_join()
        super().on_train_end()

    @override
    def teardown(self) -> None:
        self._uninstall_join()
        self._restore_own_model()
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._uninstall_join()
        if self._monitor is not None:
            if _is_peer_failure(exception):
                _augment(exception, self._monitor.diagnose())
            else:  # this rank fails first: tell the others why
                self._monitor.record_failure(exception)
        try:
            self._restore_own_model()
        except Exception:
            pass
        super().on_exception(exception)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if _compat.attached_trainer(self.lightning_module) is not None:
            log_run_params(self.lightning_module, self._logged_params())

    # ----------------------------------------------------------------------------------------------
    # Uneven data: ranks that run out of batches keep answering rounds until every rank is done
    # ----------------------------------------------------------------------------------------------
    def _install_join(self, trainer: Trainer) -> None:
        """Hook the protocol into this fit's training-epoch loop (undone at train end and teardown).

        Lightning 2.6's epoch loop broadcasts rank 0's SIGTERM flag before every batch; the control message
        replaces that broadcast (it carries every rank's flag), so the protocol costs no extra collective
        per batch. A rank whose epoch loop is about to end joins before its end-of-epoch validation.
        """
        self._uninstall_join()
        loop = _compat.epoch_loop(trainer)
        run, on_advance_end = loop.run, loop.on_advance_end

        def joined_run(data_fetcher: Any) -> None:
            self._epoch_batches, self._joined_epoch = 0, False
            run(data_fetcher)
            if self._joined_epoch:
                return
            # The loop ended without a predicted last batch (no batch at all, or an unsized iterator).
            validate, stop = self._join(validate=False, stop=self._stop_requested(loop))
            if validate:  # the others validate at the end of their epoch: so must this rank
                trainer.validating = True
                loop.val_loop.run()
                trainer.training = True
            if stop:
                trainer.should_stop = True

        def joined_on_advance_end(data_fetcher: Any) -> None:
            if self._joined_epoch or not (loop.done or getattr(data_fetcher, "done", False)):
                on_advance_end(data_fetcher)
                return
            wants = _compat.wants_validation(loop, data_fetcher)
            validate, stop = self._join(validate=wants, stop=self._stop_requested(loop))
            with _compat.decide_validation(loop, validate):  # the agreed decision, for this call
                on_advance_end(data_fetcher)
            if stop:
                trainer.should_stop = True

        if _compat.patch_epoch_loop(trainer, run=joined_run, on_advance_end=joined_on_advance_end) is None:
            rank_zero_warn(f"{type(self).__name__}: this Lightning version's training loop is not the one the "
                           "uneven-data protocol hooks into; ranks must have the same number of batches.")
            return
        _compat.replace_sigterm_broadcast(trainer, lambda: None)
        self._refusals_epoch = -1
        self._join_trainer = trainer
        self._live, self._contrib, self._unsent_steps = False, None, False

    @override
    def process_dataloader(self, dataloader: Any) -> Any:
        """Refuse, on every rank at once, a sized train loader that is empty on some rank.

        Lightning's fit loop ends the fit of a rank whose train loader has length 0 (with
        ``allow_zero_length_dataloader_with_multiple_devices``), while the others train and wait for it.
        """
        dataloader = super().process_dataloader(dataloader)
        module = self.lightning_module
        trainer = _compat.attached_trainer(module)
        if not is_distributed() or trainer is None or not (self._fitting() and trainer.training):
            return dataloader
        empty = torch.zeros(self.world_size, dtype=torch.int64, device=self.root_device)
        empty[self.global_rank] = int(sized_len(dataloader) == 0)
        dist.all_reduce(empty, op=dist.ReduceOp.MAX)
        ranks = [r for r, flag in enumerate(empty.tolist()) if flag]
        if ranks:
            raise RuntimeError(
                f"{type(self).__name__}: the train dataloader of rank(s) {ranks} has length 0. Lightning ends the fit "
                "of a rank without training batches while the others go on, so the run could not finish. For a rank "
                "without data, use an iterable-style loader (no __len__) that yields nothing in that epoch: the "
                "strategy then keeps that rank in the communication until the others finish the epoch."
            )
        return dataloader

    def _uninstall_join(self) -> None:
        trainer, self._join_trainer = self._join_trainer, None
        self._live, self._contrib = False, None
        if trainer is None:
            return
        _compat.restore_epoch_loop(trainer)

    @staticmethod
    def _stop_requested(loop: Any) -> bool:
        max_steps = loop.max_steps
        return bool(loop.trainer.should_stop) or (max_steps is not None and 0 <= max_steps <= loop.global_step)

    def _predict_epoch_end(self) -> bool:
        """Whether this batch is this rank's last of the epoch, as far as the loop knows now."""
        assert self._join_trainer is not None
        loop = _compat.epoch_loop(self._join_trainer)
        max_steps = loop.max_steps
        return bool(loop.batch_progress.is_last_batch) or (max_steps is not None and 0 <= max_steps
                                                            <= loop.global_step + 1)

    def _join_refusals(self) -> int:
        """Features whose collectives a rank out of data cannot take part in (bits of ``_REFUSALS``).

        The Trainer's configuration is read once per epoch (at its first batch), not at every batch.
        """
        trainer = self._join_trainer
        if trainer is None:
            return 0
        epoch = trainer.current_epoch
        if self._refusals_epoch != epoch:
            self._refusals_epoch, self._static_refusals = epoch, self._configured_refusals(trainer)
        return self._static_refusals

    def _configured_refusals(self, trainer: Trainer) -> int:
        module = self.lightning_module
        if module is None:
            return 0
        bits = 0
        validates = is_overridden("validation_step", module) and trainer.limit_val_batches != 0
        if validates:
            check_batch = trainer.val_check_batch
            if (trainer.check_val_every_n_epoch is None or _compat.val_check_time_interval(trainer) is not None or (
                    check_batch is not None and math.isfinite(check_batch)
                    and check_batch < trainer.num_training_batches)):
                bits |= 1
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and _compat.checkpoint_saves_mid_epoch(callback):
                bits |= 2
            if type(callback).__name__ == "ConsensusDistance" and getattr(callback, "every_n_steps", None):
                bits |= 8
        return bits

    def _message(self, op: int, slot: int, *, arg1: int = 0, arg2: int = 0, arg3: int = 0, refuse: int = 0,
                 validate: bool = False, stop: bool = False) -> list[int]:
        """One control message (collective); returns the reduced fields and applies what all ranks agree on."""
        trainer = self._join_trainer
        n = self.world_size
        values = [0] * (_NUM_FIELDS + 3 * n)
        values[_F_OP], values[_F_ARG1], values[_F_ARG2], values[_F_ARG3] = op, arg1, arg2, arg3
        values[_F_SIGTERM] = int(bool(getattr(trainer, "received_sigterm", False)))
        values[_F_REFUSE], values[_F_VALIDATE], values[_F_STOP] = refuse, int(validate), int(stop)
        values[_F_STEPS] = self._join_steps()
        values[_NUM_FIELDS + self.global_rank] = slot
        values[_NUM_FIELDS + n + self.global_rank] = self._epoch_batches
        planned = getattr(trainer, "num_training_batches", math.inf)
        values[_NUM_FIELDS + 2 * n + self.global_rank] = int(planned) if math.isfinite(planned) else 0
        message = torch.tensor(values, dtype=torch.int64, device=self.root_device)
        dist.all_reduce(message, op=dist.ReduceOp.MAX)
        values = message.tolist()
        slots = values[_NUM_FIELDS:_NUM_FIELDS + n]
        if values[_F_SIGTERM]:
            raise SIGTERMException()
        uneven = len(set(slots)) > 1
        self._live = any(s < _ACTIVE for s in slots)
        self._contrib = [1.0 if s >= _PENDING else 0.0 for s in slots] if self._live else None
        self._live_active = [s >= _ACTIVE for s in slots]
        refused = values[_F_REFUSE]
        planned = values[_NUM_FIELDS + 2 * n:]
        # A rank's own loader length decides when it validates mid-epoch (val_check_interval=0.5 is its half):
        # ranks with loaders of different lengths would run the validation's collectives at different steps,
        # so they are refused at the first step, before the first rank runs out of data.
        known_uneven = all(planned) and len(set(planned)) > 1
        if (uneven or known_uneven) and refused:
            what = "; ".join(text for bit, text in _REFUSALS.items() if refused & bit)
            counts = f"{planned}" if all(planned) else f"so far {values[_NUM_FIELDS + n:_NUM_FIELDS + 2 * n]}"
            raise RuntimeError(
                f"{type(self).__name__}: the ranks have different numbers of training batches this epoch "
                f"({counts}), and this run uses {what}. Those communicate in the middle of an epoch, when a rank "
                "that has run out of data cannot take part. Validate and checkpoint at epoch ends, or give every "
                "rank the same number of batches (e.g. DistributedSampler, or drop_last)."
            )
        if values[_F_OP] == _OP_BROADCAST and slots[values[_F_ARG1]] < _ACTIVE:
            raise RuntimeError(
                f"{type(self).__name__}: broadcast from rank {values[_F_ARG1]} while that rank has run out of "
                "training data for this epoch (uneven per-rank batches); broadcast from a rank that still trains."
            )
        return values

    def _join_steps(self) -> int:
        return 0

    def _after_join(self, values: list[int]) -> None:
        """Agree on what the ranks share after an epoch (subclasses: the step counter)."""

    def _join(self, validate: bool, stop: bool) -> tuple[bool, bool]:
        """Answer the others' control messages until every rank is out of data; return (validate, stop).

        ``validate``/``stop``: whether this rank would validate now / end the fit; the returned values
        are the ranks' agreement (any rank).
        """
        self._joined_epoch = True
        if self._join_trainer is None:
            return validate, stop
        while True:
            values = self._message(_OP_WAIT, _PENDING if self._unsent_steps else _IDLE, validate=validate, stop=stop)
            op = values[_F_OP]
            if op == _OP_WAIT:
                break
            if op == _OP_ROUND:
                self._shadow_round()
                self._unsent_steps = False
            elif op == _OP_REDUCE:
                self._shadow_reduce(values)
            elif op == _OP_BARRIER:
                dist.barrier()
            elif op == _OP_BROADCAST:
                dist.broadcast_object_list([None], src=values[_F_ARG1])
        self._live, self._contrib = False, None
        n = self.world_size
        self.batches_per_rank = values[_NUM_FIELDS + n:_NUM_FIELDS + 2 * n]
        self._after_join(values)
        self._log_batches()
        if len(set(self.batches_per_rank)) > 1:
            self._align_epoch_results()
        return bool(values[_F_VALIDATE]), bool(values[_F_STOP])

    def _log_batches(self) -> None:
        trainer = self._join_trainer
        if trainer is None:
            return
        metrics = {f"data/batches_rank_{r}": float(b) for r, b in enumerate(self.batches_per_rank)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=_compat.logging_step(trainer))

    def _align_epoch_results(self) -> None:
        """Give every rank the same epoch-level logged entries, in the same order, before they are synced.

        A rank with fewer (or no) batches may not have logged a key the others did; each epoch-level value
        is then reduced on some ranks only. Missing entries are added empty (sum 0, batch size 0, -inf for
        max, +inf for min, or the module's metric object), so the reductions pair up and average over the
        batches that were run.
        """
        trainer = self._join_trainer
        module = self.lightning_module
        assert trainer is not None and module is not None
        results = _compat.epoch_results(trainer)
        local = [(key, _compat.describe_result_metric(metric), not metric.has_reset) for key, metric in results.items()]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        order: dict[str, dict[str, Any]] = {}
        valid: set[str] = set()
        for entries in gathered:
            for key, description, logged in entries:
                order.setdefault(key, description)
                if logged:
                    valid.add(key)
        existing = dict(results)
        results.clear()
        for key, description in order.items():
            metric = existing.get(key)
            if metric is None:
                metric = self._empty_result(description, module)
            if key in valid:
                # Logged this epoch somewhere: take part in its reduction (an entry reset at the start
                # of the epoch holds the identity element of its reduction).
                metric.has_reset = False
            results[key] = metric

    def _empty_result(self, description: Mapping[str, Any], module: LightningModule) -> Any:
        value = None
        if not description["is_tensor"]:
            attribute = description["metric_attribute"]
            if attribute is None:
                raise RuntimeError(
                    f"{type(self).__name__}: rank {self.global_rank} ran no training batch that logged "
                    f"{description['name']!r}, a torchmetrics object without a module attribute; log a metric "
                    "object that is an attribute of the LightningModule so every rank can take part in its sync."
                )
            value = module.get_submodule(attribute) if "." in attribute else getattr(module, attribute)
        metric = _compat.empty_result_metric(description, self.reduce, value)
        metric.to(self.root_device)
        return metric

    def _reduce_spec(self, tensor: Tensor, reduce_op: Any) -> tuple[Tensor, int]:
        name = reduce_op if isinstance(reduce_op, str) else {
            dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}.get(reduce_op)
        name = {"avg": "mean"}.get(str(name).lower(), str(name).lower())
        if name not in _REDUCE_OPS:
            raise RuntimeError(f"{type(self).__name__}: reduce_op={reduce_op!r} while a rank has run out of "
                               f"training data; supported then: {_REDUCE_OPS}")
        work = tensor.detach().clone()
        if name == "mean" and not work.is_floating_point():
            work = work.float()
        if work.dtype not in _DTYPES:
            work = work.to(torch.float64)
        return work, _REDUCE_OPS.index(name)

    @staticmethod
    def _dist_op(index: int) -> Any:
        return (dist.ReduceOp.SUM, dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN)[index]

    def _shadow_reduce(self, values: list[int]) -> None:
        dtype, index = _DTYPES[values[_F_ARG2]], values[_F_ARG3]
        work = torch.zeros(values[_F_ARG1], dtype=dtype, device=self.root_device)
        if index in (2, 3):
            info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
            work.fill_(info.min if index == 2 else info.max)
        dist.all_reduce(work, op=self._dist_op(index))

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """DDP's reduce; while a rank has run out of data, the ranks still training reduce among themselves."""
        if not (self._live and isinstance(tensor, Tensor) and group is None):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        work, index = self._reduce_spec(tensor, reduce_op)
        self._message(_OP_REDUCE, _ACTIVE, arg1=work.numel(), arg2=_DTYPES.index(work.dtype), arg3=index)
        flat = work.reshape(-1)
        dist.all_reduce(flat, op=self._dist_op(index))
        result = flat.reshape(work.shape)
        if index == 1:
            result = result / sum(1 for s in self._active_slots() if s)
        return result

    def _active_slots(self) -> list[bool]:
        """Which ranks train in the current batch (all, unless some have run out of data)."""
        return list(self._live_active) if self._live else [True] * self.world_size

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not self._live:
            return super().reduce_boolean_decision(decision, all=all)
        total = self.reduce(torch.tensor(int(decision), device=self.root_device), reduce_op="sum")
        active = sum(1 for s in self._active_slots() if s)
        return bool(total == active) if all else bool(total)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._live:
            self._message(_OP_BARRIER, _ACTIVE)
        super().barrier(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self._live:
            self._message(_OP_BROADCAST, _ACTIVE, arg1=src)
        return super().broadcast(obj, src)

    # ----------------------------------------------------------------------------------------------
    # Consensus and checkpoints
    # ----------------------------------------------------------------------------------------------
    def _consensus_weight(self) -> Tensor | None:
        """This rank's weight in the consensus average (``None``: uniform). Push-sum returns its weight."""
        return None

    def consensus_state_dict(self) -> dict[str, Any]:
        r"""The module's state dict with every floating-point entry averaged over the ranks.

        :math:`\bar x = \sum_i w_i x_i / \sum_i w_i` with :math:`w_i` from :meth:`_consensus_weight`
        (1 by default). Integer entries (``num_batches_tracked``) are this rank's. A collective call:
        every rank must make it. The returned tensors are copies; the model is not changed.
        """
        state = self._state_copy()
        floats = [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]
        if not floats or not is_distributed():
            return state
        weight = self._consensus_weight()
        if weight is None:
            all_reduce_mean_(floats)
            return state
        w = weight.detach().to(torch.float64).reshape(1)
        weighted = [v.to(torch.float64) * w.to(v.device) for v in floats]
        total = w.to(floats[0].device, copy=True)
        all_reduce_sum_([*weighted, total])
        for v, s in zip(floats, weighted):
            v.copy_(s / total.to(s.device))
        return state

    def _state_copy(self) -> dict[str, Any]:
        """This rank's module state dict, tensors detached and cloned."""
        module = self.lightning_module
        assert module is not None
        return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in module.state_dict().items()}

    def checkpoint_model_state(self) -> dict[str, Any]:
        """The run's one model: what checkpoints store and what validation, test and predict evaluate.

        The consensus average (:meth:`consensus_state_dict`) here; EASGD returns its center. Collective
        (every rank must call it).
        """
        return self.consensus_state_dict()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The run's model (:meth:`checkpoint_model_state`); collective.

        During an evaluation the module already holds that model (see :meth:`on_validation_start`), so
        the state is returned as loaded, without communication.
        """
        if self._eval_state is not None:
            return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in self._eval_state.items()}
        return self.checkpoint_model_state()

    # ----------------------------------------------------------------------------------------------
    # Evaluation: one model per run
    # ----------------------------------------------------------------------------------------------
    def _swap_in_run_model(self) -> None:
        """Load the run's model (:meth:`checkpoint_model_state`) into the module, keeping this rank's own.

        Only when the ranks' models may differ (after a fit in this Trainer); a model loaded from a
        checkpoint outside a fit is already the same on every rank. Collective.
        """
        module = self.lightning_module
        if (module is None or not self.evaluate_run_model or not is_distributed() or not self._models_diverged
                or self._own_state is not None):
            return
        state = self.checkpoint_model_state()
        self._own_state = self._state_copy()
        module.load_state_dict(state)
        self._eval_state = state

    def _restore_own_model(self) -> None:
        """Put this rank's own model back after an evaluation."""
        module = self.lightning_module
        if self._own_state is None or module is None:
            return
        module.load_state_dict(self._own_state)
        self._own_state = None
        self._eval_state = None

    def _rank_state(self) -> dict[str, Any]:
        """Extra per-rank state saved in checkpoints (tensors are moved to the CPU)."""
        return {"comm": self.comm.state_dict(), **{key: getattr(self, f"_{key}") for key in self.rank_counters}}

    def _load_rank_state(self, state: Mapping[str, Any]) -> None:
        if "comm" in state:
            self.comm.load_state_dict(state["comm"])
        for key, kind in self.rank_counters.items():
            setattr(self, f"_{key}", kind(state.get(key, 0)))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if is_distributed():
            module = self.lightning_module
            assert module is not None
            own = module.state_dict() if self._own_state is None else self._own_state
            local: dict[str, Any] = {"state_dict": own, "strategy": self._rank_state()}
            if "optimizer_states" in checkpoint:
                local["optimizer_states"] = [self.optimizer_state(o) for o in self.optimizers]
            local = _to_cpu_copy(local)
            gathered: list[Any] | None = [None] * self.world_size if self.is_global_zero else None
            torch.distributed.gather_object(local, gathered, dst=0)
            if self.is_global_zero:
                checkpoint[PER_RANK_STATES_KEY] = {
                    "strategy": type(self).__name__,
                    "world_size": self.world_size,
                    "ranks": gathered,
                }
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _own_rank_state(self, checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
        states = checkpoint.get(PER_RANK_STATES_KEY)
        if states is None:
            return None
        if states["strategy"] == type(self).__name__ and states["world_size"] == self.world_size:
            return states["ranks"][self.global_rank]
        if not self._warned_consensus_load:
            self._warned_consensus_load = True
            rank_zero_warn(
                f"The checkpoint holds per-rank states of {states['strategy']} on {states['world_size']} ranks; "
                f"this run is {type(self).__name__} on {self.world_size}, so every rank starts from the "
                "consensus model and rank 0's optimizer state."
            )
        return None

    def _fitting(self) -> bool:
        module = self.lightning_module
        trainer = _compat.attached_trainer(module)
        return trainer is not None and trainer.state.fn == TrainerFn.FITTING

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Resuming a fit: this rank's own stored state; otherwise the checkpoint's model on every rank.

        ``validate/test/predict(ckpt_path=...)`` therefore evaluate the model the checkpoint stores (the
        consensus or EASGD's center), identical on every rank, as a 1-process evaluation of the file does.
        """
        own = self._own_rank_state(checkpoint) if self._fitting() else None
        if own is None:
            super().load_model_state_dict(checkpoint, strict=strict)
            if not self._fitting():
                self._models_diverged = False
                self._restored_rank_state = False
            return
        assert self.lightning_module is not None
        self.lightning_module.load_state_dict(own["state_dict"], strict=strict)
        self._load_rank_state(own.get("strategy", {}))
        self._restored_rank_state = True

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        own = self._own_rank_state(checkpoint)
        if own is None or "optimizer_states" not in own:
            super().load_optimizer_state_dict(checkpoint)
            return
        for optimizer, state in zip(self.optimizers, own["optimizer_states"]):
            optimizer.load_state_dict(state)
            _compat.optimizer_to_device(optimizer, self.root_device)


def _evaluation_hooks(stage: str) -> None:
    """``LocalModelStrategy.on_<stage>_start``/``_end``: evaluate the run's model, then put each rank's own back."""
    start_name, end_name = f"on_{stage}_start", f"on_{stage}_end"

    def start(self: LocalModelStrategy) -> None:
        getattr(super(LocalModelStrategy, self), start_name)()
        self._swap_in_run_model()

    def end(self: LocalModelStrategy) -> None:
        self._restore_own_model()
        getattr(super(LocalModelStrategy, self), end_name)()

    for name, hook in ((start_name, start), (end_name, end)):
        hook.__name__, hook.__qualname__ = name, f"LocalModelStrategy.{name}"
        hook.__doc__ = getattr(DDPStrategy, name).__doc__
        setattr(LocalModelStrategy, name, hook)


for _stage in ("validation", "test", "predict"):
    _evaluation_hooks(_stage)


class PeriodicSyncStrategy(LocalModelStrategy):
    """Per-rank models that communicate every ``sync_every`` optimizer steps (a base class).

    Subclasses implement :meth:`_synchronize`, called after the optimizer step of every due step under
    ``torch.no_grad()``, and may use :meth:`_sync_due` in :meth:`_pre_optimizer_step` to prepare.
    ``self._flat`` packs :meth:`synced_tensors` (parameters, then float buffers); :meth:`_pull_toward_`
    moves them toward a point held in buffers of its layout. The step counter and the number of
    synchronizations are part of each rank's checkpointed state, so a resumed run keeps the same schedule.

    Args:
        sync_every: Communicate after every ``sync_every``-th optimizer step.
        **ddp_kwargs: See :class:`~lightning_optsurvey.strategies.LocalModelStrategy`.

    Raises:
        ValueError: If ``sync_every < 1``.
        TypeError: If ``sync_every`` is not an integer.
    """

    rank_counters = {"steps": int, "syncs": int}

    def __init__(self, sync_every: int = 1, **ddp_kwargs: Any) -> None:
        self.sync_every = check_int("sync_every", sync_every, low=1)
        check_ddp_kwargs(type(self).__name__, ddp_kwargs)
        super().__init__(**ddp_kwargs)
        self._steps = 0
        self._syncs = 0
        self._flat: FlatBuffers | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (over all fits of a resumed run)."""
        return self._steps

    @property
    def syncs(self) -> int:
        """Synchronizations done so far."""
        return self._syncs

    def _schedule_offset(self) -> int:
        """Steps before the periodic schedule starts (post-local SGD's warm-up)."""
        return 0

    def _flat_layout(self, flat: FlatBuffers) -> tuple[list[Tensor], list[str | None], list[dict[str, Any]]]:
        """The flat buffers' tensors in order, each with its ``state_dict`` key and its optimizer param group.

        Tensors outside every group (float buffers) get the first group, so per-group rates (EASGD's
        alpha = lr * rho) have a learning rate for them.
        """
        module = self.lightning_module
        assert module is not None
        names = {id(t): k for k, t in module.state_dict(keep_vars=True).items()}
        group_of = {id(p): g for o in self.optimizers for g in o.param_groups for p in g["params"]}
        first_group = self.optimizers[0].param_groups[0] if self.optimizers else {"lr": 0.0}
        tensors = list(flat.ordered)
        return tensors, [names.get(id(t)) for t in tensors], [group_of.get(id(t), first_group) for t in tensors]

    def _sync_due(self) -> bool:
        """Whether the optimizer step about to be taken (step ``self._steps + 1``) ends with a sync."""
        since = self._steps - self._schedule_offset()
        return since >= 0 and (since + 1) % self.sync_every == 0

    @override
    def _on_fit_setup(self) -> None:
        super()._on_fit_setup()
        self._flat = FlatBuffers.or_none(self.synced_tensors())

    @override
    def _round_due(self) -> bool:
        return self._flat is not None and self._sync_due()

    @override
    def _post_optimizer_step(self, optimizer: Optimizer) -> None:
        due = self._sync_due()
        self._steps += 1
        if not due or self._flat is None:
            return
        with torch.no_grad():
            self._synchronize(optimizer)
        self._syncs += 1
        self._unsent_steps = False

    @override
    def _shadow_round(self) -> None:
        """A round without a step before it (this rank is out of data); see :meth:`_shadow_synchronize`."""
        if self._flat is None:
            return
        inner = self.optimizers[0] if self.optimizers else None
        with torch.no_grad():
            self._shadow_synchronize(inner)
        self._syncs += 1

    def _shadow_synchronize(self, optimizer: Optimizer | None) -> None:
        """What a rank out of data does in a round; by default the round itself with a zero update.

        ``self._contrib[r]`` is 1 for the ranks that stepped since their previous round (the ones still
        training, and a rank out of data whose last steps were not yet communicated), else 0.
        """
        self._synchronize(optimizer)  # type: ignore[arg-type]

    @override
    def _join_steps(self) -> int:
        return self._steps

    @override
    def _after_join(self, values: list[int]) -> None:
        # The schedule follows the rank that ran the most steps, so rounds stay aligned next epoch.
        self._steps = max(self._steps, values[_F_STEPS])

    def _synchronize(self, optimizer: Optimizer) -> None:
        """Communicate after the optimizer step of a due step (under ``torch.no_grad()``)."""
        raise NotImplementedError

    def _pull_toward_(self, target: list[Tensor], strength: float) -> None:
        r""":math:`x \leftarrow x - \lambda (x - t)` for the synchronized tensors, ``t`` in ``target``.

        ``target`` holds one buffer per buffer of ``self._flat`` (same layout), e.g. a received model.
        """
        assert self._flat is not None
        tensors = self._flat.ordered
        step = torch._foreach_sub(tensors, self._flat.all_views(target))
        torch._foreach_mul_(step, strength)
        torch._foreach_sub_(tensors, step)

    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params["sync_every"] = self.sync_every
        return params


DEFAULT_CPU_TIMEOUT = timedelta(minutes=5)
"""Default process-group timeout of our strategies with gloo (CPU); Lightning's is 30 minutes."""

_CHECK_IN_SECONDS = 3.0
_PEER_ERROR_HINTS = ("connection closed by peer", "connection reset by peer", "read error", "timed out",
                     "timeout", "broken pipe", "nccl", "gloo", "socket")


def check_timeout(timeout: Any) -> timedelta | None:
    """``timeout`` as a positive finite ``timedelta`` (numbers are seconds), ``None`` for the default."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        check_float("timeout (seconds)", timeout.total_seconds(), low=0.0, low_open=True)
        return timeout
    check_type("timeout", timeout, (int, float), "a datetime.timedelta or a number of seconds")
    return timedelta(seconds=check_float("timeout", timeout, low=0.0, low_open=True))


def _is_peer_failure(exception: BaseException) -> bool:
    if isinstance(exception, getattr(dist, "DistError", ())):
        return True
    text = str(exception).lower()
    return isinstance(exception, RuntimeError) and any(hint in text for hint in _PEER_ERROR_HINTS)


def _augment(exception: BaseException, note: str | None) -> None:
    """Append ``note`` to the exception's message (and as a PEP 678 note)."""
    if not note:
        return
    if exception.args and isinstance(exception.args[0], str):
        exception.args = (f"{exception.args[0]}\n{note}", *exception.args[1:])
    else:
        exception.args = (*exception.args, note)
    exception.add_note(note)


class _PeerMonitor:
    """Names the rank that failed when a collective breaks, through the process group's TCP store.

    ``torch.distributed`` (gloo) reports a dead peer as "Connection closed by peer [address]:port" or a
    timeout, without its rank. A rank that fails with an ordinary exception stores its message under
    ``optsurvey/failed/<rank>`` before it exits. A rank whose collective fails checks in under
    ``optsurvey/alive/<rank>`` and waits up to 3 s for the others to do the same: a rank that neither
    checks in nor stored an error crashed, was killed, is frozen (or is still blocked elsewhere). If the
    store itself is unreachable, rank 0, which hosts it, is the one that is gone. No thread and no
    traffic while training: the store is only used on failure.
    """

    _instances: dict[tuple[str, int, int, int], _PeerMonitor] = {}

    @classmethod
    def shared(cls, host: str, port: int, rank: int, world_size: int) -> _PeerMonitor:
        key = (host, port, rank, world_size)
        if key not in cls._instances:
            cls._instances[key] = cls(host, port, rank, world_size)
        return cls._instances[key]

    def __init__(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size

    def _client(self) -> Any:
        return dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=5),
                             wait_for_workers=False)

    def record_failure(self, exception: BaseException) -> None:
        try:
            text = f"{type(exception).__name__}: {exception}"[:500]
            self._client().set(f"optsurvey/failed/{self.rank}", text)
        except Exception:  # best effort while failing
            pass

    def diagnose(self, wait: float = _CHECK_IN_SECONDS) -> str:
        """A sentence naming the failed ranks, for the survivor's error message."""
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            store = self._client()
            store.set(f"optsurvey/alive/{self.rank}", "1")
            deadline = time.monotonic() + wait
            while True:
                alive = {r for r in others if store.check([f"optsurvey/alive/{r}"])}
                failed = {r for r in others if store.check([f"optsurvey/failed/{r}"])}
                if len(alive | failed) == len(others) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            reasons = {r: store.get(f"optsurvey/failed/{r}").decode(errors="replace") for r in sorted(failed)}
        except Exception:  # the store lives in rank 0's process
            return (f"optsurvey: rank {self.rank} lost its peers, and the rendezvous store hosted by rank 0 "
                    f"({self.host}:{self.port}) is unreachable: rank 0 crashed, was killed or its machine is down.")
        silent = [r for r in others if r not in alive and r not in failed]
        parts = [f"rank {r} failed first with {text}" for r, text in reasons.items()]
        if silent:
            ranks = ", ".join(str(r) for r in silent)
            parts.append(f"rank{'s' if len(silent) > 1 else ''} {ranks} did not respond within {wait:.0f} s "
                         "(crashed, killed or frozen)")
        if not parts:
            return (f"optsurvey: rank {self.rank}'s collective failed while every peer is alive and none reported "
                    "an error: the network may have failed.")
        return f"optsurvey: rank {self.rank} lost its peers: " + "; ".join(parts) + "."
