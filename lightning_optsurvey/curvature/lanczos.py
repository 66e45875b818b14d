r"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos with full reorthogonalization.

Lanczos builds an orthonormal basis :math:`Q_m` of the Krylov space
:math:`\mathcal{K}_m(H, q_1) = \operatorname{span}\{q_1, Hq_1, \dots, H^{m-1}q_1\}` in which
:math:`H Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top`, with :math:`T_m = Q_m^\top H Q_m` small. The
eigenpairs :math:`(\theta_i, s_i)` of :math:`T_m` give Ritz pairs :math:`(\theta_i, Q_m s_i)` whose
residual is known without another product:

.. math::

    \| H Q_m s_i - \theta_i Q_m s_i \| = |\beta_m\, e_m^\top s_i| .

We stop when every requested pair satisfies :math:`|\beta_m e_m^\top s_i| \le \mathrm{tol}\,|\theta_i|`
(a residual test, not a step count or the change of an estimate; the eigenvalue error is then at most the
residual and typically its square over the spectral gap). When the basis reaches its memory budget the
method restarts thickly (Wu & Simon 2000): the best Ritz vectors are kept, with the residual direction
:math:`q_{m+1}` as the next basis vector, so no information is thrown away and no product is repeated.

The projected matrix, the defect coefficients and the residual test are float64 on the host; the
vectors of length ``numel`` (basis, products, residual directions) stay in the operator's dtype
(float32 for half-precision operators) on its device and are updated in place. A float32 product carries
float32 roundoff, so a float64 recurrence on it buys no accuracy, while converting every vector and
doubling the memory traffic of the reorthogonalization cost as much as the product itself on models
with millions of parameters. Each new vector is orthogonalized twice ("twice is enough"): first against
its known couplings (the three-term recurrence, or the arrow after a thick restart), then by one
classical Gram-Schmidt pass against the whole basis, repeated when that pass removed more than it left
(Daniel, Gragg, Kaufman & Stewart 1976), so no spurious copies of converged eigenvalues appear. One
transfer of ``m + 2`` scalars per product goes to the host for the residual test.

Overhead (cProfile of ``lanczos(op, k=1, tol=1e-2)`` on ``mlp_wide``, 1.1M parameters, float32, one
thread, a loaded 2-core machine): everything but the products is 22 % to 25 % of the call's product
time, start vector and Ritz vectors included (about 15 % per iteration, most of it first-touch page
faults of new basis rows and the two passes over the basis), down from 81 % to 94 % with the former
float64 recurrence (0.2 s of float32/float64 conversions per call).

Measured by ``benchmarks/hessian_vs_pyhessian.py`` (issue 18's protocol: the digits CNN after 300
full-batch SGD steps, one batch of 256, one CPU thread, process CPU time, median of 3 seeds), against
PyHessian's power iteration at the loosest tolerance of each that reaches the target: top-1 to 1e-4 with
6.4x fewer products (6.0x less time), top-5 to 1e-3 with 6.7x fewer products (5.6x less time); the
work between products is 7 % of a product per iteration there (top-5, tol 1e-3), but 34 % on
``mlp_wide`` (1.1M parameters, 17 products): full reorthogonalization reads the whole basis twice per
product, so its cost grows with the basis while a product's does not.

Why our own: PyHessian's power iteration with deflation needs 15 products for a top eigenvalue accurate
to only 2e-3 and 206 for a wrong top-5; ``scipy.sparse.linalg.eigsh`` (ARPACK) round-trips every vector
through NumPy, cannot run on a GPU and cannot be warm-started with a block of previous eigenvectors.

References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem of linear differential and
    integral operators", J. Res. Nat. Bur. Standards 1950.
    Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix
    Anal. Appl. 2000.
    Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian eigenvalue
    density", ICML 2019, arXiv:1901.10159.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_optsurvey.curvature.linear import LinearOperator, apply, operator_info, working_dtype
from lightning_optsurvey.validation import check_bool, check_choice, check_float, check_generator, check_int

__all__ = ["EigenResult", "LinearOperator", "lanczos", "lanczos_step"]

WHICH = ("LA", "SA", "LM")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of float64 basis vectors before a restart
_EPS = torch.finfo(torch.float64).eps


class EigenResult(NamedTuple):
    r"""Eigenpairs found by :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64; descending for ``"LA"``, ascending for ``"SA"``, by descending
            magnitude for ``"LM"``.
        eigenvectors: ``(numel, k)`` float64, orthonormal columns, on the operator's device.
        residuals: ``(k,)`` float64, :math:`\|Hv - \lambda v\|` of each pair.
        num_matvecs: Products this call used.
        converged: ``(k,)`` bool, whether each pair met ``residual <= tol * |eigenvalue|``.
        ritz_values: With ``all_ritz=True``, every Ritz value of the final basis (``(m,)`` float64,
            ascending), else ``None``.
        ritz_vectors: With ``all_ritz=True``, their Ritz vectors ``(numel, m)`` in the operator's dtype:
            an orthonormal basis of the whole search space with ``V^T H V = diag(ritz_values)``, known
            without another product (e.g. to deflate a trace estimate by more than the ``k`` wanted
            pairs), else ``None``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: Tensor
    ritz_values: Tensor | None = None
    ritz_vectors: Tensor | None = None


def _select(theta: Tensor, count: int, which: str) -> Tensor:
    """Indices of the ``count`` wanted Ritz values, best first."""
    if which == "LA":
        order = torch.argsort(theta, descending=True)
    elif which == "SA":
        order = torch.argsort(theta)
    else:
        order = torch.argsort(theta.abs(), descending=True)
    return order[:count]


def _random_unit(
    n: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float64
) -> Tensor:
    # Drawn in float64 whatever the working dtype: the same generator gives the same start vector for
    # every operator dtype (one conversion per call, not per product). A float32 draw would be faster
    # (0.5 ms against 3.2 ms for 49k entries on one CPU thread) but changes every seeded start; measured
    # over 10 seeds on the digits CNN it needs as many products (top-1 to 1e-4: 7.7 vs 7.5 on average),
    # so the draw stays as it was and seeded runs stay comparable.
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return v.div_(v.norm())


def _orthonormal_columns(block: Tensor) -> Tensor:
    """Orthonormalize the columns of ``block`` (QR, twice); drop dependent ones."""
    for _ in range(2):
        q, r = torch.linalg.qr(block)
        keep = r.diagonal().abs() > 1e-10 * max(float(r.diagonal().abs().max()), _EPS) if r.numel() else r
        block = q[:, keep] if r.numel() else q
    return block


def _start_block(
    v0: Tensor | None, n: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    if v0 is None:
        return _random_unit(n, generator, device, dtype).unsqueeze(1)
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0 must be a tensor of shape (numel,) or (numel, b), got {type(v0).__name__}")
    if v0.ndim not in (1, 2) or v0.shape[0] != n or (v0.ndim == 2 and v0.shape[1] == 0):
        raise ValueError(f"v0 must have shape ({n},) or ({n}, b) with b >= 1, got {tuple(v0.shape)}")
    block = v0.detach().to(device=device, dtype=torch.float64)
    block = block.unsqueeze(1) if block.ndim == 1 else block
    if not torch.isfinite(block).all():
        raise ValueError("v0 must be finite")
    block = _orthonormal_columns(block)
    if block.shape[1] == 0:
        raise ValueError("v0 must be non-zero")
    return block


def _project(rows: Tensor, v: Tensor) -> Tensor:
    """``Q^T Q v`` for the orthonormal rows ``Q``, in their dtype."""
    return rows.T @ (rows @ v.to(rows.dtype))


def lanczos(
    op: LinearOperator,
    k: int = 1,
    which: Literal["LA", "SA", "LM"] = "LA",
    tol: float = 1e-4,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    max_basis: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    all_ritz: bool = False,
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator ``op``.

    Started from one vector this is thick-restart Lanczos. Started from a block ``v0`` of ``b >= k``
    vectors (the eigenvectors of a previous measurement), the first step is a Rayleigh-Ritz projection
    on the block (``b`` products, one batched ``op @ V``): if the Hessian moved less than the tolerance,
    the pairs already meet it and the call ends there. Otherwise Lanczos starts from the sum of the
    Ritz vectors, a single Krylov sequence with a large component on each wanted eigenvector (measured
    on digits, cheaper than growing the block itself, whose ``b`` residual directions must each be
    chased). The residual :math:`HQ - QT` is tracked as a low-rank term, so the reported residuals are
    exactly those of the returned pairs, whatever the start.

    Args:
        op: A symmetric operator with ``numel`` and ``op @ v`` / ``op @ V`` (e.g. a
            :class:`~lightning_optsurvey.curvature.HessianOperator`); its ``device`` attribute, if any,
            is where the basis lives.
        k: Number of eigenpairs.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
        tol: Relative residual tolerance: stop when :math:`\|Hv_i - \lambda_i v_i\| \le
            \mathrm{tol}\,|\lambda_i|` for all ``i`` (with :math:`|\lambda_i|` floored at
            :math:`\sqrt{\epsilon}` times the largest Ritz magnitude, so zero eigenvalues can converge).
        max_iter: Most products to spend (default ``max(500, 30 k)``); unconverged pairs are returned
            with ``converged=False``.
        v0: Start vector ``(numel,)``, or a block ``(numel, b)`` of previous eigenvectors (warm start).
        generator: Source of the random start (default: a fresh generator seeded with 0, so the call is
            deterministic and touches no global RNG).
        max_basis: Most basis vectors before a thick restart (default from ``memory_budget``).
        memory_budget: Bytes the float64 basis may take (used when ``max_basis`` is ``None``).
        all_ritz: Also return every Ritz pair of the final basis (``ritz_values``, ``ritz_vectors``).

    Returns:
        An :class:`EigenResult`.

    Raises:
        TypeError: If ``k``, ``max_iter``, ``max_basis`` or ``memory_budget`` is not an integer, ``tol``
            not a real number, or ``v0`` not a tensor.
        ValueError: If ``k`` is not in ``[1, numel]``, ``which`` is unknown, ``tol`` is not positive and
            finite, ``max_iter`` is not positive, ``v0`` has the wrong shape, or the budget cannot hold
            ``k + 1`` vectors.

    Example:
        >>> class Diag:
        ...     numel, num_matvecs = 50, 0
        ...     def __matmul__(self, v):
        ...         d = torch.arange(1.0, 51.0, dtype=v.dtype)
        ...         return d * v if v.ndim == 1 else d[:, None] * v
        >>> res = lanczos(Diag(), k=2, tol=1e-10)
        >>> [round(float(x), 6) for x in res.eigenvalues], bool(res.converged.all())
        ([50.0, 49.0], True)
    """
    n, device = operator_info(op)
    k = check_int("k", k)
    if k > n:
        raise ValueError(f"k={k} exceeds the operator's dimension numel={n}")
    check_choice("which", which, WHICH)
    tol = check_float("tol", tol, low=0.0, low_open=True)
    max_iter = max(500, 30 * k) if max_iter is None else check_int("max_iter", max_iter)
    if max_basis is None:
        fit = check_int("memory_budget", memory_budget) // (8 * n) - 1
        if fit < k + 1 and fit < n:
            raise ValueError(
                f"memory_budget={memory_budget} bytes holds {max(fit, 0)} float64 vectors of length {n}; "
                f"k={k} needs at least {k + 1}"
            )
        max_basis = min(n, max(k + 30, 2 * k + 10), fit)
    else:
        max_basis = min(check_int("max_basis", max_basis), n)
        if max_basis < min(k + 1, n):
            raise ValueError(f"max_basis={max_basis} must be at least k + 1 = {k + 1}")
    check_generator(generator)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    target = _Target(k, which, tol, max_basis, check_bool("all_ritz", all_ritz))

    block = _start_block(v0, n, generator, device, working_dtype(op))
    if v0 is not None and v0.ndim == 2 and k <= block.shape[1] < max_basis:
        # Warm start: Rayleigh-Ritz on the previous eigenvectors (one batched product). Enough when the
        # Hessian moved less than the tolerance; otherwise Lanczos from the sum of the Ritz vectors.
        first = _krylov(op, block, target, block.shape[1], generator)
        if bool(first.converged.all()) or first.num_matvecs >= max_iter:
            return first
        rest = _krylov(op, first.eigenvectors.sum(dim=1, keepdim=True), target, max_iter - first.num_matvecs,
                       generator)
        return rest._replace(num_matvecs=first.num_matvecs + rest.num_matvecs)
    if block.shape[1] > 1:
        block = block.sum(dim=1, keepdim=True)  # fewer vectors than k: one Krylov sequence from their sum
    return _krylov(op, block, target, max_iter, generator)


def _reorthogonalize(active: Tensor, w: Tensor) -> Tensor:
    """Classical Gram-Schmidt of ``w`` against the rows of ``active``, twice, in place; the coefficients.

    "Twice is enough" (Giraud et al. 2005): the second pass removes what roundoff left of the first,
    so the basis stays orthonormal to working precision and no spurious eigenvalue copies appear.
    """
    h = active @ w
    w.addmv_(active.T, h, alpha=-1.0)
    h2 = active @ w
    w.addmv_(active.T, h2, alpha=-1.0)
    return h.add_(h2)


def lanczos_step(basis: Tensor, m: int, known: Tensor, w: Tensor) -> tuple[Tensor, float]:
    """One Lanczos step: orthogonalize ``w = H q_m`` in place against ``basis[: m + 1]``.

    The three-term step shared by :func:`lanczos` and stochastic Lanczos quadrature
    (:func:`~lightning_optsurvey.curvature.spectral_density`). The couplings ``known`` (float64, host,
    length ``m``) of ``q_m`` to the earlier vectors are removed first (the three-term recurrence when only
    ``known[m - 1] = beta`` is non-zero, or the arrow of a thick restart), then one classical Gram-Schmidt
    pass against the whole basis removes what roundoff and lost orthogonality left; a further pass runs
    only when that one removed more than it left (Daniel, Gragg, Kaufman & Stewart 1976), so the basis
    stays orthonormal to working precision. ``w`` stays in the basis' dtype and device; one transfer of
    ``m + 2`` scalars per product goes to the host (two when a pass repeats).

    Returns:
        ``(column, beta)``: column ``m`` of the projected matrix ``T = Q^T H Q`` (float64, host, length
        ``m + 1``) and the norm of what is left of ``w`` (the next off-diagonal entry).
    """
    alpha = basis[m] @ w
    support = torch.nonzero(known).flatten().tolist()
    if support == [m - 1]:  # three-term recurrence: one pass over q_{m-1}, q_m and w
        local = torch.stack([known[m - 1].to(device=w.device, dtype=w.dtype), alpha])
        w.addmv_(basis[m - 1 : m + 1].T, local, alpha=-1.0)
    else:
        w.addmv_(basis[: m + 1].T, torch.cat([known.to(device=w.device, dtype=w.dtype), alpha.unsqueeze(0)]),
                 alpha=-1.0)
    active = basis[: m + 1]
    column = known.new_zeros(m + 1)
    column[:m] = known
    correction = active @ w
    w.addmv_(active.T, correction, alpha=-1.0)
    host = torch.cat([alpha.unsqueeze(0), correction, w.norm().unsqueeze(0)]).to(device="cpu", dtype=torch.float64)
    column[m] += host[0]
    column += host[1:-1]
    beta, removed = float(host[-1]), float(host[1:-1].norm())
    for _ in range(2):  # the pass removed most of the vector: repeat it (twice at most, then it is noise)
        if not removed > beta > 0:
            break
        correction = active @ w
        w.addmv_(active.T, correction, alpha=-1.0)
        host = torch.cat([correction, w.norm().unsqueeze(0)]).to(device="cpu", dtype=torch.float64)
        column += host[:-1]
        beta, removed = float(host[-1]), float(host[:-1].norm())
    return column, beta


class _Target(NamedTuple):
    """What a call asks for: ``k`` pairs of kind ``which`` to relative residual ``tol``, in ``max_basis`` vectors."""

    k: int
    which: str
    tol: float
    max_basis: int
    all_ritz: bool = False


class _Ritz(NamedTuple):
    """Ritz values ``theta``/vectors ``s`` (basis coordinates) of the current basis and their residuals."""

    theta: Tensor
    s: Tensor
    scale: float
    gram: Tensor  # Gram matrix of the defect rows
    mapped: Tensor  # e x m: defect coordinates of every Ritz vector's residual
    residuals: Tensor


class _Krylov:
    r"""The state of one thick-restart Lanczos run, and the steps that change it.

    On the operator's device, in the working dtype (:func:`~.linear.working_dtype`), updated in place:

    - ``basis``: ``max_basis`` rows, of which the first ``m`` are the orthonormal basis :math:`Q`;
    - ``defect``: the rows :math:`E` (``e x numel``) of the part of :math:`HQ` outside the basis.

    On the host, float64, small:

    - ``proj``: :math:`T = Q^\top H Q`;
    - ``coeff``: :math:`C` (``e x m``) with :math:`HQ^\top - Q^\top T = E^\top C`, so residuals are known
      without a product;
    - ``pending``: the norm of a single defect row not yet divided by it (the scale is in ``C`` already;
      the row is normalized on its way into the basis, one pass);
    - ``plain``: the defect is one unit row orthogonal to the basis (plain Lanczos): its Gram matrix is 1
      and every residual is parallel to it, so nothing of length ``numel`` is touched to test.
    """

    def __init__(self, op: LinearOperator, start: Tensor, max_basis: int) -> None:
        self.op, self.n, self.device = op, start.shape[0], start.device
        self.dtype = working_dtype(op)
        start = start / start.norm(dim=0, keepdim=True) if start.shape[1] == 1 else start
        m = self.m = start.shape[1]
        # empty, not zeros: only the rows in use are ever touched (zeroing 31 x 1.1M float64 costs 0.3 s)
        self.basis = torch.empty(max_basis, self.n, dtype=self.dtype, device=self.device)
        self.basis[:m] = start.T
        rows = self.basis[:m]
        image = apply(op, rows[0]).unsqueeze(0) if m == 1 else apply(op, rows.T).T
        self.matvecs = m
        self.proj = torch.zeros(max_basis, max_basis, dtype=torch.float64)
        t0 = (rows @ image.T).to(device="cpu", dtype=torch.float64)
        self.proj[:m, :m] = (t0 + t0.T) / 2
        # The defect H Q - Q T, orthogonalized against the basis, as unit rows (scales in C).
        defect = image.sub_(self.proj[:m, :m].to(device=self.device, dtype=self.dtype) @ rows)
        defect.sub_((defect @ rows.T) @ rows)
        norms = defect.norm(dim=1).to(device="cpu", dtype=torch.float64)
        live = norms > 0
        self.defect = defect[live.to(self.device)] / norms[live].to(device=self.device, dtype=self.dtype).unsqueeze(1)
        self.coeff = torch.diag(norms)[live]
        self.plain = self.defect.shape[0] == 1 and m == 1
        self.pending: float | None = None

    def ritz(self) -> _Ritz:
        """Ritz pairs of the basis and their residual norms; drops defect rows the basis has captured."""
        theta, s = torch.linalg.eigh(self.proj[: self.m, : self.m])
        scale = max(float(theta.abs().max()), _EPS)
        if self.plain:
            if float(self.coeff.abs().max()) <= 8 * _EPS * scale:
                self.defect, self.coeff, self.plain = self.defect[:0], self.coeff[:0], False
            gram = torch.ones(self.defect.shape[0], self.defect.shape[0], dtype=torch.float64)
        else:
            if self.defect.shape[0]:
                # Drop defect rows that are zero to working precision (captured by the basis).
                norms = self.defect.norm(dim=1).to(device="cpu", dtype=torch.float64) * self.coeff.abs().amax(dim=1)
                live = norms > 8 * _EPS * scale
                if not bool(live.all()):
                    self.defect, self.coeff = self.defect[live.to(self.device)], self.coeff[live]
            gram = (self.defect @ self.defect.T).to(device="cpu", dtype=torch.float64)
        mapped = self.coeff @ s
        residuals = torch.einsum("im,ij,jm->m", mapped, gram, mapped).clamp_min(0).sqrt()
        return _Ritz(theta, s, scale, gram, mapped, residuals)

    def result(self, ritz: _Ritz, idx: Tensor, converged: Tensor, all_ritz: bool = False) -> EigenResult:
        # (k x m) @ (m x numel), returned as its transpose: the transposed product Q^T s took 3.6 ms for
        # 13 x 49k rows (a strided walk over the basis), this one 0.25 ms.
        coords = ritz.s[:, idx].T.to(device=self.device, dtype=self.dtype)
        vectors = (coords @ self.basis[: self.m]).to(torch.float64).T
        result = EigenResult(ritz.theta[idx].clone(), vectors, ritz.residuals[idx].clone(), self.matvecs, converged)
        if not all_ritz:
            return result
        every = (ritz.s.T.to(device=self.device, dtype=self.dtype) @ self.basis[: self.m]).T
        return result._replace(ritz_values=ritz.theta.clone(), ritz_vectors=every)

    def restart(self, ritz: _Ritz, keep: Tensor) -> None:
        """Thick restart: keep the Ritz vectors ``keep``; the defect is carried along through ``C``."""
        count = keep.shape[0]
        kept = ritz.s[:, keep]
        self.basis[:count] = kept.T.to(device=self.device, dtype=self.dtype) @ self.basis[: self.m]
        self.proj.zero_()
        self.proj[:count, :count] = torch.diag(ritz.theta[keep])
        self.coeff = self.coeff @ kept
        self.m = count

    def grow(self, ritz: _Ritz, wanted: Tensor, floor: float, generator: torch.Generator) -> None:
        """Add one basis vector (one product): the Lanczos vector, or the residual direction of ``wanted``."""
        m, known = self.m, None
        if self.defect.shape[0] == 1 and (self.plain or abs(float(ritz.gram[0, 0]) - 1.0) < 1e-8):
            # Plain Lanczos: every residual is parallel to the single (unit, orthogonal) defect vector,
            # which is the next Lanczos vector; it leaves the defect once it joins the basis. Its
            # couplings to the basis are known: q_j^T H q_m = (H q_j)^T q_m = C[0, j].
            if self.pending is None:
                self.basis[m] = self.defect[0]
            else:
                torch.div(self.defect[0], self.pending, out=self.basis[m])  # normalized on the way in
            known = self.coeff[0]
            self.defect = self.defect[:0]
            self.coeff = torch.zeros(0, m + 1, dtype=torch.float64)
        else:
            if self.pending is not None:
                self.defect.div_(self.pending)
            self.basis[m] = self._residual_direction(ritz, wanted, floor, generator)
            if self.defect.shape[0]:
                q = self.basis[m]
                self.defect = self.defect - (self.defect @ q).unsqueeze(1) * q.unsqueeze(0)
            self.coeff = torch.cat([self.coeff, torch.zeros(self.coeff.shape[0], 1, dtype=torch.float64)], dim=1)
        w = apply(self.op, self.basis[m])
        self.matvecs += 1
        if known is None:
            column = _reorthogonalize(self.basis[: m + 1], w)
            host = torch.cat([column, w.norm().unsqueeze(0)]).to(device="cpu", dtype=torch.float64)
            column, beta = host[:-1], float(host[-1])
        else:
            column, beta = lanczos_step(self.basis, m, known, w)
        self.proj[: m + 1, m] = column
        self.proj[m, : m + 1] = column
        self.m = m = m + 1
        # The new product's part outside the basis joins the defect (one Lanczos residual vector).
        self.pending = None
        if beta > 0:
            was_empty = self.defect.shape[0] == 0
            if was_empty:  # stays unnormalized until it joins the basis (divided on that copy)
                self.defect, self.pending = w.unsqueeze(0), beta
            else:
                self.defect = torch.cat([self.defect, w.div_(beta).unsqueeze(0)])
            row = torch.zeros(1, m, dtype=torch.float64)
            row[0, m - 1] = beta
            self.coeff = torch.cat([self.coeff, row], dim=0)
            self.plain = was_empty
        else:
            self.plain = False

    def _residual_direction(self, ritz: _Ritz, wanted: Tensor, floor: float, generator: torch.Generator) -> Tensor:
        """Principal direction of the ``wanted`` pairs' residuals (relative to their eigenvalues), unit norm.

        With a single defect vector every residual is parallel to it and this is the Lanczos direction; with
        a block start it is the direction that carries most of the remaining residual. A random direction
        when the basis spans an invariant subspace.
        """
        weights = ritz.mapped[:, wanted] / torch.clamp(ritz.theta[wanted].abs(), min=floor)
        direction = None
        if self.defect.shape[0]:
            small = weights.T @ ritz.gram @ weights
            _, vecs = torch.linalg.eigh((small + small.T) / 2)
            direction = (weights @ vecs[:, -1]).to(device=self.device, dtype=self.dtype) @ self.defect
        passes = 1  # the defect is kept orthogonal to the basis; one pass guards against roundoff
        if direction is None or float(direction.norm()) <= 8 * _EPS * ritz.scale:
            direction = _random_unit(self.n, generator, self.device, self.dtype)  # invariant subspace
            passes = 2
        for _ in range(passes):
            direction = direction - _project(self.basis[: self.m], direction)
        return direction / direction.norm()


def _krylov(
    op: LinearOperator, start: Tensor, target: _Target, max_iter: int, generator: torch.Generator
) -> EigenResult:
    """Rayleigh-Ritz on ``start`` (orthonormal columns), grown along residuals until converged."""
    k, which, max_basis = target.k, target.which, target.max_basis
    state = _Krylov(op, start, max_basis)
    while True:
        ritz = state.ritz()
        count = min(k, state.m)
        idx = _select(ritz.theta, count, which)
        floor = math.sqrt(_EPS) * ritz.scale
        done = ritz.residuals[idx] / torch.clamp(ritz.theta[idx].abs(), min=floor) <= target.tol
        if (count == k and bool(done.all())) or state.matvecs >= max_iter or state.m == state.n:
            return state.result(ritz, idx, done if count == k else torch.zeros(count, dtype=torch.bool),
                                target.all_ritz)
        if state.m == max_basis:
            keep = min(max(k + (max_basis - k) // 2, k), max_basis - 1)
            state.restart(ritz, _select(ritz.theta, keep, which))
        else:
            state.grow(ritz, idx[~done] if count == k else idx, floor, generator)
