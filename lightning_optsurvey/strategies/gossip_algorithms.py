r"""Gossip algorithms for heterogeneous data and compressed links: D², gradient tracking, CHOCO-SGD.

Each class runs inside :class:`~lightning_optsurvey.strategies.GossipStrategy` (``algorithm="d2"``,
``"gradient_tracking"``, ``"choco"``) on rank ``i`` with the strategy's static topology ``W`` (row ``i``:
this rank's weights), one neighbour exchange per optimizer step and :attr:`comm` counting the bytes.
The local optimizer is the user's: with :math:`\Delta_i^t` its update (``-lr g`` for SGD),

- **D²** (Tang et al. 2018, Alg. 1): :math:`x^{t+1} = W(2x^t - x^{t-1} + \Delta^t - \Delta^{t-1})`, with
  :math:`x^1 = W(x^0 + \Delta^0)`. Rank ``i`` sends :math:`h^t + x^t - h^{t-1}` (:math:`h = x + \Delta`,
  the post-step model): one model per neighbour, as D-PSGD. The average follows SGD on the average
  gradient, and the fixed points are exact (no heterogeneity bias). The iteration is stable only if
  every eigenvalue :math:`\lambda \neq 1` of ``W`` gives roots of :math:`z^2 - 2\lambda z + \lambda` inside the unit
  disk (:math:`\lambda_{\min} > -1/3` for symmetric ``W``); where ``W`` fails this (the ring on an
  even number of ranks has :math:`\lambda_{\min} = -1/3` exactly), the lazy matrix :math:`(I + W)/2`
  is used (exact diffusion's choice, Yuan et al. 2019), and ``gossip_d2_mixing`` says which.
- **Gradient tracking** (DIGing, Nedić, Olshevsky & Shi 2017, eq. (3)):
  :math:`x^{t+1} = W x^t + \Delta^t(y^t)`, :math:`y^{t+1} = W y^t + g^{t+1} - g^t`, :math:`y^0 = g^0`:
  the optimizer steps on the tracker :math:`y` (written into ``.grad`` after the backward, before
  gradient clipping), which tracks the average gradient. Rank ``i`` sends :math:`x^t` and
  :math:`y^t` in one message: two models per neighbour (``y`` covers parameters, ``x`` also float buffers).
- **CHOCO-SGD** (Koloskova et al. 2019, Alg. 2, memory-efficient form): after the local step
  :math:`h = x + \Delta`, rank ``i`` sends :math:`q_i = C(h_i - \hat x_i)` (a
  :class:`~lightning_optsurvey.averaging.compression.Compressor` payload), updates its public copy
  :math:`\hat x_i \mathrel{+}= q_i` and :math:`s_i \mathrel{+}= \sum_j W_{ij} q_j` (self included),
  then :math:`x_i = h_i + \gamma (s_i - \hat x_i)` with ``consensus_lr`` :math:`\gamma`. The replicas
  :math:`\hat x` carry the compression error forward (error feedback), so nothing sent is lost. They
  start at the initial model, :math:`\hat x_i^0 = x^0` (the paper's :math:`\hat x^0 = 0` on the shifted
  iterates :math:`x - x^0`: the same algorithm, without first sending the model through the compressor).

Float buffers (BatchNorm statistics) are not iterates of an optimization: under D² and gradient
tracking they are averaged as D-PSGD does (:math:`W h`, a convex combination, so running variances stay
positive), in the same message; under CHOCO they are compressed with the parameters.

The per-rank states (:math:`h^{t-1}`; :math:`Wy`, :math:`g^{t-1}`;
:math:`\hat x`, :math:`s`, the compressor's generator) are in each rank's checkpoint, so a resumed run
continues exactly.

Why our own: BlueFog has exact diffusion and gradient tracking only as convex examples on its own MPI
engine (torch 1.4); CHOCO-SGD exists only as research code (epfml/ChocoSGD).

References:
    Tang, Lian, Yan, Zhang & Liu, "D²: Decentralized Training over Decentralized Data", ICML 2018,
    arXiv:1803.07068. Nedić, Olshevsky & Shi, "Achieving Geometric Convergence for Distributed
    Optimization over Time-Varying Graphs", SIAM J. Optim. 2017, arXiv:1607.03218. Koloskova, Stich &
    Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with Compressed Communication",
    ICML 2019, arXiv:1902.00340. Yuan, Ying, Zhao & Sayed, "Exact Diffusion for Distributed
    Optimization and Learning", IEEE TSP 2019, arXiv:1702.05122.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_optsurvey.averaging.compression import Compressor
from lightning_optsurvey.strategies._comm import FlatBuffers, neighbour_exchange

if TYPE_CHECKING:
    from lightning_optsurvey.strategies.gossip import GossipStrategy

__all__ = ["ChocoGossip", "D2Gossip", "GossipAlgorithm", "GradientTrackingGossip", "d2_is_stable"]


def _cpu(buffers: list[Tensor] | None) -> list[Tensor] | None:
    return None if buffers is None else [b.detach().to("cpu", copy=True) for b in buffers]


def _to(buffers: list[Tensor] | None, like: list[Tensor]) -> list[Tensor] | None:
    return None if buffers is None else [b.to(device=t.device, dtype=t.dtype).clone() for b, t in zip(buffers, like)]


def d2_is_stable(matrix: Tensor, tol: float = 1e-9) -> bool:
    r"""Whether D² with mixing matrix ``matrix`` is stable.

    Stable: for every eigenvalue :math:`\lambda \ne 1`, both roots of :math:`z^2 - 2\lambda z + \lambda = 0`
    have modulus below ``1 - tol``.
    """
    eigenvalues = torch.linalg.eigvals(matrix.to(torch.float64))
    others = eigenvalues[(eigenvalues - 1).abs() > 1e-12]
    if others.numel() == 0:
        return True
    disc = torch.sqrt(others * others - others)
    moduli = torch.maximum((others + disc).abs(), (others - disc).abs())
    return bool(moduli.max() < 1 - tol)


class GossipAlgorithm:
    """The per-rank state and communication of one gossip algorithm inside a :class:`GossipStrategy`."""

    name = ""

    def __init__(self, strategy: GossipStrategy) -> None:
        self.strategy = strategy
        self._loaded: dict[str, Any] | None = None

    # The strategy's pieces -----------------------------------------------------------------------
    @property
    def flat(self) -> FlatBuffers:
        assert self.strategy._flat is not None
        return self.strategy._flat

    def buffer_tails(self, buffers: list[Tensor]) -> list[Tensor]:
        """The float-buffer part of each flat buffer (they come after the parameters in every layout)."""
        tensors = self.strategy.synced_tensors()
        num_params = len(tensors) - len(self.strategy._float_buffers())
        tails = []
        for b, buffer in enumerate(buffers):
            offset = sum(self.flat.tensors[i].numel() for i in self.flat.indices[b] if i < num_params)
            tails.append(buffer[offset:])
        return tails

    def row(self) -> tuple[float, list[float]]:
        """This rank's self weight and its senders' weights (the strategy's ``W``)."""
        return self.strategy._row(self.strategy._syncs)

    def exchange(self, send: list[Tensor], recv: list[list[Tensor]] | None) -> list[list[Tensor]]:
        topology = self.strategy.topology
        assert topology is not None
        send_to, recv_from = topology.peers(self.strategy.global_rank, self.strategy._syncs)
        return neighbour_exchange(send, send_to, recv_from, recv=recv, counter=self.strategy.comm).wait()

    @staticmethod
    def combine_(own: list[Tensor], received: list[list[Tensor]], row: tuple[float, list[float]]) -> None:
        self_weight, peer_weights = row
        for b, buffer in enumerate(own):
            buffer.mul_(self_weight)
            for k, weight in enumerate(peer_weights):
                buffer.add_(received[k][b], alpha=weight)

    # Hooks (the strategy calls them) ---------------------------------------------------------------
    def setup(self) -> None:
        """Allocate the state on the model's device (from a loaded checkpoint if there is one)."""

    def before_step(self) -> None:
        """Before the optimizer step (the parameters are :math:`x^t`)."""

    def after_backward(self) -> None:
        """After each closure evaluation (``.grad`` holds the local gradient)."""

    def synchronize(self) -> None:
        """After the optimizer step, under ``no_grad``: communicate and set :math:`x^{t+1}`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loaded = dict(state)

    def logged_params(self) -> dict[str, Any]:
        return {}


class D2Gossip(GossipAlgorithm):
    """D² (exact diffusion form): sends :math:`h^t + x^t - h^{t-1}`, mixes it with ``W`` or :math:`(I+W)/2`."""

    name = "d2"

    def __init__(self, strategy: GossipStrategy) -> None:
        super().__init__(strategy)
        self.lazy = False
        self._pre: list[Tensor] = []
        self._prev_half: list[Tensor] | None = None
        self._send: list[Tensor] = []
        self._recv: list[list[Tensor]] | None = None

    def setup(self) -> None:
        topology = self.strategy.topology
        assert topology is not None
        matrix = topology.mixing_matrix(0)
        self.lazy = not d2_is_stable(matrix)
        if self.lazy and not d2_is_stable((matrix + torch.eye(matrix.shape[0], dtype=matrix.dtype)) / 2):
            raise ValueError(f"D² is unstable on {topology!r} even with the lazy matrix (I + W)/2")
        self._pre = self.flat.like()
        self._send = self.flat.like()
        loaded = self._loaded or {}
        self._prev_half = _to(loaded.get("prev_half"), self._pre)
        self._loaded = None

    def row(self) -> tuple[float, list[float]]:
        self_weight, peers = super().row()
        return ((1 + self_weight) / 2, [w / 2 for w in peers]) if self.lazy else (self_weight, peers)

    def before_step(self) -> None:
        self.flat.pack(self._pre)
        if self._prev_half is None:  # x^1 = W(x^0 + Delta^0): h^{-1} = x^0
            self._prev_half = [p.clone() for p in self._pre]

    def synchronize(self) -> None:
        assert self._prev_half is not None
        half = self.flat.pack()
        for send, h, x, prev in zip(self._send, half, self._pre, self._prev_half):
            torch.sub(h, prev, out=send).add_(x)
            prev.copy_(h)
        for send, h in zip(self.buffer_tails(self._send), self.buffer_tails(half)):
            send.copy_(h)  # float buffers: plain gossip of the post-step values
        received = self.exchange(self._send, self._recv)
        self._recv = received
        self.combine_(self._send, received, self.row())
        self.flat.unpack(self._send)

    def state_dict(self) -> dict[str, Any]:
        return {"prev_half": _cpu(self._prev_half)}

    def logged_params(self) -> dict[str, Any]:
        return {"gossip_d2_mixing": "(I+W)/2" if self.lazy else "W"}


class GradientTrackingGossip(GossipAlgorithm):
    """DIGing: the optimizer steps on the tracker ``y``; ``x`` and ``y`` travel in one message."""

    name = "gradient_tracking"

    def __init__(self, strategy: GossipStrategy) -> None:
        super().__init__(strategy)
        self._params: list[Tensor] = []
        self._grads: FlatBuffers | None = None
        self._pre: list[Tensor] = []
        self._y: list[Tensor] = []
        self._g: list[Tensor] = []
        self._wy: list[Tensor] = []
        self._g_prev: list[Tensor] = []
        self._recv: list[list[Tensor]] | None = None

    def setup(self) -> None:
        tensors = self.strategy.synced_tensors()
        self._params = tensors[: len(tensors) - len(self.strategy._float_buffers())]
        self._grads = FlatBuffers(self._params)
        self._pre = self.flat.like()
        self._y = [torch.zeros_like(b) for b in self._grads.buffers]
        self._g = [torch.zeros_like(b) for b in self._grads.buffers]
        loaded = self._loaded or {}
        zeros = [torch.zeros_like(b) for b in self._grads.buffers]
        self._wy = _to(loaded.get("wy"), zeros) or zeros
        self._g_prev = _to(loaded.get("g_prev"), zeros) or [z.clone() for z in zeros]
        self._loaded = None

    def after_backward(self) -> None:
        assert self._grads is not None
        for b, (g, y, wy, g_prev) in enumerate(zip(self._g, self._y, self._wy, self._g_prev)):
            params = [self._params[i] for i in self._grads.indices[b]]
            views = self._grads.views_of(g, b)
            for param, view in zip(params, views):
                if param.grad is None:
                    view.zero_()
                else:
                    view.copy_(param.grad.detach())
            torch.sub(g, g_prev, out=y).add_(wy)  # y^t = W y^{t-1} + g^t - g^{t-1}
            for param, view in zip(params, self._grads.views_of(y, b)):
                if not param.requires_grad:
                    continue  # frozen: its tracker stays zero, and a zero .grad would let weight decay move it
                if param.grad is None:
                    param.grad = view.detach().clone()
                else:
                    param.grad.copy_(view)

    def before_step(self) -> None:
        self.flat.pack(self._pre)

    def synchronize(self) -> None:
        delta = self.flat.pack()
        for x, h in zip(self.buffer_tails(self._pre), self.buffer_tails(delta)):
            x.copy_(h)  # float buffers: W h (plain gossip of the post-step values), with a zero step below
        for post, x in zip(delta, self._pre):
            post.sub_(x)
        nx = len(self._pre)
        payload = [*self._pre, *self._y]
        received = self.exchange(payload, self._recv)
        self._recv = received
        row = self.row()
        self.combine_(payload, received, row)  # W x^t and W y^t, in place
        for x, step in zip(self._pre, delta):
            x.add_(step)
        self.flat.unpack(self._pre)
        for wy, y in zip(self._wy, payload[nx:]):
            wy.copy_(y)
        for g_prev, g in zip(self._g_prev, self._g):
            g_prev.copy_(g)

    def state_dict(self) -> dict[str, Any]:
        return {"wy": _cpu(self._wy), "g_prev": _cpu(self._g_prev)}


class ChocoGossip(GossipAlgorithm):
    """CHOCO-SGD: compressed differences to public replicas, consensus step ``consensus_lr``."""

    name = "choco"

    def __init__(self, strategy: GossipStrategy, compressor: Compressor, consensus_lr: float, seed: int) -> None:
        super().__init__(strategy)
        self.compressor = compressor
        self.consensus_lr = consensus_lr
        self.seed = seed
        self._hat: list[Tensor] = []
        self._s: list[Tensor] = []
        self._recv: list[list[Tensor]] | None = None
        self._generators: list[torch.Generator] = []

    def setup(self) -> None:
        buffers = self.flat.buffers
        loaded = self._loaded or {}
        if "hat" in loaded:
            self._hat = _to(loaded["hat"], buffers)
            self._s = _to(loaded["s"], buffers)
        else:
            self._hat, self._s = self._initial_replicas()
        rank = self.strategy.global_rank
        self._generators = []
        for b, buffer in enumerate(buffers):
            generator = torch.Generator(device=buffer.device)
            generator.manual_seed(self.seed + 1_000_003 * rank + 7_919 * b)
            self._generators.append(generator)
        for generator, state in zip(self._generators, loaded.get("generators", [])):
            generator.set_state(state)
        self._loaded = None

    def _initial_replicas(self) -> tuple[list[Tensor], list[Tensor]]:
        r"""Replicas :math:`\hat x_i^0 = x_i^0` and :math:`s_i^0 = \sum_j W_{ij} \hat x_j^0`.

        The paper starts from :math:`\hat x^0 = 0`; CHOCO is translation-invariant (a common shift of every
        :math:`x_i` and :math:`\hat x_i` commutes with its step), so starting the replicas at the common
        :math:`x^0` is the same algorithm on :math:`x - x^0`, and spares the first rounds from sending the
        model itself through the compressor (top-1 % needs 100 rounds for one model's worth of coordinates).
        When the ranks start from different models (a later fit, without CHOCO state in the checkpoint),
        one uncompressed exchange (counted in ``comm``) gives every rank its neighbours' replicas.
        """
        own = [b.clone() for b in self.flat.pack()]
        hat = [b.clone() for b in own]
        if not self.strategy._models_in_sync:
            self.combine_(own, self.exchange(hat, None), self.row())
        return hat, own

    def synchronize(self) -> None:
        half = self.flat.pack()
        payload: list[Tensor] = []
        counts: list[int] = []
        for h, hat, generator in zip(half, self._hat, self._generators):
            parts = self.compressor.compress(h - hat, generator)
            payload.extend(parts)
            counts.append(len(parts))
        received = self.exchange(payload, self._recv)
        self._recv = received
        self_weight, peer_weights = self.row()
        start = 0
        for b, (h, hat, s) in enumerate(zip(half, self._hat, self._s)):
            stop = start + counts[b]
            q = self.compressor.decompress(payload[start:stop], h.numel(), h.dtype)
            hat.add_(q)
            s.add_(q, alpha=self_weight)
            for k, weight in enumerate(peer_weights):
                s.add_(self.compressor.decompress(received[k][start:stop], h.numel(), h.dtype), alpha=weight)
            h.add_(s - hat, alpha=self.consensus_lr)
            start = stop
        self.flat.unpack(half)

    def state_dict(self) -> dict[str, Any]:
        return {"hat": _cpu(self._hat), "s": _cpu(self._s), "generators": [g.get_state() for g in self._generators]}

    def logged_params(self) -> dict[str, Any]:
        return {"gossip_compressor": repr(self.compressor), "gossip_consensus_lr": self.consensus_lr}
