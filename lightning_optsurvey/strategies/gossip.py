r"""Decentralized training: ``Trainer(strategy="gossip")``, D-PSGD and Stochastic Gradient Push.

Each rank keeps its own model and, after its optimizer step, averages it with a few neighbours
instead of all-reducing gradients. With a doubly stochastic mixing matrix ``W`` from a
:class:`~lightning_optsurvey.strategies.Topology`, one round of ``algorithm="dpsgd"`` is, for rank
``i`` with local optimizer update :math:`\Delta_i` (``-lr * g_i`` for SGD):

- adapt then combine (default): :math:`x_i \leftarrow \sum_j W_{ij} (x_j + \Delta_j)`;
- ``overlap=True``: the exchange of the pre-step parameters runs while the gradient is computed,
  then :math:`x_i \leftarrow \sum_j W_{ij} x_j + \Delta_i` (the D-PSGD update of Lian et al.).

``algorithm="push_sum"`` is SGP: each rank also carries a weight :math:`w_i` (1 at the start) and
sends equal shares of its numerator :math:`z_i = w_i x_i + \Delta_i` and weight to its
out-neighbours (column-stochastic :math:`P`), then de-biases,
:math:`x_i = (\sum_j P_{ij} z_j) / (\sum_j P_{ij} w_j)`. It converges to the true average on
directed and irregular graphs, where ``W`` is not doubly stochastic. Float buffers (BatchNorm
statistics) are gossiped like parameters.

``algorithm="d2"`` (D²), ``"gradient_tracking"`` (DIGing) and ``"choco"`` (CHOCO-SGD with a
``compressor``) remove D-PSGD's bias on heterogeneous data or compress the messages; their update
rules live in :mod:`lightning_optsurvey.strategies.gossip_algorithms`.

Every round is one ``torch.distributed.batch_isend_irecv`` over flat buffers (one per dtype and
device), on gloo (CPU) and NCCL (GPU) alike. ``gossip_every=k`` takes ``k - 1`` purely local steps
between rounds. Checkpoints hold the consensus model (the average) plus each rank's own state for an
exact resume (see :mod:`lightning_optsurvey.strategies._base`).

Validation, test and predict evaluate the consensus model on every rank (what checkpoints hold). With
uneven per-rank data, a rank out of batches keeps gossiping with a zero update until every rank has
finished the epoch: the mixing preserves the network average, so the consensus stays the average of
every rank's model (see :mod:`lightning_optsurvey.strategies._base`).

Why our own: BlueFog needs its own MPI/NCCL engine and has been unmaintained since 2021; SGP's code
is a research snapshot outside Lightning; Bagua's Lightning strategy does not import on
Lightning >= 2.1.

References:
    Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study for
    Decentralized Parallel Stochastic Gradient Descent", NeurIPS 2017, arXiv:1705.09056.
    Assran et al., "Stochastic Gradient Push for Distributed Deep Learning", ICML 2019,
    arXiv:1811.10792. Koloskova et al., "A Unified Theory of Decentralized SGD with Changing
    Topology and Local Updates", ICML 2020, arXiv:2003.10422.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey import validation
from lightning_optsurvey._compat import StrategyRegistryType as _StrategyRegistry
from lightning_optsurvey.averaging.compression import Compressor, make_compressor
from lightning_optsurvey.strategies._base import PeriodicSyncStrategy
from lightning_optsurvey.strategies._comm import Exchange, neighbour_exchange
from lightning_optsurvey.strategies.gossip_algorithms import (
    ChocoGossip,
    D2Gossip,
    GossipAlgorithm,
    GradientTrackingGossip,
)
from lightning_optsurvey.strategies.topology import TOPOLOGY_KINDS, Topology
from lightning_optsurvey.validation import check_int

__all__ = ["GOSSIP_ALGORITHMS", "GOSSIP_ALGORITHM_STRATEGY_NAMES", "GOSSIP_STRATEGY_NAMES", "GossipStrategy"]

GOSSIP_ALGORITHMS: tuple[str, ...] = ("dpsgd", "push_sum", "d2", "gradient_tracking", "choco")
GOSSIP_STRATEGY_NAMES: dict[str, str] = {
    "gossip": "exponential",
    "gossip_ring": "ring",
    "gossip_torus": "torus",
    "gossip_exponential": "exponential",
    "gossip_one_peer": "one_peer_exponential",
    "gossip_complete": "complete",
}
"""Registered ``Trainer(strategy=...)`` names and the topology each one uses."""
GOSSIP_ALGORITHM_STRATEGY_NAMES: dict[str, dict[str, str]] = {
    "gossip_d2": {"topology": "ring", "algorithm": "d2"},
    "gossip_gt": {"topology": "ring", "algorithm": "gradient_tracking"},
    "gossip_choco": {"topology": "ring", "algorithm": "choco"},
}
"""Registered names of the heterogeneous-data and compressed algorithms, and their arguments."""
_STEPWISE = frozenset({"d2", "gradient_tracking", "choco"})


class GossipStrategy(PeriodicSyncStrategy):
    """Decentralized data-parallel training by gossip averaging with neighbours.

    Args:
        topology: A :class:`~lightning_optsurvey.strategies.Topology` (its world size must match the
            run's) or a kind: ``"ring"``, ``"torus"``, ``"exponential"``, ``"one_peer_exponential"``,
            ``"complete"``, ``"erdos_renyi"``.
        gossip_every: Gossip after every ``gossip_every``-th optimizer step (local steps between).
        overlap: Start the exchange of the pre-step model before the gradient is computed and combine
            after the step, so communication overlaps computation.
        algorithm: ``"dpsgd"`` (mixing with ``W``), ``"push_sum"`` (SGP with de-biasing weights),
            ``"d2"``, ``"gradient_tracking"`` or ``"choco"`` (see
            :mod:`~lightning_optsurvey.strategies.gossip_algorithms`; these three need a static
            topology, ``gossip_every=1`` and ``overlap=False``).
        compressor: CHOCO's compressor: ``"topk"`` (default), ``"randomk"``, ``"qsgd"``, ``"sign"`` or a
            :class:`~lightning_optsurvey.averaging.compression.Compressor` (only with ``"choco"``).
        ratio: Fraction of coordinates ``"topk"``/``"randomk"`` keep.
        consensus_lr: CHOCO's consensus step size gamma in ``(0, 1]`` (on Dirichlet digits in
            benchmarks/heterogeneous.py, 0.7 diverged within 90 steps with top-1 % and QSGD, and 0.4 within
            270; the theorem's step is far smaller).
        compression_seed: Seed of the random compressors (mixed with the rank).
        topology_seed: Seed of a random topology built from a kind string (``"erdos_renyi"``).
        **ddp_kwargs: ``accelerator``, ``parallel_devices``, ``cluster_environment``,
            ``checkpoint_io``, ``precision_plugin``, ``process_group_backend``, ``timeout``,
            ``start_method`` (see :class:`~lightning.pytorch.strategies.DDPStrategy`).

    Raises:
        ValueError: For an unknown topology kind or algorithm, ``gossip_every < 1``, a topology that
            the world size cannot carry or whose size differs from the run's (in ``Trainer.__init__``),
            or ``Trainer(sync_batchnorm=True)``.
        TypeError: For arguments of the wrong type, or ``DistributedDataParallel`` keywords.

    Example:
        >>> import lightning_optsurvey  # registers "gossip", "gossip_ring", ...
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accelerator="cpu", devices=4, strategy="gossip_ring")  # doctest: +SKIP
        >>> trainer = Trainer(strategy=GossipStrategy("one_peer_exponential", overlap=True))  # doctest: +SKIP
    """

    def __init__(
        self,
        topology: str | Topology = "exponential",
        gossip_every: int = 1,
        overlap: bool = False,
        algorithm: str = "dpsgd",
        *,
        topology_seed: int = 0,
        compressor: str | Compressor | None = None,
        ratio: float = 0.01,
        consensus_lr: float = 0.1,
        compression_seed: int = 0,
        **ddp_kwargs: Any,
    ) -> None:
        if isinstance(topology, str):
            if topology not in TOPOLOGY_KINDS:
                raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGY_KINDS)}")
        elif not isinstance(topology, Topology):
            raise TypeError(f"topology must be a Topology or a kind string, got {type(topology).__name__}")
        check_int("gossip_every", gossip_every, low=1)
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {overlap!r}")
        if not isinstance(algorithm, str):
            raise TypeError(f"algorithm must be a name among {', '.join(GOSSIP_ALGORITHMS)}, got {algorithm!r}")
        if algorithm not in GOSSIP_ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(GOSSIP_ALGORITHMS)}")
        if isinstance(topology_seed, bool) or not isinstance(topology_seed, int):
            raise TypeError(f"topology_seed must be an integer, got {topology_seed!r}")
        self._compressor = _check_algorithm_args(
            algorithm, gossip_every, overlap, compressor, ratio, consensus_lr, compression_seed
        )
        self.consensus_lr = float(consensus_lr)
        self.compression_seed = compression_seed
        self._algorithm: GossipAlgorithm | None = None
        super().__init__(sync_every=gossip_every, **ddp_kwargs)
        self._topology_spec = topology
        self.topology_seed = topology_seed
        self.overlap = overlap
        self.algorithm = algorithm
        self.topology: Topology | None = None
        self._weight: Tensor | None = None
        self._pre: list[Tensor] | None = None
        self._numerator: list[Tensor] | None = None
        self._recv: list[list[Tensor]] = []
        self._pending: Exchange | None = None
        self._send: list[Tensor] | None = None
        self._rows: dict[int, tuple[float, list[float]]] = {}

    @property
    def topology_kind(self) -> str:
        """The topology's kind string."""
        spec = self._topology_spec
        return spec if isinstance(spec, str) else spec.kind

    @property
    def gossip_every(self) -> int:
        """Optimizer steps per gossip round (``sync_every`` of the periodic schedule)."""
        return self.sync_every

    rounds = PeriodicSyncStrategy.syncs
    """Gossip rounds done so far: gossip's name for :attr:`syncs`."""

    # ----------------------------------------------------------------------------------------------
    # Configuration
    # ----------------------------------------------------------------------------------------------
    @override
    def _validate_world_size(self, world_size: int) -> None:
        spec = self._topology_spec
        if isinstance(spec, Topology):
            if spec.world_size != world_size:
                raise ValueError(
                    f"the topology {spec!r} is for {spec.world_size} ranks, but this run has {world_size} "
                    "(devices x num_nodes)"
                )
            self.topology = spec if world_size > 1 else None
        else:
            self.topology = Topology(spec, world_size, seed=self.topology_seed) if world_size > 1 else None
        if self.algorithm in _STEPWISE and self.topology is not None and self.topology.is_time_varying:
            raise ValueError(f"algorithm={self.algorithm!r} needs a static topology, got {self.topology!r}")
        if self.topology is not None:  # weights the algorithm cannot use (a user's) are refused before training
            self.topology.matrices(push_sum=self.algorithm == "push_sum")

    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params.update(
            topology=self.topology_kind,
            gossip_algorithm=self.algorithm,
            gossip_every=params.pop("sync_every"),
            gossip_overlap=self.overlap,
        )
        if self.topology is not None:
            params["spectral_gap"] = self.topology.spectral_gap()
        if self._algorithm is not None:
            params.update(self._algorithm.logged_params())
        return params

    @override
    def _on_fit_setup(self) -> None:
        super()._on_fit_setup()
        self._pending = None
        if self.topology is None or self._flat is None:
            self._flat = None  # a single rank, or nothing to gossip
            return
        if self.algorithm in _STEPWISE:
            if self._algorithm is None:
                self._algorithm = self._make_algorithm()
            self._algorithm.setup()
            return
        if self.overlap or self.algorithm == "push_sum":
            self._pre = self._flat.like()
        if self.overlap and self.algorithm == "push_sum":
            self._numerator = self._flat.like()
        if self._weight is None:
            self._weight = torch.ones(1, dtype=torch.float64, device=self.root_device)
        else:
            self._weight = self._weight.to(self.root_device)
        self._recv = []

    # ----------------------------------------------------------------------------------------------
    # Gossip
    # ----------------------------------------------------------------------------------------------
    def _row(self, step: int) -> tuple[float, list[float]]:
        """This rank's self weight and the weights of the ranks it receives from at round ``step``."""
        assert self.topology is not None
        key = step % self.topology.period
        if key not in self._rows:
            matrix = (
                self.topology.push_sum_matrix(key) if self.algorithm == "push_sum"
                else self.topology.mixing_matrix(key)
            )
            rank = self.global_rank
            _, recv_from = self.topology.peers(rank, key)
            self._rows[key] = (float(matrix[rank, rank]), [float(matrix[rank, j]) for j in recv_from])
        return self._rows[key]

    def _payload(self, buffers: list[Tensor]) -> list[Tensor]:
        assert self._weight is not None
        return [*buffers, self._weight] if self.algorithm == "push_sum" else buffers

    def _start_exchange(self, send: list[Tensor]) -> Exchange:
        assert self.topology is not None
        send_to, recv_from = self.topology.peers(self.global_rank, self._syncs)
        if len(self._recv) != len(recv_from):
            self._recv = [[torch.empty_like(b) for b in send] for _ in recv_from]
        return neighbour_exchange(send, send_to, recv_from, recv=self._recv, counter=self.comm)

    def _combine_(self, own: list[Tensor], received: list[list[Tensor]]) -> None:
        """``own <- W_ii own + sum_k W_i,j_k received_k`` in place (weights included for push-sum)."""
        self_weight, peer_weights = self._row(self._syncs)
        for b, buffer in enumerate(own):
            buffer.mul_(self_weight)
            for k, weight in enumerate(peer_weights):
                buffer.add_(received[k][b], alpha=weight)

    def _make_algorithm(self) -> GossipAlgorithm:
        if self.algorithm == "d2":
            return D2Gossip(self)
        if self.algorithm == "gradient_tracking":
            return GradientTrackingGossip(self)
        assert self._compressor is not None
        return ChocoGossip(self, self._compressor, self.consensus_lr, self.compression_seed)

    @override
    def _after_backward(self, optimizer: Optimizer) -> None:
        if self._algorithm is not None and self._flat is not None:
            with torch.no_grad():
                self._algorithm.after_backward()

    @override
    def _pre_optimizer_step(self, optimizer: Optimizer) -> None:
        if not self._sync_due() or self._flat is None:
            return
        if self._algorithm is not None:
            self._algorithm.before_step()
            return
        # While a rank is out of data, the round is announced after the step, so the exchange starts then.
        self._prepare_round(launch=not self._live)

    @override
    def _join_refusals(self) -> int:
        # D2, gradient tracking and CHOCO carry per-rank state (previous iterate, tracker, replicas) that a
        # round without a step would corrupt: uneven batches stop the run with the base's clear error instead.
        return super()._join_refusals() | (16 if self._algorithm is not None else 0)

    @override
    def _shadow_synchronize(self, optimizer: Optimizer | None) -> None:
        # Out of data: a round with a zero update. The mixing keeps the network average, so such a rank
        # relays its neighbours' models and the consensus is still the average of every rank's model.
        self._prepare_round()
        self._synchronize(optimizer)  # type: ignore[arg-type]

    def _prepare_round(self, launch: bool = True) -> None:
        assert self._flat is not None
        if self._pre is not None:
            self._flat.pack(self._pre)
        if not self.overlap:
            return
        assert self._pre is not None
        send = self._pre
        if self.algorithm == "push_sum":
            assert self._numerator is not None and self._weight is not None
            for numerator, pre in zip(self._numerator, self._pre):
                torch.mul(pre, self._weight.to(pre.dtype), out=numerator)
            send = self._numerator
        self._send = self._payload(send)
        if launch:
            self._pending = self._start_exchange(self._send)

    @override
    def _synchronize(self, optimizer: Optimizer) -> None:
        if self._algorithm is not None:
            self._algorithm.synchronize()
        elif self.overlap:
            self._combine_overlapped()
        else:
            self._combine_after_step()

    def _combine_after_step(self) -> None:
        assert self._flat is not None
        current = self._flat.pack()
        if self.algorithm == "dpsgd":
            received = self._start_exchange(current).wait()
            self._combine_(current, received)
            self._flat.unpack(current)
            return
        # Push-sum: numerator z = w * x_pre + (x_post - x_pre), built in the pre-step buffer.
        assert self._pre is not None and self._weight is not None
        for pre, post in zip(self._pre, current):
            post.sub_(pre)
            pre.mul_(self._weight.to(pre.dtype)).add_(post)
        payload = self._payload(self._pre)
        received = self._start_exchange(payload).wait()
        self._combine_(payload, received)
        for numerator in self._pre:
            numerator.div_(self._weight.to(numerator.dtype))
        self._flat.unpack(self._pre)

    def _combine_overlapped(self) -> None:
        if self._pending is None and self._send is not None:
            self._pending = self._start_exchange(self._send)
        assert self._flat is not None and self._pending is not None and self._pre is not None
        received = self._pending.wait()
        self._pending = None
        delta = self._flat.pack()
        for post, pre in zip(delta, self._pre):
            post.sub_(pre)
        if self.algorithm == "dpsgd":
            mixed = self._pre
            self._combine_(mixed, received)
        else:
            assert self._numerator is not None
            mixed = self._numerator
            self._combine_(self._payload(mixed), received)
        for buffer, step in zip(mixed, delta):
            buffer.add_(step)
        if self.algorithm == "push_sum":
            assert self._weight is not None
            for buffer in mixed:
                buffer.div_(self._weight.to(buffer.dtype))
        self._flat.unpack(mixed)

    # ----------------------------------------------------------------------------------------------
    # Consensus and checkpoints
    # ----------------------------------------------------------------------------------------------
    @override
    def _consensus_weight(self) -> Tensor | None:
        return self._weight if self.algorithm == "push_sum" and self._weight is not None else None

    @override
    def _rank_state(self) -> dict[str, Any]:
        state = super()._rank_state()
        if self._weight is not None:
            state["push_sum_weight"] = self._weight.detach().clone()
        if self._algorithm is not None:
            state["gossip_algorithm"] = self._algorithm.state_dict()
        return state

    @override
    def _load_rank_state(self, state: Mapping[str, Any]) -> None:
        super()._load_rank_state(state)
        weight = state.get("push_sum_weight")
        self._weight = None if weight is None else weight.detach().to(torch.float64).reshape(1).clone()
        if self.algorithm in _STEPWISE and "gossip_algorithm" in state:
            if self._algorithm is None:
                self._algorithm = self._make_algorithm()
            self._algorithm.load_state_dict(state["gossip_algorithm"])

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, kind in GOSSIP_STRATEGY_NAMES.items():
            strategy_registry.register(
                name,
                cls,
                description=f"Decentralized gossip averaging (D-PSGD) on the {kind!r} topology",
                override=True,
                topology=kind,
            )
        for name, kwargs in GOSSIP_ALGORITHM_STRATEGY_NAMES.items():
            strategy_registry.register(
                name, cls, description=f"Decentralized {kwargs['algorithm']} on the ring", override=True, **kwargs
            )


def _check_algorithm_args(
    algorithm: str, gossip_every: int, overlap: bool, compressor: Any, ratio: Any, consensus_lr: Any, seed: Any
) -> Compressor | None:
    """Validate the arguments of the stepwise algorithms; CHOCO's compressor (``None`` for the others)."""
    if algorithm in _STEPWISE and (gossip_every != 1 or overlap):
        raise ValueError(
            f"algorithm={algorithm!r} gossips after every step without overlap; got gossip_every={gossip_every}, "
            f"overlap={overlap}"
        )
    validation.check_float("consensus_lr", consensus_lr, low=0.0, high=1.0, low_open=True)
    validation.check_float("ratio", ratio, low=0.0, high=1.0, low_open=True)
    validation.check_int("compression_seed", seed, low=None)
    if algorithm != "choco":
        if compressor is not None:
            raise ValueError(f"compressor is CHOCO's; algorithm={algorithm!r} sends uncompressed models")
        for name, value, default in (("ratio", ratio, 0.01), ("consensus_lr", consensus_lr, 0.1),
                                     ("compression_seed", seed, 0)):
            if value != default:
                raise ValueError(
                    f"{name} configures CHOCO-SGD; algorithm={algorithm!r} does not use it (got {value!r})"
                )
        return None
    compressor = "topk" if compressor is None else compressor
    if ratio != 0.01 and compressor not in ("topk", "randomk"):
        raise ValueError(f"ratio is the share of coordinates 'topk' and 'randomk' send; compressor={compressor!r} "
                         f"does not use it (got ratio={ratio!r})")
    return make_compressor(compressor, ratio)
