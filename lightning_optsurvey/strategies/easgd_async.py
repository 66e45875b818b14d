r"""Asynchronous EASGD, EAMSGD and asynchronous LSGD: ``"easgd_async"``, ``"eamsgd"``, ``"lsgd_async"``.

The methods as published: each worker talks to a center held in one place every :math:`\tau` of *its own*
optimizer steps, without waiting for the other workers, so a slow rank delays only itself.

- Asynchronous EASGD (Zhang, Choromanska & LeCun 2015, Algorithm 1): at an exchange the worker's
  elastic difference :math:`e = \alpha (x_i - \tilde x)` is applied atomically to both sides,
  :math:`\tilde x \leftarrow \tilde x + e` on the center and :math:`x_i \leftarrow x_i - e` on the worker,
  with :math:`\alpha = \eta\rho` (each parameter group's learning rate) or a fixed ``moving_rate``.
  The difference is taken at the parameters the step starts from, and the worker's optimizer step is
  taken as well (the paper's Eq. (5) for one worker: :math:`x_i \leftarrow x_i - \eta g_i(x_i) - e`),
  so the request travels while the forward and backward passes run. With one worker this is exactly
  synchronous EASGD (:class:`~lightning_optsurvey.strategies.EASGDStrategy`).
- EAMSGD (Algorithm 2): asynchronous EASGD whose workers use Nesterov momentum :math:`\delta`
  (``momentum=delta``): each optimizer must be ``torch.optim.SGD``, and its groups get
  ``momentum=delta, nesterov=True, dampening=0``. PyTorch's Nesterov update is the paper's in the
  look-ahead variable :math:`x + \delta v` (Sutskever et al. 2013), so the elastic force acts on that
  variable.
- Asynchronous LSGD (Teng et al. 2019): the center holds the most recent leader, the worker with the
  lowest average training loss among the latest reports; a worker that reports a loss no worse than the
  leader's (or is the leader) becomes (or refreshes) the leader, any other is pulled toward it,
  :math:`x_i \leftarrow x_i - \lambda (x_i - x_\ell)`. No worker waits for another.

The center lives on rank 0 (:mod:`lightning_optsurvey.averaging.center`): a server thread answers requests
from any rank on a gloo group of its own, and rank 0's own worker exchanges in-process. CUDA models are staged through
CPU buffers. Rank 0's checkpoints hold the center (``checkpoint["state_dict"]`` is the center, or the
leader, so a checkpoint loads into a plain Trainer as the model the method outputs), its counters and
every rank's own model and optimizer state; a resumed run continues. A barrier precedes a checkpoint
so that it holds every exchange made before it. A rank that dies or raises makes the others raise a
``RuntimeError`` naming it within ``heartbeat_timeout`` seconds; at the end of ``fit`` every worker
tells the server it is done and the threads end (no barrier otherwise).

Logged per exchange: ``comm/bytes_sent`` (every step), ``async/exchanges`` (this rank's exchanges so
far), ``async/staleness`` (center updates made by other workers since this worker's previous
exchange) and ``gossip/consensus_distance`` (:math:`\lVert x_i - \tilde x\rVert^2` at the exchange).

Lightning's own collectives (``sync_dist`` logging, checkpoints, early stopping, the end of an epoch
with ``reduce_boolean_decision``) still synchronize the ranks where they are used; for a run in which
fast ranks never wait, validate on rank 0 only and use one long epoch (``benchmarks/stragglers.py``).
There is no per-step control round (the synchronous strategies' join protocol), so with per-rank data
of different sizes a collective inside the epoch (``self.log(..., sync_dist=True)`` in ``training_step``,
validation inside the epoch, ``ModelCheckpoint(every_n_train_steps=...)``) runs a different number of
times on each rank and pairs with an unrelated one: keep such collectives at epoch ends with uneven data.

Why our own: no framework provides asynchronous EASGD or LSGD for PyTorch (tensorflow#12472,
Paddle#7893, caffe#2940, mxnet#2710 asked for years); the authors' code is Lua Torch.

References:
    Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
    arXiv:1412.6651.
    Teng et al., "Leader Stochastic Gradient Descent for Distributed Training of Deep Learning Models",
    NeurIPS 2019, arXiv:1905.10395.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey import _compat
from lightning_optsurvey.averaging.center import (
    CenterClient,
    CenterServer,
    CenterState,
    Liveness,
    new_center_group,
)
from lightning_optsurvey.strategies._base import PeriodicSyncStrategy
from lightning_optsurvey.strategies._comm import is_distributed
from lightning_optsurvey.validation import check_bool, check_float, check_optional, check_probability

__all__ = ["AsyncCenterStrategy", "AsyncEASGDStrategy", "AsyncLSGDStrategy"]

_RUN_IDS = itertools.count()
_CENTER_GROUP_TIMEOUT = timedelta(days=7)  # an idle any-source receive must not time out; Liveness detects failures


def _local_sigterm_check(trainer: Trainer) -> None:
    """Replace Lightning's per-batch SIGTERM broadcast (a global barrier since Lightning 2.5) by a local check.

    Every training batch, Lightning broadcasts from rank 0 whether it received SIGTERM, which makes every
    rank wait for the slowest at every step: no asynchronous method could run. Here a rank that receives
    SIGTERM stops by itself, and the failure detector stops the others.
    """
    def check() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException()

    _compat.replace_sigterm_broadcast(trainer, check)


class AsyncCenterStrategy(PeriodicSyncStrategy):
    r"""Per-rank models that exchange with a center on rank 0 every ``sync_every`` own steps (a base class).

    Subclasses set ``_rule`` (``"elastic"`` or ``"leader"``) and :meth:`_rates`.

    Args:
        sync_every: :math:`\tau`, this rank's optimizer steps between its exchanges.
        heartbeat_timeout: Seconds without a heartbeat after which a rank counts as dead and the others
            stop with an error naming it.
        record_history: Keep the order of served requests on rank 0 (:meth:`history`), for tests.
        **ddp_kwargs: See :class:`~lightning_optsurvey.strategies.LocalModelStrategy`.
    """

    _rule = "elastic"

    uneven_data_join = False  # asynchronous: no per-batch control message (see strategies._base)
    evaluate_run_model = False  # the center lives on rank 0; lightning_module_state_dict says what is saved
    rank_counters = {**PeriodicSyncStrategy.rank_counters, "exchanges": int, "loss_sum": float, "loss_count": int}

    def __init__(
        self, sync_every: int = 4, heartbeat_timeout: float = 60.0, record_history: bool = False, **ddp_kwargs: Any
    ) -> None:
        heartbeat_timeout = check_float("heartbeat_timeout", heartbeat_timeout, low=0.0, low_open=True)
        self.record_history = check_bool("record_history", record_history)
        super().__init__(sync_every=sync_every, **ddp_kwargs)
        self.heartbeat_timeout = heartbeat_timeout
        self._state: CenterState | None = None
        self._server: CenterServer | None = None
        self._client: CenterClient | None = None
        self._liveness: Liveness | None = None
        self._group: dist.ProcessGroup | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._tensors: list[Tensor] = []
        self._keys: list[str | None] = []
        self._groups: list[dict[str, Any]] = []
        self._moves: list[Tensor] | None = None
        self._last_moves: list[Tensor] | None = None
        self._exchange_info: tuple[int, float] = (0, 0.0)
        self._exchanges = 0
        self._reply_bytes_seen = 0
        self._loss_sum = 0.0
        self._loss_count = 0

    # ----------------------------------------------------------------------------------------------
    # Public views
    # ----------------------------------------------------------------------------------------------
    @property
    def exchanges(self) -> int:
        """This rank's exchanges with the center so far."""
        return self._exchanges

    @property
    def last_moves(self) -> list[Tensor] | None:
        """The moves :math:`e` of this rank's latest exchange (flat CPU buffers, reused: clone to keep)."""
        return self._last_moves

    @property
    def center_state(self) -> CenterState | None:
        """The center (rank 0, or a single process); ``None`` on other ranks and before fitting."""
        return self._state

    def center_tensors(self) -> dict[str, Tensor]:
        """A consistent copy of the center by state-dict key (rank 0 or a single process; else empty)."""
        if self._state is None:
            return {}
        views = self._state.views(self._state.snapshot())
        return {k: v.view(t.shape) for k, v, t in zip(self._keys, views, self._tensors) if k is not None}

    def history(self) -> list[tuple[int, int]]:
        """``(rank, seq)`` of every served request in the order applied (``record_history=True``, rank 0)."""
        return [] if self._state is None else list(self._state.history)

    # ----------------------------------------------------------------------------------------------
    # Setup and teardown
    # ----------------------------------------------------------------------------------------------
    def _rates(self) -> list[float]:
        raise NotImplementedError

    @override
    def _on_fit_setup(self) -> None:
        super()._on_fit_setup()
        flat = self._flat
        if flat is None:
            return
        self._tensors, self._keys, self._groups = self._flat_layout(flat)
        sizes = [[flat.tensors[i].numel() for i in idx] for idx in flat.indices]
        rank, world = self.global_rank, self.world_size
        distributed = is_distributed()
        self._state = None
        if rank == 0 or not distributed:
            self._state = CenterState(flat.pack(), sizes, world if distributed else 1, self._rule, self.record_history)
            if self._pending_state is not None:
                self._state.load_state_dict(dict(self._pending_state))
        self._pending_state = None
        self._reply_bytes_seen = 0
        if not distributed:
            return
        if self._group is None:
            self._group = new_center_group(_CENTER_GROUP_TIMEOUT)
        store = dist.PrefixStore(f"optsurvey_async/{next(_RUN_IDS)}/", dist.distributed_c10d._get_default_store())
        self._liveness = Liveness(store, rank, world, self.heartbeat_timeout)
        self._liveness.start()
        if rank == 0:
            assert self._state is not None
            self._server = CenterServer(self._state, self._group, len(self._tensors), self._liveness)
            self._server.start()
        else:
            self._client = CenterClient(self._group, flat.buffers, len(self._tensors))

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING and is_distributed():
            _local_sigterm_check(trainer)

    def _check_alive(self) -> None:
        if self._liveness is not None and self._liveness.error is not None:
            raise RuntimeError(f"{type(self).__name__} on rank {self.global_rank} stops: {self._liveness.error}")
        if self._server is not None and self._server.error is not None:
            raise RuntimeError(f"{type(self).__name__}: the center's server on rank 0 failed: "
                               f"{self._server.error!r}") from self._server.error

    def _count_reply_bytes(self) -> None:
        """Add the replies rank 0's server sent since the last count to ``comm/bytes_sent``."""
        if self._state is not None and self._server is not None:
            sent = self._state.reply_bytes - self._reply_bytes_seen
            if sent:
                self._reply_bytes_seen += sent
                self.comm.add_send(sent)

    def _stop_async(self) -> None:
        """End the exchanges: workers tell the server they are done; rank 0 waits for all of them."""
        try:
            if self._client is not None:
                if self._client.pending:
                    self._client.wait()
                self._client.stop()
            if self._server is not None:
                while not self._server.join(timeout=0.2):
                    self._check_alive()
                self._check_alive()
                # Replies sent after rank 0's own last step (to slower workers) count too.
                self._count_reply_bytes()
        finally:
            if self._liveness is not None:
                self._liveness.finish()
            self._liveness = None
            self._server = None
            self._client = None

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        self._stop_async()

    @override
    def on_exception(self, exception: BaseException) -> None:
        if self._liveness is not None:
            self._liveness.fail(f"{type(exception).__name__}: {exception}")
            self._liveness._stop.set()
            self._liveness = None
        self._server = None
        self._client = None
        super().on_exception(exception)

    # ----------------------------------------------------------------------------------------------
    # The exchange
    # ----------------------------------------------------------------------------------------------
    @override
    def _record_batch_loss(self, loss: Tensor) -> None:
        if self._rule == "leader":
            self._loss_sum += float(loss)
            self._loss_count += 1

    def _report_loss(self) -> float:
        loss = self._loss_sum / self._loss_count if self._loss_count else math.nan
        self._loss_sum, self._loss_count = 0.0, 0
        return loss

    @override
    def _pre_optimizer_step(self, optimizer: Optimizer) -> None:
        self._check_alive()
        self._count_reply_bytes()
        if not self._sync_due() or self._flat is None:
            return
        with torch.no_grad():
            buffers = self._flat.pack()
            rates, loss = self._rates(), self._report_loss()
            if self._client is not None:
                self._client.post(buffers, rates, loss)
                self.comm.add_send(self._client.request_bytes)
                self._moves = None
            else:
                assert self._state is not None
                cpu = [b.to("cpu") for b in buffers]
                moves, staleness, distance = self._state.exchange(0, cpu, rates, loss, self._exchanges)
                self._moves, self._exchange_info = moves, (staleness, distance)

    @override
    def _synchronize(self, optimizer: Optimizer) -> None:
        assert self._flat is not None
        if self._client is not None:
            try:
                moves, staleness, distance = self._client.wait()
            except RuntimeError:
                self._check_alive()  # names the failed rank when the failure detector knows it
                raise
        else:
            assert self._moves is not None
            moves, (staleness, distance) = self._moves, self._exchange_info
        self._moves = None
        self._last_moves = moves
        device_moves = [m.to(b.device, non_blocking=False) for m, b in zip(moves, self._flat.buffers)]
        torch._foreach_sub_(self._flat.ordered, self._flat.all_views(device_moves))
        self._exchanges += 1
        self._log_metric("async/exchanges", float(self._exchanges))
        self._log_metric("async/staleness", float(staleness))
        self._log_metric("gossip/consensus_distance", float(distance))

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The center (rank 0, or a single process) in the module's state dict; other ranks their own model.

        Not a collective call.
        """
        state = self._state_copy()
        for key, value in self.center_tensors().items():
            state[key] = value.to(state[key].device, state[key].dtype)
        return state

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if is_distributed():
            dist.barrier()  # every exchange made before the checkpoint is in it
            if self.is_global_zero and "state_dict" in checkpoint:
                checkpoint["state_dict"] = self.lightning_module_state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def _rank_state(self) -> dict[str, Any]:
        state = super()._rank_state()
        if self._client is not None:
            state["seq"] = self._client.seq
        if self._state is not None:
            state["center"] = self._state.state_dict()
        return state

    @override
    def _load_rank_state(self, state: Mapping[str, Any]) -> None:
        super()._load_rank_state(state)
        self._pending_state = state.get("center")

    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params["asynchronous"] = True
        return params


class AsyncEASGDStrategy(AsyncCenterStrategy):
    r"""Asynchronous elastic averaging SGD (EASGD), or EAMSGD with ``momentum``.

    Every ``sync_every`` of its own steps a worker exchanges with the center on rank 0:
    :math:`e = \alpha(x_i - \tilde x)`, :math:`\tilde x \leftarrow \tilde x + e`,
    :math:`x_i \leftarrow x_i - e`, atomically, without waiting for other workers.

    Args:
        rho: The elastic coefficient :math:`\rho > 0` (:math:`\alpha = \eta\rho` per parameter group).
        sync_every: :math:`\tau`.
        moving_rate: A fixed :math:`\alpha \in (0, 1)` instead of :math:`\eta\rho`.
        momentum: EAMSGD's Nesterov momentum :math:`\delta \in [0, 1)` on the workers (``None``: the
            optimizer is used as configured). Requires ``torch.optim.SGD`` optimizers.
        heartbeat_timeout: Seconds without a heartbeat after which a rank counts as dead.
        record_history: Keep the order of served requests on rank 0 (for tests).
        **ddp_kwargs: See :class:`~lightning_optsurvey.strategies.LocalModelStrategy`.

    Raises:
        ValueError: If ``rho`` is not positive and finite, ``moving_rate`` not in (0, 1), ``momentum`` not
            in [0, 1), or :math:`\alpha \ge 1` at fit start (the exchange then overshoots the center:
            the round-robin map of the paper's stability analysis leaves :math:`0 < \alpha < 1`).
        TypeError: For arguments of the wrong type; at fit start, for ``momentum`` with an optimizer
            that is not ``torch.optim.SGD``.

    Example:
        >>> import lightning_optsurvey  # registers "easgd_async" and "eamsgd"
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accelerator="cpu", devices=4, strategy="easgd_async")  # doctest: +SKIP

    References:
        Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
        arXiv:1412.6651, Algorithms 1 (EASGD) and 2 (EAMSGD).
    """

    strategy_name = "easgd_async"
    registry_entries = {
        strategy_name: ("Asynchronous EASGD: each rank exchanges with a center on rank 0 every sync_every own steps",
                        {}),
        "eamsgd": ("EAMSGD: asynchronous EASGD with Nesterov momentum 0.9 on the workers (SGD optimizers)",
                   {"momentum": 0.9}),
    }
    _rule = "elastic"

    def __init__(
        self, rho: float = 0.1, sync_every: int = 4, moving_rate: float | None = None, momentum: float | None = None,
        heartbeat_timeout: float = 60.0, record_history: bool = False, **ddp_kwargs: Any,
    ) -> None:
        rho = check_float("rho", rho, low=0.0, low_open=True)
        moving_rate = check_optional(check_probability, "moving_rate", moving_rate, low_open=True, high_open=True)
        momentum = check_optional(check_probability, "momentum", momentum, high_open=True)
        super().__init__(sync_every=sync_every, heartbeat_timeout=heartbeat_timeout, record_history=record_history,
                         **ddp_kwargs)
        self.rho, self.moving_rate, self.momentum = rho, moving_rate, momentum

    @override
    def _on_fit_setup(self) -> None:
        if self.momentum is not None:
            for optimizer in self.optimizers:
                if type(optimizer) is not torch.optim.SGD:
                    raise TypeError(
                        f"EAMSGD (momentum={self.momentum}) runs Nesterov momentum on the workers and needs "
                        f"torch.optim.SGD optimizers; configure_optimizers returned {type(optimizer).__name__}"
                    )
                for group in optimizer.param_groups:
                    group.update(momentum=self.momentum, nesterov=True, dampening=0.0)
        super()._on_fit_setup()
        rates = self._rates()
        if rates and max(rates) >= 1:
            raise ValueError(
                f"asynchronous EASGD with moving rate alpha={max(rates):g} >= 1 overshoots the center at every "
                "exchange and diverges; use a smaller rho, learning rate or moving_rate (alpha < 1)"
            )

    @override
    def _rates(self) -> list[float]:
        if self.moving_rate is not None:
            return [self.moving_rate] * len(self._tensors)
        return [self.rho * float(group["lr"]) for group in self._groups]

    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params.update(easgd_rho=self.rho, easgd_moving_rate=self.moving_rate, eamsgd_momentum=self.momentum)
        return params


class AsyncLSGDStrategy(AsyncCenterStrategy):
    r"""Asynchronous leader SGD: workers pull toward the most recent leader, held on rank 0.

    Every ``sync_every`` of its own steps a worker reports its average training loss since its previous
    exchange with its parameters; if the loss is no worse than the leader's (or the worker is the
    leader), it becomes the leader and keeps its model, otherwise it moves
    :math:`x_i \leftarrow x_i - \lambda (x_i - x_\ell)`.

    Args:
        pull_strength: :math:`\lambda \in (0, 1]`.
        sync_every: :math:`\tau`.
        heartbeat_timeout: Seconds without a heartbeat after which a rank counts as dead.
        record_history: Keep the order of served requests on rank 0 (for tests).
        **ddp_kwargs: See :class:`~lightning_optsurvey.strategies.LocalModelStrategy`.

    Raises:
        ValueError: If ``pull_strength`` is not in (0, 1].
        TypeError: For arguments of the wrong type.

    References:
        Teng et al., "Leader Stochastic Gradient Descent for Distributed Training of Deep Learning
        Models", NeurIPS 2019, arXiv:1905.10395.
    """

    strategy_name = "lsgd_async"
    registry_entries = {
        strategy_name: ("Asynchronous leader SGD: each rank pulls toward the most recent leader, held on rank 0", {}),
    }
    _rule = "leader"

    def __init__(
        self, pull_strength: float = 0.1, sync_every: int = 4, heartbeat_timeout: float = 60.0,
        record_history: bool = False, **ddp_kwargs: Any,
    ) -> None:
        pull_strength = check_probability("pull_strength", pull_strength, low_open=True)
        super().__init__(sync_every=sync_every, heartbeat_timeout=heartbeat_timeout, record_history=record_history,
                         **ddp_kwargs)
        self.pull_strength = pull_strength

    @property
    def leader(self) -> int | None:
        """The current leader's rank (rank 0 or a single process; ``None`` elsewhere or before one)."""
        if self._state is None or self._state.leader_rank < 0:
            return None
        return self._state.leader_rank

    @override
    def _rates(self) -> list[float]:
        return [self.pull_strength] * len(self._tensors)

    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params["lsgd_pull_strength"] = self.pull_strength
        return params

