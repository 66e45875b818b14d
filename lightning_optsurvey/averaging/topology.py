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

Your own graph: :meth:`Topology.from_neighbours` takes a function ``neighbours(rank, step)`` (the ranks
``rank`` sends to at round ``step``, ``period`` rounds before the schedule repeats) or one list per rank,
and weights it as above; :meth:`Topology.from_matrix` takes the weights themselves, one ``N x N`` matrix or
one per round, checked: non-negative, finite, columns summing to one (push-sum), and rows too for
D-PSGD's doubly stochastic mixing (a matrix that is only column stochastic serves ``algorithm="push_sum"``
and is refused, naming the rows, by :meth:`Topology.mixing_matrix`). The built-in kinds are the
constructors :meth:`Topology.ring`, :meth:`~Topology.torus`, :meth:`~Topology.exponential`,
:meth:`~Topology.one_peer_exponential`, :meth:`~Topology.complete` and :meth:`~Topology.erdos_renyi`
(or ``Topology(kind, world_size)``).

This module imports only ``torch`` (and the package's validation rule): the theory checks use it
without Lightning; :mod:`lightning_optsurvey.strategies` re-exports it.

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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_optsurvey.validation import (
    check_callable,
    check_choice,
    check_int,
    check_probability,
    check_type,
    describe,
)

__all__ = ["STOCHASTIC_ATOL", "TOPOLOGY_KINDS", "Topology"]

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
#: Tolerance on the row and column sums of a user's matrix (float64; a float32 matrix of thirds misses it:
#: build the weights in float64).
STOCHASTIC_ATOL = 1e-9

Schedule = tuple[tuple[tuple[int, ...], ...], ...]
"""``schedule[t][i]``: the ranks that ``i`` sends to at round ``t`` of one period."""


def _num_hops(world_size: int) -> int:
    """``ceil(log2 N)``: the number of distances ``2^k < N`` (0 for a single rank)."""
    return (world_size - 1).bit_length() if world_size > 1 else 0


def _torus_shape(world_size: int) -> tuple[int, int] | None:
    rows = max((r for r in range(2, math.isqrt(world_size) + 1) if world_size % r == 0), default=None)
    return None if rows is None else (rows, world_size // rows)


def _kind_constructor(kind: str, doc: str) -> classmethod:
    """``Topology.<kind>(world_size)``: a built-in kind as a constructor."""

    def build(cls: type[Topology], world_size: int) -> Topology:
        return cls(kind, world_size)

    build.__name__ = build.__qualname__ = kind
    build.__doc__ = doc
    return classmethod(build)


class Topology:
    """A (possibly time-varying) communication graph over ``world_size`` ranks, and its gossip weights.

    Args:
        kind: One of ``"ring"``, ``"torus"``, ``"exponential"``, ``"one_peer_exponential"``,
            ``"complete"``, ``"erdos_renyi"`` (a graph of your own: :meth:`from_neighbours` or
            :meth:`from_matrix`).
        world_size: Number of ranks ``N >= 1``.
        seed: Seed of the Erdos-Renyi draw (ignored by the deterministic kinds).
        p: Edge probability of ``"erdos_renyi"`` in ``(0, 1]``; defaults to
            ``min(1, 2 ln N / N)``, twice the connectivity threshold. Only that kind takes it.

    Raises:
        ValueError: For an unknown kind, a world size below 1, a torus on a world size that does not
            factor as ``rows x cols`` with both at least 2 (a prime, or fewer than 4 ranks), ``p``
            outside ``(0, 1]`` or given to another kind, or an Erdos-Renyi ``p`` too small to draw a
            connected graph.
        TypeError: If ``kind`` is not a string, ``world_size`` or ``seed`` not an integer, or ``p`` not
            a number.

    Example:
        >>> topo = Topology("ring", 8)
        >>> topo.peers(0)
        ([1, 7], [1, 7])
        >>> round(topo.spectral_gap(), 4)
        0.1953
        >>> Topology.from_neighbours(4, lambda rank, step: [(rank + 1) % 4]).peers(0)
        ([1], [3])
    """

    def __init__(self, kind: str, world_size: int, *, seed: int = 0, p: float | None = None) -> None:
        kind = check_choice("kind", kind, TOPOLOGY_KINDS)
        world_size = check_int("world_size", world_size, low=1)
        seed = check_int("seed", seed, low=None)
        if p is not None and kind != "erdos_renyi":
            raise ValueError(f"p is the edge probability of 'erdos_renyi'; topology {kind!r} does not take p")
        if p is not None:
            check_probability("p", p, low_open=True)
        if kind == "torus" and _torus_shape(world_size) is None:
            raise ValueError(
                f"a 'torus' needs a world size that factors as rows x cols with both >= 2, got {world_size}"
                + (" (a prime)" if world_size > 3 else "")
            )
        if kind == "erdos_renyi" and p is None:
            p = min(1.0, 2.0 * math.log(world_size) / world_size) if world_size > 1 else 1.0
        self._setup("kind", kind, world_size, seed=seed, p=None if p is None else float(p))
        if kind == "one_peer_exponential":
            hops = [2**step for step in range(max(1, _num_hops(world_size)))]
            schedule = [[[(i + hop) % world_size] if world_size > 1 else [] for i in range(world_size)]
                        for hop in hops]
        else:
            schedule = [self._build_static()]
        self._schedule = _freeze(schedule)
        self._directed = kind in _DIRECTED
        self._time_varying = kind == "one_peer_exponential"

    def _setup(self, source: str, kind: str, world_size: int, *, seed: int = 0, p: float | None = None) -> None:
        self._source = source  # "kind", "neighbours" or "matrix": how the topology was built
        self.kind = kind
        self.world_size = world_size
        self.seed = seed
        self.p = p
        self._matrices: tuple[Tensor, ...] | None = None
        self._doubly: tuple[bool, ...] = ()

    # ----------------------------------------------------------------------------------------------
    # The built-in kinds as constructors, and your own graph or weights
    # ----------------------------------------------------------------------------------------------
    ring = _kind_constructor("ring", "The undirected cycle ``i - 1, i, i + 1``.")
    torus = _kind_constructor("torus", "The undirected 2-D torus on the most square ``rows x cols``, both ``>= 2``.")
    exponential = _kind_constructor("exponential", "The static directed exponential graph: ``i`` sends to ``i + 2^k``.")
    one_peer_exponential = _kind_constructor(
        "one_peer_exponential", "The time-varying one-peer graph: ``i`` sends to ``i + 2^(t mod ceil(log2 N))``."
    )
    complete = _kind_constructor("complete", "Every rank talks to every other: ``W = 11^T / N``.")

    @classmethod
    def erdos_renyi(cls, world_size: int, *, p: float | None = None, seed: int = 0) -> Topology:
        """An undirected connected ``G(N, p)`` drawn from ``seed``."""
        return cls("erdos_renyi", world_size, seed=seed, p=p)

    @classmethod
    def from_neighbours(
        cls,
        world_size: int,
        neighbours: Callable[[int, int], Iterable[int]] | Sequence[Sequence[int]],
        *,
        period: int = 1,
        name: str = "custom",
    ) -> Topology:
        """Your graph: who sends to whom at each round, weighted as the built-in graphs are.

        An undirected graph (every edge both ways at each round) gets Metropolis-Hastings weights,
        symmetric and doubly stochastic; a directed one gets uniform weights ``1 / (1 + d_in)``, which
        are doubly stochastic only when every rank's in-degrees balance (circulant graphs) and are
        refused otherwise by :meth:`mixing_matrix` (give the weights with :meth:`from_matrix`, or use
        push-sum, whose weights :meth:`push_sum_matrix` derives for any graph).

        Args:
            world_size: Number of ranks ``N >= 1``.
            neighbours: ``neighbours(rank, step)``, the ranks ``rank`` sends to at round
                ``step in [0, period)``, or one sequence of ranks per rank (a static graph).
            period: Rounds after which the schedule repeats (1: a static graph).
            name: The topology's name (``kind``), as logged by the strategies.

        Raises:
            TypeError: If ``neighbours`` is neither callable nor a sequence, or a neighbour is not an
                integer.
            ValueError: If a neighbour is out of ``[0, N)``, is the rank itself or repeats, or the
                sequence does not hold one entry per rank.

        Example:
            >>> star = Topology.from_neighbours(4, [[1, 2, 3], [0], [0], [0]], name="star")
            >>> star.mixing_matrix()[0].tolist()
            [0.25, 0.25, 0.25, 0.25]
        """
        world_size = check_int("world_size", world_size, low=1)
        period = check_int("period", period, low=1)
        check_type("name", name, str)
        if isinstance(neighbours, Sequence) and not isinstance(neighbours, str):
            if len(neighbours) != world_size:
                raise ValueError(f"neighbours must hold one sequence of ranks per rank ({world_size}), "
                                 f"got {len(neighbours)}")
            table = neighbours

            def neighbours(rank: int, step: int) -> Iterable[int]:
                return table[rank]
        else:
            check_callable("neighbours", neighbours, "neighbours(rank, step) -> ranks it sends to")
        schedule = [[_checked_peers(neighbours, rank, step, world_size) for rank in range(world_size)]
                    for step in range(period)]
        topology = cls.__new__(cls)
        topology._setup("neighbours", name, world_size)
        topology._schedule = _freeze(schedule)
        topology._directed = any(
            rank not in out[peer] for out in topology._schedule for rank in range(world_size) for peer in out[rank]
        )
        topology._time_varying = period > 1
        return topology

    @classmethod
    def from_matrix(cls, matrix: Any, *, name: str = "custom") -> Topology:
        r"""Your gossip weights: ``x_i <- \sum_j W_{ij} x_j``, with ``j`` sending to ``i`` where ``W_ij > 0``.

        Args:
            matrix: An ``N x N`` matrix (tensor, array or nested lists), or one per round for a
                time-varying schedule (a sequence of matrices or an ``(T, N, N)`` array). Each must be
                non-negative and column stochastic (every sender's weights sum to one: push-sum); D-PSGD
                (:meth:`mixing_matrix`) needs rows summing to one as well (doubly stochastic). Sums are
                checked to :data:`STOCHASTIC_ATOL` in float64.
            name: The topology's name (``kind``), as logged by the strategies.

        Raises:
            TypeError: If ``matrix`` is not numeric.
            ValueError: If a matrix is not square, differs in size from the others, has a negative or
                non-finite weight, or a column that does not sum to one.

        Example:
            >>> w = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
            >>> Topology.from_matrix(w).peers(0)  # directed: 0 sends to 1 and receives from 2
            ([1], [2])
        """
        check_type("name", name, str)
        matrices = _as_matrices(matrix)
        n = matrices.shape[1]
        doubly = []
        for t, w in enumerate(matrices):
            where = f"matrix[{t}]" if len(matrices) > 1 else "matrix"
            _check_weights(where, w)
            doubly.append(bool((w.sum(1) - 1.0).abs().max() <= STOCHASTIC_ATOL))
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        schedule = [[torch.nonzero((w[:, j] > 0) & off_diagonal[:, j]).flatten().tolist() for j in range(n)]
                    for w in matrices]
        topology = cls.__new__(cls)
        topology._setup("matrix", name, n)
        topology._schedule = _freeze(schedule)
        topology._directed = any(not torch.equal(w > 0, (w > 0).T) for w in matrices)
        topology._time_varying = len(matrices) > 1
        topology._matrices = tuple(w.clone() for w in matrices)
        topology._doubly = tuple(doubly)
        return topology

    # ----------------------------------------------------------------------------------------------
    # Graph structure
    # ----------------------------------------------------------------------------------------------
    @property
    def is_directed(self) -> bool:
        """Whether sends and receives differ (exponential graphs, a directed graph of your own)."""
        return self._directed

    @property
    def is_time_varying(self) -> bool:
        """Whether the peers change from round to round."""
        return self._time_varying

    @property
    def period(self) -> int:
        """Rounds after which the schedule repeats (1 for static graphs)."""
        return len(self._schedule)

    def _build_static(self) -> list[list[int]]:
        n = self.world_size
        if self.kind == "exponential":
            return [sorted({(i + 2**k) % n for k in range(_num_hops(n))}) for i in range(n)]
        if self.kind == "complete":
            return [[j for j in range(n) if j != i] for i in range(n)]
        if self.kind == "ring":
            return [sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)]
        if self.kind == "torus":
            rows, cols = _torus_shape(n)  # type: ignore[misc]  (checked in __init__)

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
        check_int("rank", rank, low=0, high=self.world_size - 1)

    def _round(self, step: int) -> int:
        """The round of one period that ``step`` falls on; checks ``step``."""
        return check_int("step", step, low=0) % len(self._schedule)

    def _out(self, step: int) -> tuple[tuple[int, ...], ...]:
        """``out_neighbours`` without the copy; checks ``step``."""
        return self._schedule[self._round(step)]

    def out_neighbours(self, step: int = 0) -> list[list[int]]:
        """For every rank, the sorted list of ranks it sends to at gossip round ``step``.

        Raises:
            TypeError: If ``step`` is not an integer.
            ValueError: If ``step`` is negative.
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
            TypeError: If ``rank`` or ``step`` is not an integer.
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
        :math:`W_{ii} = 1 - \sum_{j \ne i} W_{ij}` (symmetric). Directed graphs: uniform
        :math:`1 / (1 + d^{in}_i)` over the senders and the rank itself. A topology built
        :meth:`from_matrix` returns its own matrix.

        Returns:
            A float64 ``(N, N)`` tensor on the CPU whose rows and columns each sum to one.

        Raises:
            TypeError: If ``step`` is not an integer.
            ValueError: If ``step`` is negative, or the weights of this round are not doubly stochastic
                (a user's column-stochastic matrix, or a directed graph of your own whose in-degrees do not
                balance): D-PSGD would not preserve the average.
        """
        key = self._round(step)
        if self._matrices is not None:
            if not self._doubly[key]:
                sums = self._matrices[key].sum(1)
                bad = torch.nonzero((sums - 1.0).abs() > STOCHASTIC_ATOL).flatten().tolist()
                raise ValueError(
                    f"{self!r}: the matrix of round {key} is column stochastic but not doubly stochastic (rows "
                    f"{bad} sum to {[round(float(sums[i]), 6) for i in bad]}); D-PSGD's mixing needs rows and "
                    "columns summing to one; use it with algorithm='push_sum'"
                )
            return self._matrices[key].clone()
        adjacency = self._adjacency(key).to(torch.float64)
        if self.is_directed:
            weights = (adjacency + torch.eye(self.world_size, dtype=torch.float64))
            matrix = weights / weights.sum(dim=1, keepdim=True)
            columns = matrix.sum(0)
            if (columns - 1.0).abs().max() > STOCHASTIC_ATOL:
                bad = torch.nonzero((columns - 1.0).abs() > STOCHASTIC_ATOL).flatten().tolist()
                raise ValueError(
                    f"{self!r}: the uniform weights 1/(1 + in-degree) of round {key} are not doubly stochastic "
                    f"(columns {bad} sum to {[round(float(columns[j]), 6) for j in bad]}: the in-degrees do not "
                    "balance); give the weights with Topology.from_matrix, or use algorithm='push_sum'"
                )
            return matrix
        degree = adjacency.sum(dim=1)
        weights = adjacency / (1.0 + torch.maximum(degree[:, None], degree[None, :]))
        return weights + torch.diag(1.0 - weights.sum(dim=1))

    def push_sum_matrix(self, step: int = 0) -> Tensor:
        r"""Column-stochastic push-sum weights of round ``step``: :math:`P_{ij} = 1 / (1 + d^{out}_j)`.

        Each rank keeps a share and sends equal shares of its numerator and weight to its
        out-neighbours; only the sender's out-degree is needed, so this works on directed graphs. A
        topology built :meth:`from_matrix` returns its own matrix.

        Returns:
            A float64 ``(N, N)`` tensor whose columns sum to one.

        Raises:
            TypeError: If ``step`` is not an integer.
            ValueError: If ``step`` is negative.

        References:
            Kempe, Dobra & Gehrke, "Gossip-based computation of aggregate information", FOCS 2003.
            Assran et al., "Stochastic Gradient Push for Distributed Deep Learning", arXiv:1811.10792.
        """
        key = self._round(step)
        if self._matrices is not None:
            return self._matrices[key].clone()
        weights = self._adjacency(key).to(torch.float64) + torch.eye(self.world_size, dtype=torch.float64)
        return weights / weights.sum(dim=0, keepdim=True)

    def matrices(self, push_sum: bool = False) -> list[Tensor]:
        """One period of weights: :meth:`push_sum_matrix` (``push_sum``) or :meth:`mixing_matrix` of each round.

        The strategies call it when they set up, so that weights an algorithm cannot use are refused
        before training starts.

        Raises:
            ValueError: As :meth:`mixing_matrix`, for weights that are not doubly stochastic.
        """
        weights = self.push_sum_matrix if push_sum else self.mixing_matrix
        return [weights(step) for step in range(self.period)]

    def spectral_gap(self) -> float:
        r"""``1 - |lambda_2|``, with :math:`|\lambda_2|` the second largest eigenvalue modulus.

        For a doubly stochastic ``W``, :math:`|\lambda_2(W)| = \rho(W - 11^T/N)`. For a time-varying
        graph the matrix is the product over one period, :math:`W^{(T-1)} \cdots W^{(0)}`, so the gap
        is per period, not per round. A larger gap mixes faster; 1 means one round (period) averages
        exactly. Weights that are only column stochastic (a user's matrix, a directed graph of your own
        whose in-degrees do not balance): the second largest eigenvalue modulus of the product of the
        push-sum matrices.
        """
        n = self.world_size
        try:
            matrices, doubly = self.matrices(), True
        except ValueError:  # not doubly stochastic: push-sum's weights
            matrices, doubly = self.matrices(push_sum=True), False
        product = torch.eye(n, dtype=torch.float64)
        for matrix in matrices:
            product = matrix @ product
        if not doubly:
            moduli = torch.linalg.eigvals(product).abs().sort(descending=True).values
            return float(1.0 - moduli[1]) if n > 1 else 1.0
        deviation = product - torch.full((n, n), 1.0 / n, dtype=torch.float64)
        if torch.equal(deviation, deviation.T):
            modulus = torch.linalg.eigvalsh(deviation).abs().max()
        else:
            modulus = torch.linalg.eigvals(deviation).abs().max()
        return float(1.0 - modulus)

    def bytes_per_round(self, model_bytes: int, rank: int = 0, step: int = 0) -> int:
        """Bytes ``rank`` sends in one round when each message is a whole model of ``model_bytes``.

        Raises:
            TypeError: If ``rank`` or ``step`` is not an integer.
            ValueError: If ``rank`` or ``step`` is out of range.
        """
        self._check_rank(rank)
        return model_bytes * len(self._out(step)[rank])

    def __repr__(self) -> str:
        if self._source == "kind":
            extra = f", seed={self.seed}, p={self.p}" if self.kind == "erdos_renyi" else ""
            return f"Topology({self.kind!r}, {self.world_size}{extra})"
        return f"Topology.from_{self._source}(name={self.kind!r}, world_size={self.world_size}, period={self.period})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self._key() == other._key()

    def _key(self) -> tuple:
        matrices = None if self._matrices is None else tuple(tuple(w.flatten().tolist()) for w in self._matrices)
        return (self._source, self.kind, self.world_size, self.seed, self.p, self._schedule, matrices)

    def __hash__(self) -> int:
        return hash(self._key())


def _freeze(schedule: Sequence[Sequence[Sequence[int]]]) -> Schedule:
    return tuple(tuple(tuple(out) for out in step) for step in schedule)


def _checked_peers(neighbours: Callable[[int, int], Iterable[int]], rank: int, step: int, n: int) -> list[int]:
    """The sorted ranks ``neighbours(rank, step)`` names, each checked."""
    where = f"neighbours({rank}, {step})"
    ranks = neighbours(rank, step)
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
        raise TypeError(f"{where} must return the ranks it sends to (an iterable of integers), got {describe(ranks)}")
    peers = [check_int(f"{where}[{k}]", peer, low=0, high=n - 1) for k, peer in enumerate(ranks)]
    if rank in peers:
        raise ValueError(f"{where} names rank {rank} itself; a rank keeps its own share (the diagonal weight)")
    if len(set(peers)) != len(peers):
        raise ValueError(f"{where} repeats a rank: {peers}")
    return sorted(peers)


def _as_matrices(matrix: Any) -> Tensor:
    """``matrix`` as a float64 ``(T, N, N)`` CPU tensor (one matrix: ``T = 1``)."""
    if isinstance(matrix, Tensor) and (matrix.is_complex() or matrix.dtype == torch.bool):
        raise TypeError(f"matrix must hold real weights, got a {matrix.dtype} tensor")
    try:
        if isinstance(matrix, (list, tuple)) and matrix and all(isinstance(m, Tensor) for m in matrix):
            stacked = torch.stack([m.detach().to("cpu", torch.float64) for m in matrix])
        elif isinstance(matrix, Tensor):
            stacked = matrix.detach().to("cpu", torch.float64)
        else:
            stacked = torch.as_tensor(matrix, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"matrix must be an N x N matrix of weights (or one per round), got {describe(matrix)}") \
            from error
    if stacked.dim() == 2:
        stacked = stacked[None]
    if stacked.dim() != 3 or stacked.shape[1] != stacked.shape[2] or stacked.shape[1] == 0 or stacked.shape[0] == 0:
        raise ValueError(
            f"matrix must be one square N x N matrix or a (rounds, N, N) stack, got shape {tuple(stacked.shape)}"
        )
    return stacked


def _check_weights(where: str, w: Tensor) -> None:
    """Non-negative, finite, columns summing to one."""
    if not bool(torch.isfinite(w).all()):
        i, j = torch.nonzero(~torch.isfinite(w))[0].tolist()
        raise ValueError(f"{where} has a non-finite weight W[{i}, {j}] = {float(w[i, j])}")
    if bool((w < 0).any()):
        i, j = torch.nonzero(w < 0)[0].tolist()
        raise ValueError(f"{where} has a negative weight W[{i}, {j}] = {float(w[i, j])}; gossip weights are >= 0")
    columns = w.sum(0)
    bad = torch.nonzero((columns - 1.0).abs() > STOCHASTIC_ATOL).flatten().tolist()
    if bad:
        raise ValueError(
            f"{where} is not column stochastic: columns {bad} sum to {[float(columns[j]) for j in bad]} "
            f"(tolerance {STOCHASTIC_ATOL:g}); every sender's weights W[:, j] must sum to one (push-sum), and for "
            "D-PSGD every row too (doubly stochastic)"
        )


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
