"""Norm-based measures against dense float64 references and closed forms."""

from __future__ import annotations

import pytest
import torch
from _measures_helpers import classification_batches, cross_entropy, relu_mlp
from torch import nn
from torch.func import jacrev

from lightning_optsurvey.measures import norms
from lightning_optsurvey.tasks import build_model

FLOAT64_RTOL = 1e-10
POWER_RTOL = 1e-6  # power iteration stops at a relative residual of 1e-8; sigma^2's error is quadratic in it


def dense_conv_norm(conv: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Largest singular value of the layer's Jacobian in its input (bias drops out), by a dense SVD."""
    x = torch.zeros(1, *input_shape, dtype=torch.float64)
    jac = jacrev(lambda t: conv._conv_forward(t, conv.weight.detach(), None))(x)
    out_numel = jac.shape[: jac.dim() - x.dim()].numel()
    return float(torch.linalg.svdvals(jac.reshape(out_numel, -1))[0])


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"padding": 1},
        {"padding": 0, "stride": 2},
        {"padding": 2, "dilation": 2, "groups": 2},
    ],
)
def test_conv_power_iteration_matches_dense_jacobian(conv_kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **conv_kwargs).double()
    shape = (4, 7, 6)
    got = norms.operator_spectral_norm(conv, shape, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(dense_conv_norm(conv, shape), rel=POWER_RTOL)


def test_conv_fft_is_exact_for_circular_padding():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular").double()
    shape = (3, 6, 6)
    assert norms.operator_spectral_norm(conv, shape, method="fft") == pytest.approx(
        dense_conv_norm(conv, shape), rel=FLOAT64_RTOL)
    # and the power method, on the same circular layer, agrees
    assert norms.operator_spectral_norm(conv, shape, tol=1e-8) == pytest.approx(dense_conv_norm(conv, shape),
                                                                          rel=POWER_RTOL)


def test_conv1d_power_iteration():
    torch.manual_seed(2)
    conv = nn.Conv1d(2, 3, 5, padding=2).double()
    assert norms.operator_spectral_norm(conv, (2, 11), tol=1e-8) == pytest.approx(dense_conv_norm(conv, (2, 11)),
                                                                            rel=POWER_RTOL)


def test_spectral_norm_product_of_the_digits_cnn():
    torch.manual_seed(0)
    model = build_model("cnn_bn").double()
    model.train()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = norms.spectral_norm_product(model, x, tol=1e-9)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    expected = dense_conv_norm(convs[0], (1, 8, 8)) * dense_conv_norm(convs[1], (16, 8, 8))
    for lin in linears:
        expected *= float(torch.linalg.svdvals(lin.weight.detach())[0])
    assert got == pytest.approx(expected, rel=4 * POWER_RTOL)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched


def test_spectral_norm_product_needs_an_input_for_convolutions():
    with pytest.raises(ValueError, match="example_input"):
        norms.spectral_norm_product(build_model("cnn"))
    with pytest.raises(ValueError, match="method"):
        norms.operator_spectral_norm(nn.Linear(2, 2), method="svd")


def test_frobenius_product_and_parameter_norm_closed_form():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(2 * torch.eye(3))  # ||.||_F = 2 sqrt 3
        model[2].weight.fill_(1.0)  # ||.||_F = sqrt 6
        model[2].bias.copy_(torch.tensor([3.0, 4.0]))
    assert norms.frobenius_norm_product(model) == pytest.approx(2 * 3**0.5 * 6**0.5, rel=FLOAT64_RTOL)
    assert norms.parameter_norm(model) == pytest.approx((12 + 6 + 25) ** 0.5, rel=FLOAT64_RTOL)


def test_distance_from_init():
    model = relu_mlp()
    initial = {k: v.clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        model[0].weight[0, 0] += 3.0
        model[2].bias[1] -= 4.0
    assert norms.distance_from_init(model, initial) == pytest.approx(5.0, rel=FLOAT64_RTOL)
    with pytest.raises(ValueError, match="missing"):
        norms.distance_from_init(model, {})


def test_path_norm_of_a_bias_free_relu_network():
    model = relu_mlp(bias=False)
    w1, w2, w3 = (m.weight.detach() for m in model if isinstance(m, nn.Linear))
    # sum over input-output paths of the product of squared weights
    expected = float((w3.pow(2) @ w2.pow(2) @ w1.pow(2)).sum()) ** 0.5
    model.train()
    assert norms.path_norm(model, torch.zeros(3, 6, dtype=torch.float64)) == pytest.approx(expected, rel=FLOAT64_RTOL)
    assert model.training
    model[0].requires_grad_(False)  # a frozen layer is still on every path (it entered unsquared before)
    assert norms.path_norm(model, torch.zeros(3, 6, dtype=torch.float64)) == pytest.approx(expected, rel=FLOAT64_RTOL)


def _per_sample_reference(model: nn.Module, batches) -> float:
    names = [n for n, _ in model.named_parameters()]
    total, count = 0.0, 0
    for x, y in batches:
        for i in range(len(y)):
            model.zero_grad()
            cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            inner = sum(float((p.detach() * p.grad).sum()) for p in model.parameters())
            total += inner**2
            count += 1
    model.zero_grad(set_to_none=True)
    assert names
    return (total / count) ** 0.5


def test_fisher_rao_norm_matches_per_sample_gradients():
    model = relu_mlp()
    batches = classification_batches(n=5, num_batches=2)
    assert norms.fisher_rao_norm(model, cross_entropy, batches) == pytest.approx(
        _per_sample_reference(model, batches), rel=1e-9)


def test_fisher_rao_norm_homogeneity_identity():
    # bias-free ReLU net with 3 layers: <w, d loss_i / dw> = 3 <d loss_i / d f, f(x_i)> (Liang et al.)
    model = relu_mlp(bias=False)
    batches = classification_batches(n=7, num_batches=1)
    x, y = batches[0]
    out = model(x).detach().requires_grad_(True)
    (dl,) = torch.autograd.grad(cross_entropy(out, y) * len(y), out)
    expected = 3 * float(((dl * out).sum(dim=1) ** 2).mean().sqrt())
    assert norms.fisher_rao_norm(model, cross_entropy, batches) == pytest.approx(expected, rel=1e-10)


class _TwoInputReLU(nn.Module):
    """Bias-free ``W3 relu(W1 x1 + W2 x2)``, called as ``model(x1, x2)``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.w1 = nn.Linear(3, 5, bias=False).double()
        self.w2 = nn.Linear(2, 5, bias=False).double()
        self.w3 = nn.Linear(5, 4, bias=False).double()
        with torch.no_grad():
            for layer in (self.w1, self.w2, self.w3):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.w3(torch.relu(self.w1(x1) + self.w2(x2)))


def test_path_norm_of_a_model_with_several_inputs():
    """``example_input=(x1, x2)`` is the model's two inputs: the path norm sums, over hidden units j, the
    squared output weights times the squared weights of every input path into j."""
    model = _TwoInputReLU()
    w1, w2, w3 = (layer.weight.detach() for layer in (model.w1, model.w2, model.w3))
    into = (w1**2).sum(dim=1) + (w2**2).sum(dim=1)
    expected = float(((w3**2) @ into).sum().sqrt())
    example = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))
    assert norms.path_norm(model, example) == pytest.approx(expected, rel=FLOAT64_RTOL)
    assert norms.path_norm(model, list(example)) == pytest.approx(expected, rel=FLOAT64_RTOL)
