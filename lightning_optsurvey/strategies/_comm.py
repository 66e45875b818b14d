"""Communication primitives shared by the gossip and the centralized model-averaging strategies.

API (all collective calls must be made by every rank of the group, in the same order):

- :class:`FlatBuffers` packs a list of tensors (parameters, float buffers) into one contiguous buffer
  per ``(device, dtype)`` and copies values back. ``pack()`` returns the buffers, ``unpack(flats)``
  writes them into the tensors; ``like()`` allocates same-shaped scratch buffers; ``ordered`` lists the
  tensors in buffer order and ``all_views(buffers)`` the matching views into any same-layout buffers.
- :func:`neighbour_exchange` posts, in one ``torch.distributed.batch_isend_irecv``, a send of every
  flat buffer to every rank in ``send_to`` and a receive from every rank in ``recv_from``; it returns
  an :class:`Exchange` whose ``wait()`` yields the received buffers (``received[k][b]``: peer ``k``,
  buffer ``b``). Non-blocking, so a caller can compute while it is in flight.
- :func:`all_reduce_mean_` averages tensors in place over the group through flat buffers (one
  all-reduce per dtype and device); :func:`all_reduce_sum_` sums them; :func:`all_reduce_flat_` does the
  same over an existing :class:`FlatBuffers` (no allocation per call).
- :func:`broadcast_flat` sends a :class:`FlatBuffers`' packed values from one rank to all (counted as
  ``N - 1`` copies on the sender).
- :func:`consensus_distance` computes ``(1/N) sum_i ||x_i - xbar||^2`` with two all-reduces.
- :class:`CommCounter` counts bytes sent by this rank: point-to-point sends exactly, an all-reduce as a
  bandwidth-optimal ring all-reduce sends (``2 (N - 1) / N`` times the payload). ``start_step()``
  opens a new step; ``step_bytes`` is what was sent since, ``total_bytes`` the running total.

Peer ranks are global ranks. Buffers live on the tensors' devices, so the same calls run over gloo
(CPU) and NCCL (GPU).

Why our own: ``torch.distributed`` has the primitives but no flat-buffer neighbour exchange; the
model averagers in ``torch.distributed.algorithms.model_averaging`` only do global all-reduce, and
BlueFog's ``neighbor_allreduce`` needs BlueFog's own engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CommCounter",
    "Exchange",
    "FlatBuffers",
    "all_reduce_flat_",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "broadcast_flat",
    "consensus_distance",
    "is_distributed",
    "neighbour_exchange",
    "ring_all_reduce_bytes",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a default process group is up (so collectives are meaningful)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of ``group`` (the world by default), 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def ring_all_reduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes each rank sends in a bandwidth-optimal ring all-reduce of ``nbytes``: ``2 (N-1)/N * nbytes``.

    References:
        Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations", 2009.
    """
    return 0 if world_size <= 1 else (2 * (world_size - 1) * nbytes) // world_size


@dataclass
class CommCounter:
    """Bytes this rank has sent: in total and in the current step.

    Attributes:
        total_bytes: Bytes sent since construction (or the last ``load_state_dict``).
        step_bytes: Bytes sent since the last :meth:`start_step`.
        messages: Point-to-point messages sent in total.
    """

    total_bytes: int = 0
    step_bytes: int = 0
    messages: int = 0

    def start_step(self) -> None:
        """Begin a new step: ``step_bytes`` restarts from zero."""
        self.step_bytes = 0

    def add_send(self, nbytes: int, messages: int = 1) -> None:
        """Record ``messages`` point-to-point sends totalling ``nbytes``."""
        self.total_bytes += nbytes
        self.step_bytes += nbytes
        self.messages += messages

    def add_all_reduce(self, nbytes: int, world_size: int) -> None:
        """Record an all-reduce of ``nbytes`` per rank, counted as a ring all-reduce."""
        sent = ring_all_reduce_bytes(nbytes, world_size)
        self.total_bytes += sent
        self.step_bytes += sent

    def state_dict(self) -> dict[str, int]:
        return {"total_bytes": self.total_bytes, "messages": self.messages}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total_bytes = int(state["total_bytes"])
        self.messages = int(state["messages"])
        self.step_bytes = 0


class FlatBuffers:
    """One contiguous buffer per ``(device, dtype)`` for a fixed list of tensors.

    Args:
        tensors: The tensors to pack (for example the parameters and float buffers of a model). Their
            order fixes the layout, so every rank must pass the same list in the same order.

    Raises:
        ValueError: If ``tensors`` is empty.

    Example:
        >>> layer = torch.nn.Linear(3, 2)
        >>> flat = FlatBuffers(list(layer.parameters()))
        >>> [tuple(b.shape) for b in flat.pack()]
        [(8,)]
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        tensors = list(tensors)
        if not tensors:
            raise ValueError("FlatBuffers needs at least one tensor")
        self.tensors = tensors
        keys: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(tensors):
            keys.setdefault((tensor.device, tensor.dtype), []).append(index)
        self.keys = list(keys)
        self.indices = list(keys.values())
        self.buffers = [
            torch.empty(sum(tensors[i].numel() for i in idx), device=device, dtype=dtype)
            for (device, dtype), idx in zip(self.keys, self.indices)
        ]
        self._views = [self.views_of(buffer, b) for b, buffer in enumerate(self.buffers)]
        self.ordered = [tensors[i] for idx in self.indices for i in idx]
        """The tensors in buffer order: ``ordered[k]`` matches ``all_views(buffers)[k]``."""

    @classmethod
    def or_none(cls, tensors: Sequence[Tensor]) -> FlatBuffers | None:
        """The buffers of ``tensors``, or ``None`` when there are none (a model without float buffers)."""
        return cls(tensors) if tensors else None

    def views_of(self, buffer: Tensor, b: int) -> list[Tensor]:
        """Views into ``buffer`` (laid out like buffer ``b``) with the shapes of its tensors."""
        shapes = [self.tensors[i].shape for i in self.indices[b]]
        sizes = [self.tensors[i].numel() for i in self.indices[b]]
        return [view.view(shape) for view, shape in zip(buffer.split(sizes), shapes)]

    def all_views(self, buffers: Sequence[Tensor]) -> list[Tensor]:
        """Views into every buffer of ``buffers`` (this layout), in the order of :attr:`ordered`."""
        return [view for b, buffer in enumerate(buffers) for view in self.views_of(buffer, b)]

    @property
    def numel(self) -> int:
        """Total number of elements."""
        return sum(buffer.numel() for buffer in self.buffers)

    @property
    def nbytes(self) -> int:
        """Total size in bytes of one copy of all buffers."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers)

    def like(self) -> list[Tensor]:
        """Fresh, uninitialized buffers with the same layout."""
        return [torch.empty_like(buffer) for buffer in self.buffers]

    def pack(self, out: list[Tensor] | None = None) -> list[Tensor]:
        """Copy the tensors' current values into the flat buffers (``out`` or the internal ones)."""
        targets = self.buffers if out is None else out
        for b, target in enumerate(targets):
            views = self._views[b] if out is None else self.views_of(target, b)
            torch._foreach_copy_(views, [self.tensors[i].detach() for i in self.indices[b]])
        return targets

    def unpack(self, flats: Sequence[Tensor] | None = None) -> None:
        """Copy ``flats`` (default: the internal buffers) back into the tensors."""
        with torch.no_grad():
            for b, flat in enumerate(self.buffers if flats is None else flats):
                views = self._views[b] if flats is None else self.views_of(flat, b)
                torch._foreach_copy_([self.tensors[i] for i in self.indices[b]], views)


@dataclass
class Exchange:
    """An in-flight neighbour exchange; :meth:`wait` completes it and returns the received buffers."""

    works: list
    received: list[list[Tensor]]

    def wait(self) -> list[list[Tensor]]:
        for work in self.works:
            work.wait()
        self.works = []
        return self.received


def neighbour_exchange(
    send: Sequence[Tensor],
    send_to: Sequence[int],
    recv_from: Sequence[int],
    *,
    recv: list[list[Tensor]] | None = None,
    counter: CommCounter | None = None,
    group: dist.ProcessGroup | None = None,
) -> Exchange:
    """Send every buffer in ``send`` to each rank of ``send_to``; receive the same layout from ``recv_from``.

    All operations go into one ``torch.distributed.batch_isend_irecv`` call. Buffer ``b`` travels with
    tag ``b``, so several buffers between the same pair of ranks cannot be mismatched on gloo (NCCL
    ignores tags and matches in order, which is the same order). With NCCL, the first batched P2P call
    of a group must involve every rank; Lightning's setup collectives (barrier, broadcast) come first.

    Args:
        send: Buffers to send (not to be modified until :meth:`Exchange.wait` returns).
        send_to: Global ranks to send to.
        recv_from: Global ranks to receive from.
        recv: Optional preallocated receive buffers, ``recv[k][b]`` for peer ``k``, buffer ``b``.
        counter: Counts the bytes sent.
        group: Process group (default: the world).

    Returns:
        The in-flight :class:`Exchange`.
    """
    if recv is None:
        recv = [[torch.empty_like(buffer) for buffer in send] for _ in recv_from]
    ops: list[dist.P2POp] = []
    for peer in send_to:
        ops.extend(dist.P2POp(dist.isend, buffer, peer, group, tag=b) for b, buffer in enumerate(send))
    for peer, buffers in zip(recv_from, recv):
        ops.extend(dist.P2POp(dist.irecv, buffer, peer, group, tag=b) for b, buffer in enumerate(buffers))
    works = dist.batch_isend_irecv(ops) if ops else []
    if counter is not None and send_to:
        nbytes = sum(buffer.numel() * buffer.element_size() for buffer in send)
        counter.add_send(nbytes * len(send_to), messages=len(send_to) * len(send))
    return Exchange(works=list(works), received=recv)


def all_reduce_flat_(
    flat: FlatBuffers, *, average: bool = True, counter: CommCounter | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    r"""Sum (``average=False``) or average the tensors of ``flat`` in place over the group.

    Packs, runs one all-reduce per buffer and unpacks, reusing ``flat``'s buffers; a no-op without a
    process group. ``counter`` records the ring all-reduce bytes.
    """
    if not is_distributed():
        return
    size = dist.get_world_size(group)
    for buffer in flat.pack():
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        if average:
            buffer.div_(size)
    if counter is not None:
        counter.add_all_reduce(flat.nbytes, size)
    flat.unpack()


def _flat_all_reduce_(
    tensors: Iterable[Tensor], average: bool, counter: CommCounter | None, group: dist.ProcessGroup | None
) -> None:
    tensors = list(tensors)
    if tensors and is_distributed():
        all_reduce_flat_(FlatBuffers(tensors), average=average, counter=counter, group=group)


def broadcast_flat(
    flat: FlatBuffers, src: int, *, counter: CommCounter | None = None, group: dist.ProcessGroup | None = None
) -> list[Tensor]:
    """Pack ``flat`` and broadcast its buffers from global rank ``src``; return the (received) buffers.

    The tensors are not written: the caller unpacks, or combines the returned buffers itself. On
    ``src``, ``counter`` records a one-to-all broadcast (gloo's algorithm): ``N - 1`` copies.
    """
    buffers = flat.pack()
    if not is_distributed():
        return buffers
    for buffer in buffers:
        dist.broadcast(buffer, src=src, group=group)
    if counter is not None and dist.get_rank() == src:
        peers = dist.get_world_size(group) - 1
        counter.add_send(flat.nbytes * peers, messages=peers * len(buffers))
    return buffers


def all_reduce_sum_(
    tensors: Iterable[Tensor], *, counter: CommCounter | None = None, group: dist.ProcessGroup | None = None
) -> None:
    """Sum ``tensors`` in place over the group (no-op without a process group)."""
    _flat_all_reduce_(tensors, False, counter, group)


def all_reduce_mean_(
    tensors: Iterable[Tensor], *, counter: CommCounter | None = None, group: dist.ProcessGroup | None = None
) -> None:
    r"""Average ``tensors`` in place over the group: :math:`x \leftarrow \frac1N \sum_i x_i`.

    One all-reduce per ``(device, dtype)`` through :class:`FlatBuffers`; a no-op without a process
    group. ``counter`` records the ring all-reduce bytes.
    """
    _flat_all_reduce_(tensors, True, counter, group)


def consensus_distance(tensors: Sequence[Tensor], *, group: dist.ProcessGroup | None = None) -> Tensor:
    r"""Consensus distance :math:`\Xi^2 = \frac1N \sum_i \lVert x_i - \bar x\rVert^2` over the group.

    Computed in two passes (average first, then the squared deviations), which stays accurate when
    the models are nearly equal, unlike :math:`\frac1N\sum\lVert x_i\rVert^2 - \lVert\bar x\rVert^2`.
    The tensors are not modified. Without a process group the distance is 0.

    Args:
        tensors: This rank's parameters (same list and order on every rank).
        group: Process group (default: the world).

    Returns:
        A float64 scalar on the first tensor's device, equal on every rank.

    References:
        Kong et al., "Consensus Control for Decentralized Deep Learning", ICML 2021, arXiv:2102.04828.
    """
    tensors = [t.detach() for t in tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    if not tensors or not is_distributed():
        return torch.zeros((), dtype=torch.float64, device=device)
    mean = [t.to(torch.float64, copy=True) for t in tensors]
    all_reduce_mean_(mean, group=group)
    local = torch.zeros((), dtype=torch.float64, device=device)
    for t, m in zip(tensors, mean):
        local += (t.to(torch.float64) - m).square().sum().to(device)
    dist.all_reduce(local, group=group)
    return local / dist.get_world_size(group)
