"""Communication graphs for decentralized training: peers, mixing matrices and spectral gaps.

A :class:`Topology` says, for every gossip round ``t``, which ranks each rank sends to and receives
from, and with which weights it combines what it receives: ``x_i <- sum_j W_ij x_j``. Row ``i`` of
``W`` holds the weights rank ``i`` applies, so ``W_ij > 0`` (``j != i``) exactly when ``j`` sends to
``i``. The matrices are built in float64 on the CPU; they are tiny (``world_size x world_size``) and
every rank builds the same ones, so no communication is needed to agree on them.

Kinds:

- ``"ring"``: undirected cycle (one edge for two ranks).
- ``"torus"``: undirected 2-D torus on the most square ``rows x cols`` factorization, both >= 2.
- ``"exponential"``: static directed graph, rank ``i`` sends to ``i + 2^k (mod N)`` for
  ``k = 0 .. ceil(log2 N) - 1`` (Assran et al., 2019; Ying et al., 2021).
- ``"one_peer_exponential"``: time-varying, at round ``t`` rank ``i`` sends only to
  ``i + 2^(t mod ceil(log2 N))``. For ``N`` a power of two the product of one period of these matrices
  is exactly ``11^T / N``, so pure gossip reaches the exact average in ``log2 N`` rounds.
- ``"complete"``: every rank talks to every other one; ``W = 11^T / N``.
- ``"erdos_renyi"``: undirected ``G(N, p)``, redrawn from a seeded ``torch.Generator`` until connected.

Weights: undirected graphs use Metropolis-Hastings weights ``W_ij = 1 / (1 + max(d_i, d_j))``, which
are uniform ``1 / (d + 1)`` on regular graphs; the directed graphs here are circulant with in-degree
equal to out-degree, and use uniform weights ``1 / (1 + d_in)``. Both are doubly stochastic.
:meth:`Topology.push_sum_matrix` gives the column-stochastic weights ``P_ij = 1 / (1 + d_out(j))`` that
push-sum needs (each sender splits its mass evenly), which differ from ``W`` on irregular graphs.

Why our own: networkx has graphs but no per-round peer lists, time-varying schedules or push-sum
weights, and BlueFog's topology utilities come with its MPI engine.

References:
    Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS 2017,
    arXiv:1705.09056. Assran et al., "Stochastic Gradient Push for Distributed Deep Learning",
    ICML 2019, arXiv:1811.10792. Ying et al., "Exponential Graph is Provably Efficient for
    Decentralized Deep Training", NeurIPS 2021, arXiv:2110.13363. Xiao & Boyd, "Fast linear
    iterations for distributed averaging", 2004 (Metropolis-Hastings weights).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TOPOLOGY_KINDS", "Topology"]

TOPOLOGY_KINDS: tuple[str, ...] = (
    "ring",
    "torus",
    "exponential",
    "one_peer_exponential",
    "complete",
    "erdos_renyi",
)
_DIRECTED = frozenset({"exponential", "one_peer_exponential"})
_MAX_ER_DRAWS = 1000


def _num_hops(world_size: int) -> int:
    """``ceil(log2 N)``: the number of distances ``2^k < N`` (0 for a single rank)."""
    return (world_size - 1).bit_length() if world_size > 1 else 0


def _torus_shape(world_size: int) -> tuple[int, int] | None:
    rows = max((r for r in range(2, math.isqrt(world_size) + 1) if world_size % r == 0), default=None)
    return None if rows is None else (rows, world_size // rows)


class Topology:
    """A (possibly time-varying) communication graph over ``world_size`` ranks.

    Args:
        kind: One of ``"ring"``, ``"torus"``, ``"exponential"``, ``"one_peer_exponential"``,
            ``"complete"``, ``"erdos_renyi"``.
        world_size: Number of ranks ``N >= 1``.
        seed: Seed of the Erdos-Renyi draw (ignored by the deterministic kinds).
        p: Edge probability of ``"erdos_renyi"`` in ``(0, 1]``; defaults to
            ``min(1, 2 ln N / N)``, twice the connectivity threshold. Only that kind takes it.

    Raises:
        ValueError: For an unknown kind, a world size below 1, a torus on a world size that does not
            factor as ``rows x cols`` with both at least 2 (a prime, or fewer than 4 ranks), ``p``
            outside ``(0, 1]`` or given to another kind, or an Erdos-Renyi ``p`` too small to draw a
            connected graph.
        TypeError: If ``world_size`` or ``seed`` is not an integer.

    Example:
        >>> topo = Topology("ring", 8)
        >>> topo.peers(0)
        ([1, 7], [1, 7])
        >>> round(topo.spectral_gap(), 4)
        0.1953
    """

    def __init__(self, kind: str, world_size: int, *, seed: int = 0, p: float | None = None) -> None:
        if kind not in TOPOLOGY_KINDS:
            raise ValueError(f"unknown topology kind {kind!r}; known kinds: {', '.join(TOPOLOGY_KINDS)}")
        if isinstance(world_size, bool) or not isinstance(world_size, int):
            raise TypeError(f"world_size must be an integer, got {world_size!r}")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if p is not None and kind != "erdos_renyi":
            raise ValueError(f"p is the edge probability of 'erdos_renyi'; topology {kind!r} does not take p")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"p must be a probability in (0, 1], got {p!r}")
        if kind == "torus" and _torus_shape(world_size) is None:
            raise ValueError(
                f"a 'torus' needs a world size that factors as rows x cols with both >= 2, got {world_size}"
                + (" (a prime)" if world_size > 3 else "")
            )
        self.kind = kind
        self.world_size = world_size
        self.seed = seed
        if kind == "erdos_renyi" and p is None:
            p = min(1.0, 2.0 * math.log(world_size) / world_size) if world_size > 1 else 1.0
        self.p = None if p is None else float(p)
        # Static graphs: computed once. ``_out[i]`` lists the ranks that ``i`` sends to.
        self._static_out: list[list[int]] | None = None
        if kind != "one_peer_exponential":
            self._static_out = self._build_static()

    # ----------------------------------------------------------------------------------------------
    # Graph structure
    # ----------------------------------------------------------------------------------------------
    @property
    def is_directed(self) -> bool:
        """Whether sends and receives differ (exponential graphs)."""
        return self.kind in _DIRECTED

    @property
    def is_time_varying(self) -> bool:
        """Whether the peers change from round to round."""
        return self.kind == "one_peer_exponential"

    @property
    def period(self) -> int:
        """Rounds after which the schedule repeats (1 for static graphs)."""
        return max(1, _num_hops(self.world_size)) if self.is_time_varying else 1

    def _build_static(self) -> list[list[int]]:
        n = self.world_size
        if self.kind == "exponential":
            return [sorted({(i + 2**k) % n for k in range(_num_hops(n))}) for i in range(n)]
        if self.kind == "complete":
            return [[j for j in range(n) if j != i] for i in range(n)]
        if self.kind == "ring":
            return [sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)]
        if self.kind == "torus":
            shape = _torus_shape(n)
            assert shape is not None  # checked in __init__
            rows, cols = shape

            def torus_neighbours(i: int) -> list[int]:
                r, c = divmod(i, cols)
                steps = ((1, 0), (-1, 0), (0, 1), (0, -1))
                near = {((r + dr) % rows) * cols + (c + dc) % cols for dr, dc in steps}
                return sorted(near - {i})

            return [torus_neighbours(i) for i in range(n)]
        return self._draw_erdos_renyi()

    def _draw_erdos_renyi(self) -> list[list[int]]:
        n = self.world_size
        if n == 1:
            return [[]]
        assert self.p is not None
        generator = torch.Generator().manual_seed(self.seed)
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        for _ in range(_MAX_ER_DRAWS):
            draw = (torch.rand(n, n, generator=generator) < self.p) & upper
            adjacency = draw | draw.T
            if _is_connected(adjacency):
                return [torch.nonzero(adjacency[i]).flatten().tolist() for i in range(n)]
        raise ValueError(
            f"could not draw a connected Erdos-Renyi graph on {n} ranks with p={self.p} in {_MAX_ER_DRAWS} "
            f"draws; use a larger p (the connectivity threshold is about ln(N)/N = {math.log(n) / n:.3f})"
        )

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")

    def _out(self, step: int) -> list[list[int]]:
        """``out_neighbours`` without the copy (callers must not modify it); checks ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if self._static_out is not None:
            return self._static_out
        n = self.world_size
        if n == 1:
            return [[]]
        hop = 2 ** (step % self.period)
        return [[(i + hop) % n] for i in range(n)]

    def out_neighbours(self, step: int = 0) -> list[list[int]]:
        """For every rank, the sorted list of ranks it sends to at gossip round ``step``.

        Raises:
            ValueError: If ``step`` is not a non-negative integer.
        """
        return [list(out) for out in self._out(step)]

    def peers(self, rank: int, step: int = 0) -> tuple[list[int], list[int]]:
        """Ranks that ``rank`` sends to and receives from at gossip round ``step``.

        Every send in one rank's list is matched by a receive in the peer's list, so one
        ``batch_isend_irecv`` per round completes on every rank.

        Args:
            rank: A rank in ``[0, world_size)``.
            step: The gossip round (only time-varying graphs depend on it).

        Returns:
            ``(send_to, recv_from)``, each sorted; equal for undirected graphs.

        Raises:
            ValueError: If ``rank`` or ``step`` is out of range.
        """
        self._check_rank(rank)
        out = self._out(step)
        recv_from = sorted(j for j in range(self.world_size) if rank in out[j])
        return list(out[rank]), recv_from

    # ----------------------------------------------------------------------------------------------
    # Weights
    # ----------------------------------------------------------------------------------------------
    def _adjacency(self, step: int) -> Tensor:
        """``A[i, j] = True`` when ``j`` sends to ``i`` (``i != j``)."""
        n = self.world_size
        adjacency = torch.zeros(n, n, dtype=torch.bool)
        for j, outs in enumerate(self._out(step)):
            for i in outs:
                adjacency[i, j] = True
        return adjacency

    def mixing_matrix(self, step: int = 0) -> Tensor:
        r"""The doubly stochastic gossip matrix of round ``step``: ``x_i <- \sum_j W_{ij} x_j``.

        Undirected graphs: Metropolis-Hastings, :math:`W_{ij} = 1 / (1 + \max(d_i, d_j))` on edges and
        :math:`W_{ii} = 1 - \sum_{j \ne i} W_{ij}` (symmetric). Directed circulant graphs: uniform
        :math:`1 / (1 + d^{in}_i)` over the senders and the rank itself.

        Returns:
            A float64 ``(N, N)`` tensor on the CPU whose rows and columns each sum to one.

        Raises:
            ValueError: If ``step`` is not a non-negative integer.
        """
        adjacency = self._adjacency(step).to(torch.float64)
        if self.is_directed:
            weights = (adjacency + torch.eye(self.world_size, dtype=torch.float64))
            return weights / weights.sum(dim=1, keepdim=True)
        degree = adjacency.sum(dim=1)
        weights = adjacency / (1.0 + torch.maximum(degree[:, None], degree[None, :]))
        return weights + torch.diag(1.0 - weights.sum(dim=1))

    def push_sum_matrix(self, step: int = 0) -> Tensor:
        r"""Column-stochastic push-sum weights of round ``step``: :math:`P_{ij} = 1 / (1 + d^{out}_j)`.

        Each rank keeps a share and sends equal shares of its numerator and weight to its
        out-neighbours; only the sender's out-degree is needed, so this works on directed graphs.

        Returns:
            A float64 ``(N, N)`` tensor whose columns sum to one.

        Raises:
            ValueError: If ``step`` is not a non-negative integer.

        References:
            Kempe, Dobra & Gehrke, "Gossip-based computation of aggregate information", FOCS 2003.
            Assran et al., "Stochastic Gradient Push for Distributed Deep Learning", arXiv:1811.10792.
        """
        weights = self._adjacency(step).to(torch.float64) + torch.eye(self.world_size, dtype=torch.float64)
        return weights / weights.sum(dim=0, keepdim=True)

    def spectral_gap(self) -> float:
        r"""``1 - |lambda_2|``, with :math:`|\lambda_2|` the second largest eigenvalue modulus.

        For a doubly stochastic ``W``, :math:`|\lambda_2(W)| = \rho(W - 11^T/N)`. For a time-varying
        graph the matrix is the product over one period, :math:`W^{(T-1)} \cdots W^{(0)}`, so the gap
        is per period, not per round. A larger gap mixes faster; 1 means one round (period) averages
        exactly.
        """
        n = self.world_size
        product = torch.eye(n, dtype=torch.float64)
        for step in range(self.period):
            product = self.mixing_matrix(step) @ product
        deviation = product - torch.full((n, n), 1.0 / n, dtype=torch.float64)
        if torch.equal(deviation, deviation.T):
            modulus = torch.linalg.eigvalsh(deviation).abs().max()
        else:
            modulus = torch.linalg.eigvals(deviation).abs().max()
        return float(1.0 - modulus)

    def bytes_per_round(self, model_bytes: int, rank: int = 0, step: int = 0) -> int:
        """Bytes ``rank`` sends in one round when each message is a whole model of ``model_bytes``.

        Raises:
            ValueError: If ``rank`` or ``step`` is out of range.
        """
        self._check_rank(rank)
        return model_bytes * len(self._out(step)[rank])

    def __repr__(self) -> str:
        extra = f", seed={self.seed}, p={self.p}" if self.kind == "erdos_renyi" else ""
        return f"Topology({self.kind!r}, {self.world_size}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self._key() == other._key()

    def _key(self) -> tuple:
        return (self.kind, self.world_size, self.seed, self.p)

    def __hash__(self) -> int:
        return hash(self._key())


def _is_connected(adjacency: Tensor) -> bool:
    n = adjacency.shape[0]
    seen = torch.zeros(n, dtype=torch.bool)
    seen[0] = True
    frontier = seen.clone()
    while frontier.any():
        reached = adjacency[frontier].any(dim=0) & ~seen
        seen |= reached
        frontier = reached
    return bool(seen.all())
