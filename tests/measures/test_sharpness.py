"""Sharpness measures against closed forms on a quadratic, invariances and degenerate equivalences."""

from __future__ import annotations

import math

import pytest
import torch
from _measures_helpers import (
    Quadratic,
    classification_batches,
    cross_entropy,
    dummy_batches,
    mean_output,
    relu_mlp,
    spd_matrix,
)

from lightning_optsurvey.measures import (
    average_sharpness,
    keskar_sharpness,
    pac_bayes_sigma,
    sam_sharpness,
    worst_case_sharpness,
)
from lightning_optsurvey.tasks import build_model

EIGENVALUES = [10.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1]
WORST_CASE_RTOL = 0.01  # the bound: Auto-PGD finds the top of the ball within 1%
FLOAT64_RTOL = 1e-10  # closed forms evaluated in float64 (a few dozen roundings)
INVARIANCE_RTOL = 1e-8  # the same computation on rescaled weights, rounding through ReLU layers
NUM_SE = 3.0  # Monte-Carlo estimates within 3 standard errors


def quadratic(w0: torch.Tensor | None = None, eigenvalues: list[float] = EIGENVALUES) -> tuple[Quadratic, torch.Tensor]:
    a = spd_matrix(eigenvalues)
    w = torch.zeros(len(eigenvalues), dtype=torch.float64) if w0 is None else w0
    return Quadratic(a, w), a


def test_worst_case_l2_at_minimum_is_half_rho_squared_lambda_max():
    model, _a = quadratic()
    rho = 0.1
    expected = rho**2 * max(EIGENVALUES) / 2
    got = worst_case_sharpness(model, mean_output, dummy_batches(), rho=rho, steps=20,
                               generator=torch.Generator().manual_seed(0))
    assert expected * (1 - WORST_CASE_RTOL) <= got <= expected * (1 + FLOAT64_RTOL)


def test_worst_case_linf_at_minimum_of_diagonal_quadratic_is_a_vertex():
    eig = torch.tensor(EIGENVALUES, dtype=torch.float64)
    model = Quadratic(torch.diag(eig), torch.zeros(len(EIGENVALUES), dtype=torch.float64))
    rho = 0.05
    got = worst_case_sharpness(model, mean_output, dummy_batches(), rho=rho, norm="linf", steps=5,
                               generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(rho**2 * float(eig.sum()) / 2, rel=FLOAT64_RTOL)


def test_average_sharpness_at_minimum_is_half_sigma_squared_trace():
    model, a = quadratic()
    sigma, n = 0.1, 400
    got = average_sharpness(model, mean_output, dummy_batches(), sigma=sigma, num_samples=n,
                            generator=torch.Generator().manual_seed(0))
    expected = sigma**2 * float(torch.trace(a)) / 2
    # Var[z^T A z / 2] = tr(A^2) / 2 for z ~ N(0, I)
    stderr = sigma**2 * math.sqrt(float(torch.trace(a @ a)) / 2 / n)
    assert abs(got - expected) <= NUM_SE * stderr


def test_keskar_on_diagonal_quadratic_matches_closed_form():
    eig = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    center = torch.tensor([0.3, -0.2, 0.0, 0.9], dtype=torch.float64)
    w0 = torch.tensor([1.0, 0.5, -2.0, 1.0], dtype=torch.float64)
    model = Quadratic(torch.diag(eig), w0, center)
    eps = 1e-2
    # Each coordinate moves to the box edge away from the center: |w_i - c_i| + eps (|w_i| + 1).
    base = 0.5 * float((eig * (w0 - center) ** 2).sum())
    top = 0.5 * float((eig * ((w0 - center).abs() + eps * (w0.abs() + 1)) ** 2).sum())
    got = keskar_sharpness(model, mean_output, dummy_batches(), epsilon=eps, steps=5)
    assert got == pytest.approx(100 * (top - base) / (1 + base), rel=FLOAT64_RTOL)


def test_keskar_at_minimum_of_diagonal_quadratic():
    eig = torch.tensor(EIGENVALUES, dtype=torch.float64)
    model = Quadratic(torch.diag(eig), torch.zeros(len(EIGENVALUES), dtype=torch.float64))
    eps = 1e-3
    got = keskar_sharpness(model, mean_output, dummy_batches(), epsilon=eps, steps=3,
                           generator=torch.Generator().manual_seed(1))
    assert got == pytest.approx(100 * eps**2 * float(eig.sum()) / 2, rel=FLOAT64_RTOL)


def test_sam_away_from_minimum_is_the_exact_one_step_value_and_below_worst_case():
    w0 = torch.linspace(-1, 1, len(EIGENVALUES), dtype=torch.float64)
    model, a = quadratic(w0)
    rho = 0.2
    g = a @ w0
    w1 = w0 + rho * g / g.norm()
    expected = 0.5 * float(w1 @ a @ w1 - w0 @ a @ w0)
    got = sam_sharpness(model, mean_output, dummy_batches(), rho=rho)
    assert got == pytest.approx(expected, rel=FLOAT64_RTOL)
    worst = worst_case_sharpness(model, mean_output, dummy_batches(), rho=rho, steps=10)
    assert got <= worst
    # The exact maximum over the ball bounds the ascent: L(w+e) - L(w) <= rho |g| + rho^2 lambda_max / 2.
    assert worst <= rho * float(g.norm()) + rho**2 * max(EIGENVALUES) / 2


def test_sam_is_zero_at_a_zero_gradient():
    model, _ = quadratic()
    assert sam_sharpness(model, mean_output, dummy_batches(), rho=0.5) == 0.0


def test_m_sharpness_degenerate_cases():
    model = relu_mlp()
    batches = classification_batches(n=6, num_batches=2)
    rho = 0.05
    assert sam_sharpness(model, cross_entropy, batches, rho, m=12) == pytest.approx(
        sam_sharpness(model, cross_entropy, batches, rho), rel=FLOAT64_RTOL)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    per_sample = [sam_sharpness(model, cross_entropy, [(x[i : i + 1], y[i : i + 1])], rho) for i in range(12)]
    assert sam_sharpness(model, cross_entropy, batches, rho, m=1) == pytest.approx(
        sum(per_sample) / 12, rel=FLOAT64_RTOL)
    # groups of 5 over 12 samples: 5, 5, 2, weighted by size
    groups = [(x[i : i + 5], y[i : i + 5]) for i in (0, 5, 10)]
    expected = sum(sam_sharpness(model, cross_entropy, [g], rho) * len(g[1]) / 12 for g in groups)
    assert sam_sharpness(model, cross_entropy, batches, rho, m=5) == pytest.approx(expected, rel=FLOAT64_RTOL)


def _rescaled(model: torch.nn.Sequential, c: float) -> torch.nn.Sequential:
    out = relu_mlp()
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        out[0].weight.mul_(c)
        out[0].bias.mul_(c)
        out[2].weight.div_(c)
    return out


def test_adaptive_kinds_are_invariant_to_relu_rescaling_and_plain_kinds_are_not():
    model = relu_mlp()
    scaled = _rescaled(model, 5.0)
    batches = classification_batches()
    x = batches[0][0]
    assert torch.allclose(model(x), scaled(x), rtol=1e-12)

    def kinds(m: torch.nn.Module) -> dict[str, float]:
        return {
            "adaptive_worst_case": worst_case_sharpness(m, cross_entropy, batches, rho=0.5, adaptive=True,
                                                        steps=8),
            "adaptive_linf": worst_case_sharpness(m, cross_entropy, batches, rho=0.1, norm="linf",
                                                  adaptive=True, steps=8),
            "adaptive_average": average_sharpness(m, cross_entropy, batches, sigma=0.2, adaptive=True,
                                                  num_samples=8, generator=torch.Generator().manual_seed(3)),
            "worst_case": worst_case_sharpness(m, cross_entropy, batches, rho=0.5, steps=8),
            "average": average_sharpness(m, cross_entropy, batches, sigma=0.2, num_samples=8,
                                         generator=torch.Generator().manual_seed(3)),
            "sam": sam_sharpness(m, cross_entropy, batches, rho=0.5),
            "adaptive_pac_bayes": pac_bayes_sigma(m, cross_entropy, batches, max_deviation=0.05, adaptive=True,
                                                  num_samples=4, generator=torch.Generator().manual_seed(4)),
            "pac_bayes": pac_bayes_sigma(m, cross_entropy, batches, max_deviation=0.05, num_samples=4,
                                         generator=torch.Generator().manual_seed(4)),
        }

    before, after = kinds(model), kinds(scaled)
    for kind in ("adaptive_worst_case", "adaptive_linf", "adaptive_average", "adaptive_pac_bayes"):
        assert after[kind] == pytest.approx(before[kind], rel=INVARIANCE_RTOL), kind
    for kind in ("worst_case", "average", "sam", "pac_bayes"):
        assert abs(after[kind] - before[kind]) > 0.05 * abs(before[kind]), kind


def test_same_generator_seed_gives_same_values():
    model, _ = quadratic()
    batches = dummy_batches()

    def run(seed: int) -> tuple[float, float, float]:
        return (
            average_sharpness(model, mean_output, batches, sigma=0.1, num_samples=4,
                              generator=torch.Generator().manual_seed(seed)),
            worst_case_sharpness(model, mean_output, batches, rho=0.1, steps=2,
                                 generator=torch.Generator().manual_seed(seed)),
            pac_bayes_sigma(model, mean_output, batches, max_deviation=0.01, num_samples=4,
                            generator=torch.Generator().manual_seed(seed)),
        )

    assert run(7) == run(7)
    assert all(a != b for a, b in zip(run(7), run(8)))


def test_pac_bayes_sigma_is_a_standard_deviation():
    model, a = quadratic()
    target, n = 0.02, 64
    sigma = pac_bayes_sigma(model, mean_output, dummy_batches(), max_deviation=target, num_samples=n,
                            rtol=1e-6, generator=torch.Generator().manual_seed(0))
    # E[L(sigma z)] = sigma^2 tr(A) / 2 = target  =>  sigma* = sqrt(2 target / tr A)
    expected = math.sqrt(2 * target / float(torch.trace(a)))
    # the mean of z^T A z has relative stderr sqrt(2 tr A^2) / (tr A sqrt n); sigma* goes as its -1/2 power
    rel_se = 0.5 * math.sqrt(2 * float(torch.trace(a @ a))) / float(torch.trace(a)) / math.sqrt(n)
    assert abs(sigma / expected - 1) <= NUM_SE * rel_se + 1e-6
    variance_bug = expected**2  # what one finds if the noise is sqrt(sigma) * z
    assert abs(sigma - variance_bug) > 0.5 * expected


def test_pac_bayes_sigma_returns_sigma_max_with_a_warning_when_flat():
    model, _ = quadratic(eigenvalues=[1e-6] * 3)
    with pytest.warns(UserWarning, match="sigma_max"):
        assert pac_bayes_sigma(model, mean_output, dummy_batches(), sigma_max=0.5, num_samples=2) == 0.5


def test_measures_leave_the_model_untouched():
    torch.manual_seed(0)
    model = build_model("cnn_bn").double()
    model.train()
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    batches = [(x, torch.arange(8) % 10)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sam_sharpness(model, cross_entropy, batches)
    worst_case_sharpness(model, cross_entropy, batches, steps=2, adaptive=True)
    average_sharpness(model, cross_entropy, batches, num_samples=2, generator=gen)
    keskar_sharpness(model, cross_entropy, batches, steps=2)
    pac_bayes_sigma(model, cross_entropy, batches, num_samples=2, max_iter=3, generator=gen)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert model.training


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (sam_sharpness, {"rho": 0.0}, "rho"),
        (sam_sharpness, {"m": 0}, "m"),
        (worst_case_sharpness, {"norm": "l1"}, "norm"),
        (worst_case_sharpness, {"steps": 0}, "steps"),
        (average_sharpness, {"sigma": -1.0}, "sigma"),
        (average_sharpness, {"num_samples": 0}, "num_samples"),
        (keskar_sharpness, {"epsilon": float("nan")}, "epsilon"),
        (pac_bayes_sigma, {"max_deviation": 0.0}, "max_deviation"),
        (pac_bayes_sigma, {"rtol": 1.5}, "rtol"),
    ],
)
def test_bad_arguments_raise_value_error(fn, kwargs, match):
    model, _ = quadratic()
    with pytest.raises(ValueError, match=match):
        fn(model, mean_output, dummy_batches(), **kwargs)


@pytest.mark.parametrize("fn", [worst_case_sharpness, average_sharpness, keskar_sharpness, pac_bayes_sigma])
def test_a_generator_of_the_wrong_type_is_a_type_error(fn):
    model, _ = quadratic()
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got 3 \(int\)"):
        fn(model, mean_output, dummy_batches(), generator=3)


@pytest.mark.parametrize("fn", [worst_case_sharpness, average_sharpness, pac_bayes_sigma])
def test_adaptive_must_be_a_bool(fn):
    model, _ = quadratic()
    with pytest.raises(TypeError, match=r"adaptive must be a bool, got 'no' \(str\)"):  # "no" is truthy
        fn(model, mean_output, dummy_batches(), adaptive="no")


def test_empty_batches_raise():
    model, _ = quadratic()
    with pytest.raises(ValueError, match="batches"):
        sam_sharpness(model, mean_output, [])


class _TwoInputs(torch.nn.Module):
    """A model called as ``model(x1, x2)``: a batch's inputs are the tuple ``(x1, x2)``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.a = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=torch.float64))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x1 @ self.a) + x2 @ self.b


def test_several_inputs_are_positional_arguments_as_in_the_hessian_operator():
    """``((x1, x2), y)`` calls ``model(x1, x2)`` (the HessianOperator's convention); checked against SAM's
    step written out with autograd on a copy of the model."""
    import copy

    import torch.nn.functional as F

    model = _TwoInputs()
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    x2 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    rho = 0.1
    twin = copy.deepcopy(model)
    before = F.cross_entropy(twin(x1, x2), y)
    grads = torch.autograd.grad(before, list(twin.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(twin.parameters(), grads):
            p.add_(rho * g / norm)
        expected = float(F.cross_entropy(twin(x1, x2), y) - before)
    assert sam_sharpness(model, F.cross_entropy, [((x1, x2), y)], rho=rho) == pytest.approx(expected, rel=FLOAT64_RTOL)


def test_a_train_mode_dropout_model_sees_the_same_masks_and_keeps_the_global_rng():
    """In train mode every evaluation draws the same dropout masks (from the RNG state at the call), so SAM's
    one-step sharpness is a deterministic difference of losses, and the caller's global RNG does not move."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3)).double().train()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))]
    state = torch.get_rng_state()
    values = [sam_sharpness(model, torch.nn.functional.cross_entropy, batches, rho=0.05) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert values[0] == values[1] == values[2] and values[0] > 0  # an ascent step raises the fixed-mask loss
    worst = worst_case_sharpness(model, torch.nn.functional.cross_entropy, batches, rho=0.05, steps=5,
                                 generator=torch.Generator().manual_seed(2))
    assert worst >= values[0] - 1e-12  # the docstring's bound holds with common masks
