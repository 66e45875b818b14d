"""The linear-operator module (scaled and shifted operators) and the batch utilities' public module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_optsurvey.curvature import (
    HessianOperator,
    ScaledOperator,
    ShiftedOperator,
    lanczos,
    objective,
    operator,
    spectral_density,
    stability_scaling,
)
from lightning_optsurvey.curvature import batches as batch_utils


def _op() -> HessianOperator:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    return HessianOperator(net, F.cross_entropy, [(x, y)])


def test_scaled_and_shifted_operators_match_their_dense_matrices():
    op = _op()
    dense = op.dense()
    d_sqrt = torch.linspace(0.1, 2.0, op.numel, dtype=torch.float64)
    scaled, shifted = ScaledOperator(op, d_sqrt), ShiftedOperator(op, -0.5)
    block = torch.randn(op.numel, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want_scaled = d_sqrt[:, None] * dense * d_sqrt[None, :]
    torch.testing.assert_close(scaled @ block, want_scaled @ block, rtol=0, atol=1e-12)
    torch.testing.assert_close(scaled @ block[:, 0], want_scaled @ block[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(shifted @ block, dense @ block - 0.5 * block, rtol=0, atol=1e-12)
    # Eigenvalues through lanczos: D^1/2 H D^1/2 and H + sigma I against the dense matrices.
    top = lanczos(scaled, k=1, tol=1e-10).eigenvalues[0]
    assert abs(float(top) - float(torch.linalg.eigvalsh(want_scaled)[-1])) < 1e-9 * float(top.abs())
    bottom = lanczos(shifted, k=1, which="SA", tol=1e-10).eigenvalues[0]
    assert abs(float(bottom) - (float(torch.linalg.eigvalsh(dense)[0]) - 0.5)) < 1e-9
    assert scaled.numel == shifted.numel == op.numel and scaled.num_matvecs == op.num_matvecs
    with pytest.raises(ValueError, match="d_sqrt must have shape"):
        ScaledOperator(op, torch.ones(3))
    with pytest.raises(TypeError, match="shift must be a real number"):
        ShiftedOperator(op, "1")
    with pytest.raises(ValueError, match="shift must be a finite number"):
        ShiftedOperator(op, float("nan"))


def test_stability_scaling_lives_in_curvature_and_the_callback_module_reexports_it():
    from lightning_optsurvey.callbacks.stability import stability_scaling as from_callbacks

    assert from_callbacks is stability_scaling
    p = nn.Parameter(torch.ones(3))
    d, threshold, rule = stability_scaling(torch.optim.SGD([p], lr=0.1, momentum=0.5), [p])
    assert rule == "heavy_ball" and threshold == 3.0 and torch.equal(d, torch.full((3,), 0.1))


def test_batch_utilities_have_one_home_and_the_old_paths_still_work():
    for name in ("batch_size", "check_batches", "model_args"):
        assert getattr(operator, name) is getattr(batch_utils, name)
    for name in ("batch_size", "first_tensor_leaf", "model_args", "split_samples"):
        assert getattr(objective, name) is getattr(batch_utils, name)
    batch = {"x": torch.zeros(5, 2), "y": torch.zeros(5)}
    assert batch_utils.batch_size(batch) == 5
    assert [p["x"].shape[0] for p in batch_utils.split_samples(batch, 5, chunk=2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="batches is empty"):
        batch_utils.check_batches([])


def test_slq_of_a_float32_operator_runs_its_recurrence_in_float32_and_keeps_the_quadrature():
    """Deliberate precision change: SLQ uses lanczos' own step in the operator's dtype (float32 here)."""
    op64 = _op()
    op32 = HessianOperator(op64.model.float(), F.cross_entropy,
                           [(b[0].float(), b[1]) for b in op64.batches])
    seen = []

    class Spy:
        numel, dtype, device, num_matvecs = op32.numel, op32.dtype, op32.device, 0

        def __matmul__(self, v):
            seen.append(v.dtype)
            return op32 @ v

    sd32 = spectral_density(Spy(), num_probes=2, num_steps=op32.numel)
    assert set(seen) == {torch.float32}
    op64.model.double()
    sd64 = spectral_density(op64, num_probes=2, num_steps=op64.numel)
    # Same probes, full Krylov space: the quadrature reproduces the moments to float32 roundoff.
    for k in (1, 2):
        assert abs(sd32.moment(k) - sd64.moment(k)) <= 1e-5 * abs(sd64.moment(k))
