"""SAM, ASAM and GSAM: closed-form steps, degenerate cases, one set of groups, and Lightning behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from _support import make_closure, quiet_trainer
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.optim import GSAM, SAM, create_optimizer
from lightning_optsurvey.tasks import ClassifierModule

DTYPE = torch.float64
#: Float64 reference formulas vs the optimizer's foreach arithmetic.
REF_TOL = 1e-12


def _quadratic(seed: int = 0, n: int = 5):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=DTYPE)
    a = m @ m.T + torch.eye(n, dtype=DTYPE)
    b = torch.randn(n, generator=gen, dtype=DTYPE)
    w0 = torch.randn(n, generator=gen, dtype=DTYPE)
    return a, b, w0


def _grad(a, b, w):
    return a @ w - b


def _closure(opt, params, a, b, counter=None):
    def loss():
        if counter is not None:
            counter.append(1)
        w = params[0]
        return 0.5 * w @ a @ w - b @ w

    return make_closure(opt, loss)


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_matches_the_closed_form(adaptive):
    a, b, w0 = _quadratic()
    rho, eta, lr = 0.3, 0.01, 0.05
    w = nn.Parameter(w0.clone())
    opt = SAM([w], base="sgd", rho=rho, adaptive=adaptive, eta=eta, lr=lr)
    calls: list[int] = []
    opt.step(_closure(opt, [w], a, b, calls))
    g = _grad(a, b, w0)
    t = (w0.abs() + eta) if adaptive else torch.ones_like(w0)
    e = rho * t**2 * g / torch.linalg.vector_norm(t * g)
    expected = w0 - lr * _grad(a, b, w0 + e)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=REF_TOL)
    assert len(calls) == 2


def test_gsam_step_matches_the_closed_form():
    a, b, w0 = _quadratic(1)
    rho, alpha, lr = 0.2, 0.4, 0.05
    w = nn.Parameter(w0.clone())
    opt = GSAM([w], base="sgd", rho=rho, alpha=alpha, lr=lr)
    opt.step(_closure(opt, [w], a, b))
    g = _grad(a, b, w0)
    gp = _grad(a, b, w0 + rho * g / g.norm())
    g_perp = g - (g @ gp) / (gp @ gp) * gp
    expected = w0 - lr * (gp - alpha * g_perp)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=REF_TOL)


@pytest.mark.parametrize("base,kwargs,torch_cls", [
    ("momentum", {"lr": 0.05, "momentum": 0.9}, torch.optim.SGD),
    ("adam", {"lr": 0.01}, torch.optim.Adam),
    (torch.optim.RMSprop, {"lr": 0.01}, torch.optim.RMSprop),
])
def test_rho_zero_is_the_base_optimizer(base, kwargs, torch_cls):
    a, b, w0 = _quadratic(2)
    w_sam, w_ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    sam = SAM([w_sam], base=base, rho=0.0, **kwargs)
    ref = torch_cls([w_ref], **kwargs)
    for _ in range(10):
        sam.step(_closure(sam, [w_sam], a, b))
        ref.step(_closure(ref, [w_ref], a, b))
    assert torch.equal(w_sam, w_ref)


def test_gsam_alpha_zero_is_sam():
    a, b, w0 = _quadratic(3)
    w1, w2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    sam, gsam = SAM([w1], base="momentum", rho=0.1), GSAM([w2], base="momentum", rho=0.1, alpha=0.0)
    for _ in range(5):
        sam.step(_closure(sam, [w1], a, b))
        gsam.step(_closure(gsam, [w2], a, b))
    assert torch.equal(w1, w2)


def test_one_set_of_groups_and_state_only_in_self_state():
    net = nn.Linear(3, 2)
    opt = SAM(net.parameters(), base="adam", rho=0.05, lr=0.01)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["rho"] == 0.05

    closure = make_closure(opt, lambda: net(torch.ones(4, 3)).pow(2).mean())
    opt.step(closure)
    # Adam's moments are in SAM's own state; nothing SAM-specific survives a step.
    assert {k for s in opt.state.values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
    # A scheduler (or a user) changing the lr changes what the base uses.
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in net.parameters()]
    opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    # load_state_dict rebinds the groups: the base must follow.
    fresh = SAM(net.parameters(), base="adam", rho=0.05, lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["lr"] == 0.0
    fresh.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    extra = nn.Parameter(torch.zeros(2))
    fresh.add_param_group({"params": [extra], "lr": 0.5})
    assert fresh.param_groups[1]["rho"] == 0.05 and fresh.param_groups[1]["betas"] == (0.9, 0.999)


def test_step_without_closure_is_an_error():
    opt = SAM(nn.Linear(2, 1).parameters())
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_bad_bases_are_rejected():
    params = list(nn.Linear(2, 1).parameters())
    with pytest.raises(ValueError, match="lbfgs"):
        SAM(params, base="lbfgs")
    with pytest.raises(TypeError, match="base"):
        SAM(params, base=3)
    with pytest.raises(TypeError, match="does not take"):
        SAM(params, base="sgd", nosuch=1)


# ------------------------------------------------------------------------------------------- Lightning

def _data(n: int = 64, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def _trainer(**kwargs) -> Trainer:
    return quiet_trainer(max_epochs=1, num_sanity_val_steps=0, deterministic=True, **kwargs)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def test_batchnorm_statistics_come_from_the_first_pass_only():
    net = _bn_net()
    reference = copy.deepcopy(net).train()
    loader = _data()
    module = ClassifierModule(net, optimizer="sam", optimizer_kwargs={"rho": 0.5})
    _trainer(limit_train_batches=1).fit(module, loader)
    x, _ = next(iter(loader))
    with torch.no_grad():
        reference(x)  # one training forward at the initial weights
    bn, ref_bn = net[2], reference[2]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=1e-7)


def test_gradient_clipping_applies_to_the_descent_gradient():
    clip, lr = 1e-3, 0.1
    net = _bn_net()
    before = [p.detach().clone() for p in net.parameters()]
    module = ClassifierModule(net, optimizer="sam", optimizer_kwargs={"base": "sgd", "lr": lr, "rho": 0.05})
    _trainer(limit_train_batches=1, gradient_clip_val=clip).fit(module, _data())
    moved = torch.linalg.vector_norm(torch.cat([(p - q).flatten() for p, q in zip(net.parameters(), before)]))
    assert 0 < moved <= lr * clip * (1 + 1e-5)


def test_gradient_accumulation_is_refused_with_a_clear_error():
    module = ClassifierModule(_bn_net(), optimizer="sam")
    with pytest.raises(ValueError, match="accumulat"):
        _trainer(limit_train_batches=2, accumulate_grad_batches=2).fit(module, _data())


def test_registry_builds_the_family():
    params = list(nn.Linear(2, 1).parameters())
    assert isinstance(create_optimizer("sam", params), SAM)
    asam = create_optimizer("asam", params)
    assert asam.param_groups[0]["adaptive"] is True
    assert isinstance(create_optimizer("gsam", params, base="adam", lr=1e-3), GSAM)


def test_fp16_amp_is_refused_for_closure_methods():
    from types import SimpleNamespace

    from lightning_optsurvey.callbacks import OptimizerLoopAdapter

    module = ClassifierModule(_bn_net(), optimizer="sam")
    adapter = OptimizerLoopAdapter()
    trainer = SimpleNamespace(precision="16-mixed", accumulate_grad_batches=1, callbacks=[adapter],
                              optimizers=[module.configure_optimizers()])
    with pytest.raises(ValueError, match="bf16-mixed"):
        adapter.on_fit_start(trainer, module)
    trainer.precision = "bf16-mixed"
    adapter.on_fit_start(trainer, module)
    adapter.teardown(trainer, module, "fit")
