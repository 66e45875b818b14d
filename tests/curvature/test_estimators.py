"""Lanczos, trace estimators and SLQ against dense float64 Hessians and closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_optsurvey.curvature import (
    HessianOperator,
    SpectralDensity,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
)

EIG_TOL = 1e-8  # eigenvalues vs torch.linalg.eigvalsh of the dense float64 Hessian (relative to max |lambda|)
RESIDUAL_TOL = 1e-10  # reported residual vs recomputed ||Hv - lambda v||, relative to max |lambda|
SE_BOUND = 3.0  # an unbiased estimator's mean over seeds lies within this many standard errors
EXACT_TOL = 1e-9  # quadrature / deflation identities that hold exactly up to roundoff


def _mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    net = nn.Sequential(*layers).double()
    if bn:
        with torch.no_grad():
            net[1].running_mean.uniform_(-1, 1)
            net[1].running_var.uniform_(0.5, 2.0)
    return net


def _batches(sizes=(5, 8, 3)) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


class Dense:
    """A dense symmetric matrix as an operator (closed-form spectra)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.numel = matrix.shape[0]
        self.num_matvecs = 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1 if v.ndim == 1 else v.shape[1]
        return self.matrix @ v


def _with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize(
    ("bn", "bn_mode"), [(False, "eval"), (True, "eval"), (True, "batch")], ids=["tanh", "bn-eval", "bn-batch"]
)
def test_top_and_bottom_eigenvalues_match_dense(bn, bn_mode):
    net = _mlp(bn).train()
    op = HessianOperator(net, F.cross_entropy, _batches(), bn_mode=bn_mode)
    dense = op.dense()
    reference = torch.linalg.eigvalsh((dense + dense.T) / 2)
    scale = float(reference.abs().max())
    top = lanczos(op, k=3, which="LA", tol=1e-10)
    bottom = lanczos(op, k=2, which="SA", tol=1e-10)
    assert top.converged.all() and bottom.converged.all()
    torch.testing.assert_close(top.eigenvalues, reference.flip(0)[:3], rtol=0, atol=EIG_TOL * scale)
    torch.testing.assert_close(bottom.eigenvalues, reference[:2], rtol=0, atol=EIG_TOL * scale)
    for res in (top, bottom):
        true_residuals = (dense @ res.eigenvectors - res.eigenvectors * res.eigenvalues).norm(dim=0)
        torch.testing.assert_close(res.residuals, true_residuals, rtol=0, atol=RESIDUAL_TOL * scale)
        gram = res.eigenvectors.T @ res.eigenvectors
        torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("max_basis", [None, 6], ids=["no-restart", "restarts"])
def test_all_ritz_pairs_span_the_search_space_with_exact_projection(max_basis):
    # every Ritz pair of the final basis: orthonormal, V^T H V = diag(values), the wanted pairs among them,
    # and its trace is what a deflated trace estimate adds without a product
    net = _mlp().train()
    op = HessianOperator(net, F.cross_entropy, _batches())
    dense = op.dense()
    scale = float(torch.linalg.eigvalsh((dense + dense.T) / 2).abs().max())
    res = lanczos(op, k=2, tol=1e-3, all_ritz=True, max_basis=max_basis)
    plain = lanczos(op, k=2, tol=1e-3, max_basis=max_basis)
    assert plain.ritz_values is None and plain.ritz_vectors is None
    values, vectors = res.ritz_values, res.ritz_vectors.double()
    assert vectors.shape == (op.numel, values.numel()) and values.numel() >= 2
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(values.numel(), dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(vectors.T @ dense @ vectors, torch.diag(values), rtol=0, atol=EXACT_TOL * scale)
    torch.testing.assert_close(values.sort(descending=True).values[:2], res.eigenvalues, rtol=0, atol=EXACT_TOL * scale)
    torch.testing.assert_close(res.eigenvalues, plain.eigenvalues, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("max_basis", [None, 9])
def test_lanczos_closed_form_spectrum_with_and_without_restarts(which, max_basis):
    values = torch.cat([torch.tensor([-12.0, 10.0, 9.5, 9.0, 7.0]),
                        torch.linspace(-1, 1, 195, dtype=torch.float64)]).double()
    op = Dense(_with_spectrum(values))
    res = lanczos(op, k=4, which=which, tol=1e-10, max_basis=max_basis, max_iter=5000)
    ordered = {"LA": values.sort(descending=True).values, "SA": values.sort().values,
               "LM": values[values.abs().argsort(descending=True)]}[which][:4]
    assert res.converged.all()
    torch.testing.assert_close(res.eigenvalues, ordered, rtol=0, atol=EIG_TOL * 12)
    assert res.num_matvecs == op.num_matvecs
    assert (res.residuals <= 1e-10 * res.eigenvalues.abs()).all()


class Dense32(Dense):
    """A float32 operator: the recurrence then runs in float32 (no float64 vectors)."""

    dtype = torch.float32

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        assert v.dtype == torch.float32, "a float32 operator must receive float32 vectors"
        return super().__matmul__(v)


@pytest.mark.parametrize("max_basis", [None, 9])
def test_float32_recurrence_meets_the_residual_against_the_float64_matrix(max_basis):
    values = torch.cat([torch.tensor([-12.0, 10.0, 9.5, 9.0, 7.0]),
                        torch.linspace(-1, 1, 395, dtype=torch.float64)]).double()
    dense = _with_spectrum(values)
    op = Dense32(dense.float())
    res = lanczos(op, k=3, which="LA", tol=1e-4, max_basis=max_basis, max_iter=5000)
    assert res.converged.all() and res.eigenvectors.dtype == torch.float64
    # The true residuals against the float64 matrix meet the tolerance up to float32 roundoff, the
    # eigenvalues are then accurate to about the residual squared over the gap, and the basis stayed
    # orthonormal (no spurious copies of the converged eigenvalue).
    vecs = res.eigenvectors
    true = (dense @ vecs - vecs * res.eigenvalues).norm(dim=0)
    assert (true <= 1e-4 * res.eigenvalues.abs() + 1e-5 * 12).all()
    torch.testing.assert_close(res.eigenvalues, torch.tensor([10.0, 9.5, 9.0], dtype=torch.float64),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)


def test_stops_on_the_residual_and_reports_what_it_reached():
    values = torch.cat([torch.tensor([10.0, 9.9]), torch.rand(98, generator=torch.Generator().manual_seed(0))])
    op = Dense(_with_spectrum(values.double()))
    loose, tight = lanczos(op, k=1, tol=1e-2), lanczos(op, k=1, tol=1e-8)
    assert loose.num_matvecs < tight.num_matvecs
    for res, tol in ((loose, 1e-2), (tight, 1e-8)):
        true = (op.matrix @ res.eigenvectors[:, 0] - res.eigenvalues[0] * res.eigenvectors[:, 0]).norm()
        assert float(true) <= tol * float(res.eigenvalues[0].abs()) * (1 + 1e-6)
    capped = lanczos(op, k=1, tol=1e-14, max_iter=3)
    assert capped.num_matvecs == 3 and not capped.converged.any()


def test_exact_invariant_subspace_and_full_dimension():
    op = Dense(torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)))
    res = lanczos(op, k=4, tol=1e-12)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    start = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # an eigenvector: Krylov space of dim 1
    res = lanczos(op, k=2, tol=1e-12, v0=start)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_warm_start_from_previous_eigenvectors_needs_a_third_of_the_products():
    values = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(-1, 7, 297)]).double()
    matrix = _with_spectrum(values)
    first = lanczos(Dense(matrix), k=3, tol=1e-6)
    noise = torch.randn(300, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moved = Dense(matrix + 1e-7 * (noise + noise.T))  # a later Hessian that moved less than the tolerance
    cold = lanczos(moved, k=3, tol=1e-6)
    warm = lanczos(moved, k=3, tol=1e-6, v0=first.eigenvectors)
    assert warm.converged.all() and cold.converged.all()
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-10, atol=0)
    true = (moved.matrix @ warm.eigenvectors - warm.eigenvectors * warm.eigenvalues).norm(dim=0)
    torch.testing.assert_close(warm.residuals, true, rtol=0, atol=RESIDUAL_TOL * 10)
    assert 3 * warm.num_matvecs <= cold.num_matvecs


def test_warm_start_from_a_stale_block_still_converges_to_the_right_pairs():
    values = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(-1, 7, 297)]).double()
    first = lanczos(Dense(_with_spectrum(values, seed=0)), k=3, tol=1e-6)
    other = Dense(_with_spectrum(values * 1.1, seed=5))  # unrelated eigenvectors
    warm = lanczos(other, k=3, tol=1e-8, v0=first.eigenvectors)
    assert warm.converged.all()
    torch.testing.assert_close(warm.eigenvalues, torch.tensor([11.0, 9.9, 8.8], dtype=torch.float64),
                               rtol=0, atol=EIG_TOL * 11)
    assert warm.num_matvecs == other.num_matvecs


def test_lanczos_bad_inputs():
    op = Dense(torch.eye(5, dtype=torch.float64))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            lanczos(op, k=bad)
    with pytest.raises(TypeError, match="k must be an integer >= 1"):
        lanczos(op, k=1.5)
    with pytest.raises(ValueError, match="exceeds"):
        lanczos(op, k=6)
    with pytest.raises(ValueError, match="which"):
        lanczos(op, which="BE")
    with pytest.raises(ValueError, match="tol"):
        lanczos(op, tol=0.0)
    with pytest.raises(ValueError, match="v0"):
        lanczos(op, v0=torch.ones(4))
    with pytest.raises(ValueError, match="memory_budget"):
        lanczos(Dense(torch.eye(1000, dtype=torch.float64)), k=3, memory_budget=8 * 1000 * 2)


def _hessian_op():
    net = _mlp()
    op = HessianOperator(net, F.cross_entropy, _batches())
    dense = op.dense()
    return op, (dense + dense.T) / 2


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_trace_estimators_are_unbiased(estimator):
    op, dense = _hessian_op()
    truth = float(dense.trace())
    estimates = torch.tensor(
        [estimator(op, 6, generator=torch.Generator().manual_seed(seed)).estimate for seed in range(150)]
    )
    se = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - truth) <= SE_BOUND * se
    one = estimator(op, 6, generator=torch.Generator().manual_seed(0))
    assert one.num_matvecs == 6 and one.stderr > 0


def test_hutchpp_is_exact_when_the_sketch_captures_the_range():
    values = torch.zeros(60, dtype=torch.float64)
    values[:4] = torch.tensor([5.0, -3.0, 2.0, 1.0])
    op = Dense(_with_spectrum(values))
    res = hutchpp_trace(op, 15)  # sketch of 5 >= rank 4
    assert abs(res.estimate - 5.0) <= EXACT_TOL and res.num_matvecs == 15 == op.num_matvecs


def test_hutchpp_on_a_bfloat16_model_factorizes_its_sketch_in_float32():
    # torch has no bfloat16 QR: the sketch is factorized in float32. With the sketch as large as the
    # dimension, Hutch++ is the projected trace, so it matches the float64 trace to bfloat16 rounding.
    low = _mlp().to(torch.bfloat16)
    reference = _mlp()
    reference.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
    batches = [(x.to(torch.bfloat16), y) for x, y in _batches()]
    exact = float(torch.trace(HessianOperator(reference, F.cross_entropy,
                                              [(x.double(), y) for x, y in batches]).dense()))
    op = HessianOperator(low, F.cross_entropy, batches)
    result = hutchpp_trace(op, 3 * op.numel)
    assert abs(result.estimate - exact) <= 0.05 * abs(exact), (result.estimate, exact)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    values = 1.0 / torch.arange(1, 201, dtype=torch.float64) ** 2
    op = Dense(_with_spectrum(values))
    truth = float(values.sum())
    errors = {f.__name__: [] for f in (hutchinson_trace, hutchpp_trace)}
    for seed in range(20):
        for f in (hutchinson_trace, hutchpp_trace):
            errors[f.__name__].append(abs(f(op, 30, generator=torch.Generator().manual_seed(seed)).estimate - truth))
    assert sum(errors["hutchpp_trace"]) <= 0.5 * sum(errors["hutchinson_trace"])


def test_hutchinson_diagonal_is_unbiased():
    op, dense = _hessian_op()
    runs = torch.stack([hutchinson_diagonal(op, 8, generator=torch.Generator().manual_seed(s)).estimate
                        for s in range(100)])
    se = runs.std(dim=0) / math.sqrt(runs.shape[0])
    z = (runs.mean(dim=0) - dense.diagonal()).abs() / se.clamp_min(1e-12)
    assert float(z.max()) <= 4.0  # 51 entries: the largest of 51 |N(0,1)| stays under 4
    res = hutchinson_diagonal(op, 8, block_size=3)
    assert res.estimate.shape == (op.numel,) and res.num_matvecs == 8


def test_trace_bad_inputs():
    op = Dense(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchinson_trace(op, 0)
    with pytest.raises(ValueError, match="integer >= 3"):
        hutchpp_trace(op, 2)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(op, 2, distribution="uniform")


def test_slq_quadrature_identities_and_moments():
    op, dense = _hessian_op()
    n = op.numel
    num_probes = 40
    sd = spectral_density(op, num_probes=num_probes, num_steps=12, generator=torch.Generator().manual_seed(0))
    assert sd.nodes.shape == (num_probes, 12)
    torch.testing.assert_close(sd.weights.sum(dim=1), torch.ones(num_probes, dtype=torch.float64))
    # Per probe, Gauss quadrature is exact for v^T H v and v^T H^2 v; re-draw the same probes.
    g = torch.Generator().manual_seed(0)
    firsts, seconds = [], []
    for p in range(num_probes):
        v = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).double() * 2 - 1) / math.sqrt(n)
        hv = dense @ v
        firsts.append(float(v @ hv))
        seconds.append(float(hv @ hv))
        torch.testing.assert_close((sd.weights[p] * sd.nodes[p]).sum(), v @ hv, rtol=0, atol=EXACT_TOL)
        torch.testing.assert_close((sd.weights[p] * sd.nodes[p] ** 2).sum(), hv @ hv, rtol=0, atol=EXACT_TOL)
    # ... and their means estimate tr(H)/n and tr(H^2)/n without bias.
    for k, samples, truth in ((1, firsts, dense.trace() / n), (2, seconds, (dense @ dense).trace() / n)):
        se = float(torch.tensor(samples).std()) / math.sqrt(num_probes)
        assert abs(sd.moment(k) - float(truth)) <= SE_BOUND * se


def test_slq_density_integrates_to_one_and_round_trips():
    op = Dense(_with_spectrum(torch.linspace(-1, 4, 50, dtype=torch.float64)))
    sd = spectral_density(op, num_probes=3, num_steps=60)
    assert sd.num_matvecs == op.num_matvecs <= 3 * 50  # at most n steps per probe
    grid = sd.grid(4000)
    mass = torch.trapezoid(sd.density(grid), grid)
    assert abs(float(mass) - 1.0) < 1e-3
    back = SpectralDensity.from_dict(json.loads(json.dumps(sd.to_dict())))
    assert torch.equal(back.nodes, sd.nodes) and torch.equal(back.weights, sd.weights)
    fig = sd.plot()
    assert fig.axes and fig.axes[0].get_xlabel() == "eigenvalue"
    with pytest.raises(ValueError, match="sigma"):
        sd.density(grid, sigma=0.0)
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(op, num_probes=0)
