r"""The center of the asynchronous centralized methods: one copy on rank 0, served to any worker at any time.

Asynchronous EASGD / EAMSGD and asynchronous LSGD keep one shared point (EASGD's center variable, LSGD's
leader) that each worker exchanges with every :math:`\tau` of *its own* steps, without waiting for the
others. This module holds that point and serves the exchanges:

- :class:`CenterState` is the point and its exchange rules, with no transport: :meth:`CenterState.exchange`
  applies one worker's request atomically (under a lock) and returns the worker's move. With
  ``rule="elastic"`` (EASGD, Zhang, Choromanska & LeCun 2015, Algorithm 1),
  :math:`e = \alpha (x_i - \tilde x)`, :math:`\tilde x \leftarrow \tilde x + e` and the worker applies
  :math:`x_i \leftarrow x_i - e`. With ``rule="leader"`` (asynchronous LSGD, Teng et al. 2019), the
  worker replaces the leader when its reported loss is no worse than the leader's (or it is the leader:
  its loss and model are then refreshed) and receives :math:`e = \lambda (x_i - x_\ell)` (zero for the
  leader itself). Every request is applied exactly once, in the order the lock grants it; counters record
  the exchanges per rank, the total number of center updates and, per request, the staleness (center
  updates by other workers since this worker's previous exchange).
- :class:`CenterServer` serves requests over its own gloo process group from a thread on rank 0;
  :class:`CenterClient` is a worker's side of an exchange (non-blocking: the request leaves before the
  forward pass and the reply is applied after the optimizer step). Rank 0's own worker calls
  :meth:`CenterState.exchange` directly.
- :class:`Liveness` is the failure detector: every rank increments a heartbeat counter in the process
  group's store; a rank whose counter stops for ``timeout`` seconds, or that records an error, makes
  every other rank raise a ``RuntimeError`` naming it at its next step (gloo cannot interrupt a pending
  receive from a dead peer, and it times out an idle any-source receive, so the store is the only
  reliable signal).

Protocol (tags on the center's group): a request is a float64 header ``[kind, seq, loss, a_1..a_T]``
(tag 1; ``kind`` 1 = exchange, 2 = stop; ``a_k`` the moving rate or pull strength of tensor ``k``)
followed by the flat buffers (tags 2 + b); the reply is a float64 header ``[status, staleness,
squared distance, updates]`` (tag 64) and the moves :math:`e` (tags 65 + b). Requests are received with
``src=None`` (any source) and matched by tag, so the server never waits for one particular worker.
Everything on the group is on the CPU: CUDA tensors are staged through CPU buffers (NCCL cannot receive
from any source).

Why gloo point-to-point and not ``torch.distributed.rpc``: RPC needs its own rendezvous and agent
(TensorPipe) beside Lightning's process group, its graceful shutdown is a barrier that never returns if
a worker died, and it is in maintenance mode; a dedicated gloo group with any-source receives is the
parameter server of the paper in about a hundred lines, on the primitives Lightning already uses.
Why our own: no maintained library provides a parameter server for ``torch.distributed``.

References:
    Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
    arXiv:1412.6651 (Algorithms 1-2).
    Teng et al., "Leader Stochastic Gradient Descent for Distributed Training of Deep Learning Models",
    NeurIPS 2019, arXiv:1905.10395.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_optsurvey.validation import check_bool, check_choice, check_int

__all__ = ["CENTER_RULES", "CenterClient", "CenterServer", "CenterState", "Liveness"]

CENTER_RULES: tuple[str, ...] = ("elastic", "leader")

KIND_EXCHANGE = 1.0
KIND_STOP = 2.0
TAG_REQUEST = 1
TAG_BODY = 2
TAG_REPLY = 64
TAG_MOVE = 65
STATUS_OK = 0.0
STATUS_ABORT = 1.0
REPLY_FIELDS = 4


class CenterState:
    """The shared point (EASGD's center or LSGD's leader) and its atomic exchange rule.

    Args:
        buffers: The initial point as flat CPU buffers (copied), laid out like the workers' buffers.
        sizes: ``sizes[b]`` lists the numbers of elements of the tensors packed in buffer ``b``.
        world_size: Number of workers (ranks).
        rule: ``"elastic"`` or ``"leader"``.
        record: Keep the order of the served requests, ``(rank, seq)``, in :attr:`history` (for tests).
    """

    def __init__(
        self, buffers: Sequence[Tensor], sizes: Sequence[Sequence[int]], world_size: int, rule: str = "elastic",
        record: bool = False,
    ) -> None:
        self.rule = check_choice("rule", rule, CENTER_RULES)
        self.record = check_bool("record", record)
        self.buffers = [b.detach().to("cpu", copy=True) for b in buffers]
        self.sizes = [list(s) for s in sizes]
        self.world_size = check_int("world_size", world_size)
        self.lock = threading.Lock()
        self.updates = 0
        self.served = [0] * world_size
        self.last_seen = [0] * world_size
        self.leader_rank = -1
        self.leader_loss = math.inf
        self.history: list[tuple[int, int]] = []
        self.reply_bytes = 0

    def views(self, buffers: Sequence[Tensor]) -> list[Tensor]:
        """Per-tensor (flat) views into ``buffers`` (this layout), in packing order."""
        return [view for buffer, sizes in zip(buffers, self.sizes) for view in buffer.split(sizes)]

    def exchange(
        self, rank: int, worker: Sequence[Tensor], rates: Sequence[float], loss: float = math.nan, seq: int = -1,
    ) -> tuple[list[Tensor], int, float]:
        """Apply one request atomically; return the worker's move ``e``, the staleness and ``||x - c||^2``.

        ``worker`` are the worker's flat CPU buffers, ``rates`` one moving rate (or pull strength) per
        tensor. The worker applies ``x <- x - e``.
        """
        moves = [torch.empty_like(b) for b in self.buffers]
        with self.lock:
            staleness = self.updates - self.last_seen[rank]
            distance = sum(float((w.double() - c.double()).square().sum()) for w, c in zip(worker, self.buffers))
            move_views = self.views(moves)
            diff = torch._foreach_sub(self.views(worker), self.views(self.buffers))
            if self.rule == "elastic":
                torch._foreach_mul_(diff, list(rates))
                torch._foreach_copy_(move_views, diff)
                torch._foreach_add_(self.views(self.buffers), diff)
                self.updates += 1
            else:
                lead = rank == self.leader_rank or not loss > self.leader_loss  # NaN losses never lead
                if math.isnan(loss) and self.leader_rank < 0:
                    for move in moves:  # no leader yet and nothing to report: no move
                        move.zero_()
                elif lead and not math.isnan(loss):
                    for center, w in zip(self.buffers, worker):
                        center.copy_(w)
                    self.leader_rank, self.leader_loss = rank, loss
                    self.updates += 1
                    for move in moves:
                        move.zero_()
                else:
                    torch._foreach_mul_(diff, list(rates))
                    torch._foreach_copy_(move_views, diff)
            self.last_seen[rank] = self.updates
            self.served[rank] += 1
            if self.record:
                self.history.append((rank, seq))
        return moves, staleness, distance

    def snapshot(self) -> list[Tensor]:
        """A consistent copy of the point."""
        with self.lock:
            return [b.clone() for b in self.buffers]

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "rule": self.rule, "buffers": [b.clone() for b in self.buffers], "updates": self.updates,
                "served": list(self.served), "last_seen": list(self.last_seen), "leader_rank": self.leader_rank,
                "leader_loss": self.leader_loss,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.lock:
            if state["rule"] != self.rule:
                raise ValueError(f"the checkpoint's center follows rule {state['rule']!r}, this run {self.rule!r}")
            shapes = [tuple(b.shape) for b in state["buffers"]]
            if shapes != [tuple(b.shape) for b in self.buffers]:
                raise ValueError(f"the checkpoint's center has buffers {shapes}, the model needs "
                                 f"{[tuple(b.shape) for b in self.buffers]}")
            for b, saved in zip(self.buffers, state["buffers"]):
                b.copy_(saved)
            self.updates = int(state["updates"])
            if len(state["served"]) == self.world_size:
                self.served = list(state["served"])
                self.last_seen = list(state["last_seen"])
            self.leader_rank = int(state["leader_rank"])
            self.leader_loss = float(state["leader_loss"])


class Liveness:
    """Heartbeats in the process group's store; names the first rank that died or failed.

    Args:
        store: A store shared by all ranks (a ``PrefixStore`` unique to this run).
        rank: This rank.
        world_size: Number of ranks.
        timeout: Seconds without a heartbeat after which a rank counts as dead.
        period: Seconds between heartbeats.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float, period: float = 0.5) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout, self.period = timeout, period
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"optsurvey-liveness-{rank}", daemon=True)
        self._seen: dict[int, tuple[int, float]] = {}

    def start(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)
        self._thread.start()

    def fail(self, message: str) -> None:
        """Record that this rank failed, so the others stop with ``message``."""
        try:
            if not self.store.check(["error"]):
                self.store.set("error", f"rank {self.rank}: {message}")
        except Exception:
            pass

    def finish(self) -> None:
        """This rank ends cleanly: stop beating and tell the others not to wait for its heartbeat."""
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:
            pass
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10 * self.period + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.store.add(f"hb/{self.rank}", 1)
                if self.store.check(["error"]):
                    self.error = self.store.get("error").decode()
                    return
                now = time.monotonic()
                for peer in range(self.world_size):
                    if peer == self.rank or self.store.check([f"done/{peer}"]):
                        continue
                    beats = self.store.add(f"hb/{peer}", 0)
                    last = self._seen.get(peer)
                    if last is None or beats != last[0]:
                        self._seen[peer] = (beats, now)
                    elif now - last[1] > self.timeout:
                        self.error = (f"rank {peer} stopped: no heartbeat for {now - last[1]:.0f} s "
                                      f"(the process was killed or hangs)")
                        self.fail(self.error)
                        return
            except Exception as err:
                if not self._stop.is_set():
                    self.error = f"lost the process group's store ({type(err).__name__}: {err}); rank 0 stopped"
                return


class CenterServer:
    """Serves :class:`CenterState` exchanges to the other ranks from a thread on rank 0.

    Args:
        state: The center.
        group: A gloo process group of all ranks, used by nothing else.
        num_rates: Number of tensors (length of the moving-rate part of the header).
        liveness: Failure detector; a detected failure is answered to the next request with an abort.
    """

    def __init__(self, state: CenterState, group: dist.ProcessGroup, num_rates: int, liveness: Liveness | None):
        self.state, self.group, self.num_rates, self.liveness = state, group, num_rates, liveness
        self.error: BaseException | None = None
        self.stopped = 0
        self._thread = threading.Thread(target=self._serve, name="optsurvey-center-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every worker has sent its stop request; ``False`` if still running after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        header = torch.empty(3 + self.num_rates, dtype=torch.float64)
        workers = self.state.world_size - 1
        try:
            while self.stopped < workers:
                src = dist.recv(header, src=None, group=self.group, tag=TAG_REQUEST)
                kind, seq, loss = header[0].item(), int(header[1].item()), header[2].item()
                if kind == KIND_STOP:
                    self.stopped += 1
                    continue
                body = [torch.empty_like(b) for b in self.state.buffers]
                for b, buffer in enumerate(body):
                    dist.recv(buffer, src=src, group=self.group, tag=TAG_BODY + b)
                reply = torch.zeros(REPLY_FIELDS, dtype=torch.float64)
                if self.liveness is not None and self.liveness.error is not None:
                    reply[0] = STATUS_ABORT
                    moves = [torch.zeros_like(b) for b in body]
                else:
                    moves, staleness, distance = self.state.exchange(src, body, header[3:].tolist(), loss, seq)
                    reply[1], reply[2], reply[3] = staleness, distance, self.state.updates
                dist.send(reply, dst=src, group=self.group, tag=TAG_REPLY)
                for b, move in enumerate(moves):
                    dist.send(move, dst=src, group=self.group, tag=TAG_MOVE + b)
                self.state.reply_bytes += reply.nbytes + sum(m.nbytes for m in moves)
        except BaseException as err:
            self.error = err


class CenterClient:
    """A worker's side of the exchange with the center on rank 0 (ranks other than 0).

    :meth:`post` sends a request and posts the receives of the reply without waiting; :meth:`wait`
    returns ``(moves, staleness, distance)``.
    """

    def __init__(self, group: dist.ProcessGroup, sizes_like: Sequence[Tensor], num_rates: int) -> None:
        self.group = group
        self.send_buffers = [torch.empty_like(b, device="cpu") for b in sizes_like]
        self.moves = [torch.empty_like(b) for b in self.send_buffers]
        self.header = torch.empty(3 + num_rates, dtype=torch.float64)
        self.reply = torch.empty(REPLY_FIELDS, dtype=torch.float64)
        self._works: list[Any] = []
        self.seq = 0

    @property
    def request_bytes(self) -> int:
        return self.header.nbytes + sum(b.nbytes for b in self.send_buffers)

    def post(self, buffers: Sequence[Tensor], rates: Sequence[float], loss: float = math.nan) -> None:
        for staged, buffer in zip(self.send_buffers, buffers):
            staged.copy_(buffer.detach())
        self.header[0], self.header[1], self.header[2] = KIND_EXCHANGE, self.seq, loss
        self.header[3:] = torch.tensor(list(rates), dtype=torch.float64)
        self.seq += 1
        works = [dist.isend(self.header, dst=0, group=self.group, tag=TAG_REQUEST)]
        works += [dist.isend(b, dst=0, group=self.group, tag=TAG_BODY + i) for i, b in enumerate(self.send_buffers)]
        works.append(dist.irecv(self.reply, src=0, group=self.group, tag=TAG_REPLY))
        works += [dist.irecv(m, src=0, group=self.group, tag=TAG_MOVE + i) for i, m in enumerate(self.moves)]
        self._works = works

    @property
    def pending(self) -> bool:
        return bool(self._works)

    def wait(self) -> tuple[list[Tensor], int, float]:
        for work in self._works:
            work.wait()
        self._works = []
        if self.reply[0].item() == STATUS_ABORT:
            raise RuntimeError("the center on rank 0 refused the exchange: another rank failed")
        return self.moves, int(self.reply[1].item()), float(self.reply[2].item())

    def stop(self) -> None:
        self.header.zero_()
        self.header[0] = KIND_STOP
        dist.send(self.header, dst=0, group=self.group, tag=TAG_REQUEST)


def new_center_group(timeout: timedelta) -> dist.ProcessGroup:
    """A gloo group of all ranks for the center's traffic (a collective call)."""
    return dist.new_group(backend="gloo", timeout=timeout)
