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

from collections.abc import Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey.strategies._comm import (
    CommCounter,
    FlatBuffers,
    all_reduce_mean_,
    all_reduce_sum_,
    is_distributed,
)

__all__ = ["PER_RANK_STATES_KEY", "LocalModelStrategy", "PeriodicSyncStrategy", "check_ddp_kwargs", "check_int"]

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
        timeout: Timeout of the process group's operations.
        start_method: ``"popen"`` (default), ``"spawn"``, ``"fork"`` or ``"forkserver"``.

    Raises:
        TypeError: For any other keyword (``find_unused_parameters``, ``ddp_comm_hook``, ...): those
            configure ``DistributedDataParallel``, which these strategies do not use.
    """

    def __init__(
        self,
        *,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        self.__layer_sync = None
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.comm = CommCounter()
        self._restored_rank_state = False
        self._models_diverged = False
        self._warned_consensus_load = False

    # ----------------------------------------------------------------------------------------------
    # Configuration
    # ----------------------------------------------------------------------------------------------
    @property
    def _layer_sync(self) -> None:
        return self.__layer_sync

    @_layer_sync.setter
    def _layer_sync(self, value: Any) -> None:
        # The Trainer's accelerator connector assigns this in ``Trainer.__init__``, so the error is early.
        if value is not None:
            raise ValueError(
                f"{type(self).__name__} does not support sync_batchnorm=True: each rank keeps its own model "
                "and BatchNorm statistics (they are averaged with the parameters). Use sync_batchnorm=False."
            )
        self.__layer_sync = None

    def _validate_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` if the method cannot run on ``world_size`` ranks."""

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self.parallel_devices is not None:
            self._validate_world_size(self.num_nodes * self.num_processes)

    @override
    def setup_distributed(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            reset_seed()
            self.set_world_ranks()
            self._process_group_backend = self._get_process_group_backend()
            rank_zero_warn(
                f"{type(self).__name__} runs on a single process: there is nothing to communicate, so it trains "
                "the local model only. Use devices > 1 or num_nodes > 1 to train in parallel."
            )
            return
        super().setup_distributed()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register nothing: DDP's inherited names ("ddp", ...) must keep pointing at DDPStrategy.

        Subclasses register their own names (with ``override=True``, so re-imports are harmless).
        """

    # ----------------------------------------------------------------------------------------------
    # Setup: no DDP wrapper
    # ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        assert self.model is not None
        self.accelerator.setup(trainer)
        self._validate_world_size(self.world_size)
        fitting = trainer.state.fn == TrainerFn.FITTING
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if is_distributed() and not (self._restored_rank_state or self._models_diverged):
            _sync_module_states(self.model)
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
            self._models_diverged = True
            self._on_fit_setup()

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

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        self._pre_optimizer_step(inner)
        output = super().optimizer_step(optimizer, partial(self._run_closure, inner, closure), model, **kwargs)
        self._post_optimizer_step(inner)
        self._log_metric("comm/bytes_sent", float(self.comm.step_bytes))
        return output

    def _run_closure(self, optimizer: Optimizer, closure: Callable[[], Any]) -> Any:
        output = closure()
        self._after_backward(optimizer)
        return output

    def _pre_optimizer_step(self, optimizer: Optimizer) -> None:
        """Called before the optimizer step (before the closure computes the gradient)."""

    def _after_backward(self, optimizer: Optimizer) -> None:
        """Called after every evaluation of the closure (forward and backward), before gradient clipping."""

    def _post_optimizer_step(self, optimizer: Optimizer) -> None:
        """Called after the optimizer step; communicate here."""

    def _log_metric(self, name: str, value: float) -> None:
        """Log ``name`` at this step from inside ``optimizer_step`` (a no-op outside training hooks)."""
        module = self.lightning_module
        if module is None or module._trainer is None or module._current_fx_name not in _LOGGING_HOOKS:
            return
        module.log(name, value, on_step=True, on_epoch=False)

    def _logged_params(self) -> dict[str, Any]:
        """Parameters recorded by every logger at train start."""
        return {"world_size": self.world_size}

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        module = self.lightning_module
        if module is None or module._trainer is None:
            return
        params = self._logged_params()
        for logger in module.trainer.loggers:
            logger.log_hyperparams(params)

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

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model (see :meth:`consensus_state_dict`); collective."""
        return self.consensus_state_dict()

    def _rank_state(self) -> dict[str, Any]:
        """Extra per-rank state saved in checkpoints (tensors are moved to the CPU)."""
        return {"comm": self.comm.state_dict()}

    def _load_rank_state(self, state: Mapping[str, Any]) -> None:
        if "comm" in state:
            self.comm.load_state_dict(state["comm"])

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if is_distributed():
            module = self.lightning_module
            assert module is not None
            local: dict[str, Any] = {"state_dict": module.state_dict(), "strategy": self._rank_state()}
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

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        own = self._own_rank_state(checkpoint)
        if own is None:
            super().load_model_state_dict(checkpoint, strict=strict)
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
            _optimizer_to_device(optimizer, self.root_device)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``; else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


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

    def __init__(self, sync_every: int = 1, **ddp_kwargs: Any) -> None:
        self.sync_every = check_int("sync_every", sync_every, 1)
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

    def _sync_due(self) -> bool:
        """Whether the optimizer step about to be taken (step ``self._steps + 1``) ends with a sync."""
        since = self._steps - self._schedule_offset()
        return since >= 0 and (since + 1) % self.sync_every == 0

    @override
    def _on_fit_setup(self) -> None:
        super()._on_fit_setup()
        tensors = self.synced_tensors()
        self._flat = FlatBuffers(tensors) if tensors else None

    @override
    def _post_optimizer_step(self, optimizer: Optimizer) -> None:
        due = self._sync_due()
        self._steps += 1
        if not due or self._flat is None:
            return
        with torch.no_grad():
            self._synchronize(optimizer)
        self._syncs += 1

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

    @override
    def _rank_state(self) -> dict[str, Any]:
        state = super()._rank_state()
        state.update(steps=self._steps, syncs=self._syncs)
        return state

    @override
    def _load_rank_state(self, state: Mapping[str, Any]) -> None:
        super()._load_rank_state(state)
        self._steps = int(state.get("steps", 0))
        self._syncs = int(state.get("syncs", 0))
