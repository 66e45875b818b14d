"""HessianOperator against dense float64 Hessians by reverse-over-reverse autograd and hand-written models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _support import cross_entropy_pairs, dense_hessian, flat_parameter_loss, flat_parameters, pair_size
from torch import nn

from lightning_optsurvey.curvature import HessianOperator, lanczos

MATVEC_TOL = 1e-10  # float64 products vs dense float64 Hessian, entries O(1)
BN_EPS = 1e-5


def _tanh_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(sizes: tuple[int, ...], in_dim: int = 4, classes: int = 3, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, in_dim, generator=g, dtype=torch.float64)
        out.append((x, torch.randint(0, classes, (n,), generator=g)))
    return out


def _dense_reference(model: nn.Module, batches: list, names: list[str] | None = None) -> torch.Tensor:
    """Hessian of the sample-weighted mean cross-entropy over the named parameters (default: all)."""
    return dense_hessian(*flat_parameter_loss(model, batches, cross_entropy_pairs, pair_size, names))


@pytest.mark.parametrize("linearize", [True, False])
def test_matvec_and_matmat_match_dense_hessian_with_unequal_batches(linearize):
    model = _tanh_mlp()
    batches = _batches((7, 3, 11))
    op = HessianOperator(model, F.cross_entropy, batches, linearize=linearize, chunk_size=3)
    reference = _dense_reference(model, batches)
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(op @ v, reference @ v, rtol=0, atol=MATVEC_TOL)
    block = torch.randn(op.numel, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(op @ block, reference @ block, rtol=0, atol=MATVEC_TOL)
    torch.testing.assert_close(op.dense(), reference, rtol=0, atol=MATVEC_TOL)
    assert op.num_matvecs == 1 + 4 + op.numel


def test_loss_is_sample_weighted_not_batch_averaged():
    model = _tanh_mlp()
    batches = _batches((2, 10))
    op = HessianOperator(model, F.cross_entropy, batches)
    merged = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    torch.testing.assert_close(op.dense(), _dense_reference(model, merged), rtol=0, atol=MATVEC_TOL)


def test_parameter_block_is_the_diagonal_block_of_the_full_hessian():
    model = _tanh_mlp()
    batches = _batches((9,))
    names = ["2.weight", "2.bias"]
    op = HessianOperator(model, F.cross_entropy, batches, params=names)
    full = _dense_reference(model, batches)
    offset = sum(p.numel() for n, p in model.named_parameters() if n.startswith("0."))
    torch.testing.assert_close(op.dense(), full[offset:, offset:], rtol=0, atol=MATVEC_TOL)
    torch.testing.assert_close(op.dense(), _dense_reference(model, batches, names), rtol=0, atol=MATVEC_TOL)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5, eps=BN_EPS)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _bn_net() -> _BNNet:
    torch.manual_seed(3)
    net = _BNNet().double()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def _bn_reference(net: _BNNet, batches: list, mode: str) -> torch.Tensor:
    """BatchNorm written out by hand: running statistics ("eval") or biased batch statistics ("batch")."""
    unflatten, flat0 = flat_parameters(net)
    rm, rv = net.bn.running_mean.detach(), net.bn.running_var.detach()
    total = sum(len(y) for _, y in batches)

    def loss(flat):
        p = unflatten(flat)
        out = 0.0
        for x, y in batches:
            h = x @ p["fc1.weight"].T + p["fc1.bias"]
            if mode == "eval":
                mean, var = rm, rv
            else:
                mean, var = h.mean(0), h.var(0, unbiased=False)
            h = (h - mean) / torch.sqrt(var + BN_EPS) * p["bn.weight"] + p["bn.bias"]
            logits = torch.tanh(h) @ p["fc2.weight"].T + p["fc2.bias"]
            out = out + len(y) / total * F.cross_entropy(logits, y)
        return out

    return dense_hessian(loss, flat0)


@pytest.mark.parametrize("linearize", [True, False])
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_modes_match_hand_written_reference_and_leave_the_model_alone(bn_mode, training, linearize):
    net = _bn_net().train(training)
    batches = _batches((6, 9), in_dim=4)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    op = HessianOperator(net, F.cross_entropy, batches, bn_mode=bn_mode, linearize=linearize)
    torch.testing.assert_close(op.dense(), _bn_reference(net, batches, bn_mode), rtol=0, atol=MATVEC_TOL)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(m.training == training for m in net.modules())
    assert net.bn.track_running_stats
    assert all(p.grad is None for p in net.parameters())


def test_dropout_is_off_during_products_and_rng_untouched():
    torch.manual_seed(0)
    with_dropout = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
    with_dropout = with_dropout.double().train()
    without = nn.Sequential(with_dropout[0], with_dropout[1], with_dropout[3])
    batches = _batches((8,))
    rng = torch.get_rng_state()
    op = HessianOperator(with_dropout, F.cross_entropy, batches)
    dense = op.dense()
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(dense, _dense_reference(without, batches), rtol=0, atol=MATVEC_TOL)
    assert with_dropout.training


def test_retained_graph_follows_in_place_parameter_changes():
    model = _tanh_mlp()
    batches = _batches((6,))
    op = HessianOperator(model, F.cross_entropy, batches)
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    before = op @ v
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # as an optimizer step would
    after = op @ v
    torch.testing.assert_close(after, _dense_reference(model, batches) @ v, rtol=0, atol=MATVEC_TOL)
    assert not torch.allclose(before, after)


def test_unused_parameters_have_zero_rows():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    net.unused = nn.Linear(2, 2)  # registered after weight and bias; Linear's forward never calls it
    net = net.double()
    batches = _batches((5,))
    for linearize in (True, False):
        dense = HessianOperator(net, F.cross_entropy, batches, linearize=linearize).dense()
        assert torch.equal(dense[15:], torch.zeros_like(dense[15:]))
        torch.testing.assert_close(dense[:15, :15], _dense_reference(net, batches, ["weight", "bias"]),
                                   rtol=0, atol=MATVEC_TOL)


def test_products_run_in_the_model_dtype():
    model = _tanh_mlp().float()
    batches = [(x.float(), y) for x, y in _batches((5,))]
    op = HessianOperator(model, F.cross_entropy, batches)
    out = op @ torch.ones(op.numel, dtype=torch.float64)
    assert op.dtype == torch.float32 and out.dtype == torch.float32
    reference = _dense_reference(_tanh_mlp(), _batches((5,))) @ torch.ones(op.numel, dtype=torch.float64)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)


def test_reduce_combines_shards_into_the_global_mean():
    """Two shards through a simulated all-reduce equal one operator over both shards."""
    model = _tanh_mlp()
    shard_a, shard_b = _batches((4, 2), seed=7), _batches((9,), seed=8)
    # A sum over two "processes": this process holds shard_a, the other holds shard_b. The other's
    # contribution is computed independently and added by the fake all-reduce.
    other = HessianOperator(model, F.cross_entropy, shard_b)
    pending: list[torch.Tensor] = []

    def fake_all_reduce(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:  # the sample count
            return t + 9
        return t + pending.pop() * 9

    op = HessianOperator(model, F.cross_entropy, shard_a, reduce=fake_all_reduce)
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pending.append(other @ v)
    reference = _dense_reference(model, shard_a + shard_b)
    torch.testing.assert_close(op @ v, reference @ v, rtol=0, atol=MATVEC_TOL)


def test_loss_and_gradient_match_autograd():
    model = _tanh_mlp()
    batches = _batches((3, 5))
    loss, g = HessianOperator(model, F.cross_entropy, batches).loss_and_gradient()
    ref = sum(len(y) / 8 * F.cross_entropy(model(x), y) for x, y in batches)
    ref_g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ref, list(model.parameters()))])
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=MATVEC_TOL)
    torch.testing.assert_close(g, ref_g, rtol=0, atol=MATVEC_TOL)
    assert all(p.grad is None for p in model.parameters())


def test_multi_input_batches_pass_positional_arguments():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 3)
            self.b = nn.Linear(2, 3)

        def forward(self, x, z):
            return torch.tanh(self.a(x)) * self.b(z)

    torch.manual_seed(0)
    net = TwoInputs().double()
    x, z, y = torch.randn(4, 2).double(), torch.randn(4, 2).double(), torch.randint(0, 3, (4,))
    op = HessianOperator(net, F.cross_entropy, [((x, z), y)])
    ref = _dense_reference(net, [((x, z), y)])
    torch.testing.assert_close(op.dense(), ref, rtol=0, atol=MATVEC_TOL)
    assert math.isclose(op.numel, sum(p.numel() for p in net.parameters()))


@pytest.mark.parametrize("loss_fn", [F.mse_loss, torch.nn.MSELoss()])
@pytest.mark.parametrize("linearize", [True, False])
def test_mse_loss_products_match_the_dense_hessian(loss_fn, linearize):
    # torch 2.13 has no forward derivative of mse_loss's backward: jvp(grad(...)) fails without linearize.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 3, generator=gen, dtype=torch.float64),
                torch.randn(5, 2, generator=gen, dtype=torch.float64))]
    params = list(model.parameters())
    sizes = [p.numel() for p in params]

    def loss(flat):
        weights = dict(zip((n for n, _ in model.named_parameters()),
                           (piece.view_as(p) for piece, p in zip(flat.split(sizes), params))))
        x, y = batches[0]
        return F.mse_loss(torch.func.functional_call(model, weights, (x,)), y)

    reference = dense_hessian(loss, torch.cat([p.detach().reshape(-1) for p in params]))
    op = HessianOperator(model, loss_fn, batches, linearize=linearize, chunk_size=2)
    v = torch.randn(op.numel, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(op @ v, reference @ v, rtol=0, atol=MATVEC_TOL)
    block = torch.randn(op.numel, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(op @ block, reference @ block, rtol=0, atol=MATVEC_TOL)


def test_non_finite_batches_and_complex_parameters_are_refused_at_construction():
    from lightning_optsurvey.measures import sam_sharpness

    model = _tanh_mlp()
    (x, y), *_ = _batches((3,))
    for bad in (float("nan"), float("inf")):
        poisoned = x.clone()
        poisoned[1, 0] = bad
        with pytest.raises(ValueError, match=r"batch 1 holds NaN or infinite values.*shape \(3, 4\)"):
            HessianOperator(model, F.cross_entropy, [(x, y), (poisoned, y)])
    complex_model = torch.nn.Linear(2, 1, dtype=torch.complex64)
    batch = [(torch.randn(4, 2, dtype=torch.complex64), torch.randn(4, 1, dtype=torch.complex64))]

    def loss(out, target):
        return (out - target).abs().square().mean()

    with pytest.raises(ValueError, match=r"HessianOperator works on real parameters; \['weight', 'bias'\]"):
        HessianOperator(complex_model, loss, batch)
    with pytest.raises(ValueError, match="works on real parameters"):
        sam_sharpness(complex_model, loss, batch)


def test_bad_inputs_raise_early():
    model = _tanh_mlp()
    batches = _batches((3,))
    with pytest.raises(ValueError, match="batches is empty"):
        HessianOperator(model, F.cross_entropy, [])
    with pytest.raises(TypeError, match="batches must be a sequence of batches, got NoneType"):
        HessianOperator(model, F.cross_entropy, None)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got 1"):
        lanczos(HessianOperator(model, F.cross_entropy, _batches((3,))), k=1, generator=1)
    per_sample = HessianOperator(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), batches)
    for use in (lambda op: op @ torch.ones(op.numel, dtype=torch.float64), lambda op: op.loss_and_gradient(),
                lambda op: op.matmat(torch.ones(op.numel, 2, dtype=torch.float64))):
        with pytest.raises(ValueError, match="loss_fn must return a scalar"):  # at its first evaluation
            use(per_sample)
    fresh = HessianOperator(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), batches,
                            linearize=False)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        fresh @ torch.ones(fresh.numel, dtype=torch.float64)
    with pytest.raises(ValueError, match="bn_mode"):
        HessianOperator(model, F.cross_entropy, batches, bn_mode="train")
    with pytest.raises(ValueError, match="unknown parameter names"):
        HessianOperator(model, F.cross_entropy, batches, params=["nope.weight"])
    with pytest.raises(TypeError, match="list of parameter names"):
        HessianOperator(model, F.cross_entropy, batches, params="0.weight")
    with pytest.raises(ValueError, match="pair"):
        HessianOperator(model, F.cross_entropy, [batches[0][0]])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        HessianOperator(lambda x: x, F.cross_entropy, batches)
    frozen = _tanh_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        HessianOperator(frozen, F.cross_entropy, batches)
    op = HessianOperator(model, F.cross_entropy, batches)
    with pytest.raises(ValueError, match="numel"):
        op @ torch.ones(op.numel + 1, dtype=torch.float64)
