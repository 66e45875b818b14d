"""K-FAC: factors against direct computation, the preconditioned step against a dense Kronecker solve,
the identity-factor degenerate case, hook discipline, ill-conditioned least squares, Lightning resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _support import make_closure
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks._measure import measuring
from lightning_optsurvey.optim import KFAC, KFACConfig
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

DTYPE = torch.float64
#: Float64 products of a few small matrices.
TOL = 1e-10


def _batch(seed: int = 0, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n,), generator=gen)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(50, 3)).double()


def _closure(opt, net, x, y, extra_forwards: int = 0):
    def loss():
        out = F.cross_entropy(net(x), y)
        for _ in range(extra_forwards):  # e.g. a callback measuring something inside the closure
            F.cross_entropy(net(2 * x), y).backward()
            opt.zero_grad()
        return out

    return make_closure(opt, loss)


def _reference_factors(net, x, y):
    """A and G of both layers computed directly: patches by slicing, output gradients by autograd."""
    conv, linear = net[0], net[3]
    batch = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    rows = [torch.cat([padded[i, :, r:r + 3, c:c + 3].flatten(), torch.ones(1, dtype=DTYPE)])
            for i in range(batch) for r in range(5) for c in range(5)]
    a_conv = torch.stack(rows)
    conv_out = conv(x)
    hidden = net[2](net[1](conv_out))
    logits = linear(hidden)
    loss = F.cross_entropy(logits, y)
    g_conv, g_lin = torch.autograd.grad(loss, [conv_out, logits])
    d_conv = (g_conv * batch).permute(0, 2, 3, 1).reshape(-1, 2)
    d_lin = g_lin * batch
    a_lin = torch.cat([hidden, torch.ones(batch, 1, dtype=DTYPE)], 1).detach()
    return {
        "conv": (a_conv.T @ a_conv / batch, d_conv.T @ d_conv / d_conv.shape[0]),
        "linear": (a_lin.T @ a_lin / batch, d_lin.T @ d_lin / batch),
    }


def test_factors_match_direct_computation_and_ignore_extra_forwards():
    net = _net()
    x, y = _batch()
    reference = _reference_factors(net, x, y)
    opt = KFAC(net, lr=0.1, momentum=0.0, stat_decay=0.5, kl_clip=None)
    opt.step(_closure(opt, net, x, y, extra_forwards=2))
    for key, layer in (("conv", net[0]), ("linear", net[3])):
        state = opt.state[layer.weight]
        torch.testing.assert_close(state["A"], reference[key][0], rtol=0, atol=TOL)
        torch.testing.assert_close(state["G"], reference[key][1], rtol=0, atol=TOL)


def test_step_is_the_dense_kronecker_solve():
    net = _net()
    x, y = _batch(1)
    lr, damping = 0.3, 0.05
    layer = net[3]
    w0 = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().clone()
    reference = _reference_factors(net, x, y)["linear"]
    opt = KFAC(net, lr=lr, momentum=0.0, damping=damping, kl_clip=None, pi_correction=False)
    closure = _closure(opt, net, x, y)
    opt.step(closure)
    # gradient at w0 (closure ran at w0)
    grad = None
    net_copy = _net()
    logits = net_copy(x)
    loss = F.cross_entropy(logits, y)
    gw, gb = torch.autograd.grad(loss, [net_copy[3].weight, net_copy[3].bias])
    grad = torch.cat([gw, gb[:, None]], 1)
    a, g = reference
    root = math.sqrt(damping)
    kron = torch.kron(a + root * torch.eye(len(a), dtype=DTYPE), g + root * torch.eye(len(g), dtype=DTYPE))
    # vec is column-major: vec(G^-1 X A^-1) = (A^-1 kron G^-1) vec(X)
    v = torch.linalg.solve(kron, grad.T.reshape(-1)).reshape(grad.shape[1], grad.shape[0]).T
    w1 = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
    torch.testing.assert_close(w1, w0 - lr * v, rtol=0, atol=1e-9)


def test_identity_factors_are_sgd_with_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    ref.load_state_dict(net.state_dict())
    kfac = KFAC(net, lr=0.1, momentum=0.9, damping=1.0, kl_clip=None, weight_decay=1e-3)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 4, generator=gen)
        for model, opt in ((net, kfac), (ref, sgd)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()  # outside capture(): no statistics, factors stay zero
            opt.step()
    assert not any("A" in s for s in kfac.state.values() if isinstance(s, dict))
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_monte_carlo_fisher_uses_targets_sampled_from_the_model():
    net = _net()
    x, y = _batch(2)
    opt = KFAC(net, lr=0.1, kl_clip=None, fisher="mc", seed=7)

    def closure():
        opt.zero_grad()
        logits = net(x)
        opt.sample_fisher(logits, "categorical")
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss

    with torch.no_grad():
        probs = torch.softmax(_net()(x), -1)
    sampled = torch.multinomial(probs.float(), 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    delta = probs - F.one_hot(sampled, 3).to(DTYPE)  # per-sample d(CE)/d(logits) at the sampled targets
    opt.step(closure)
    torch.testing.assert_close(opt.state[net[3].weight]["G"], delta.T @ delta / len(x), rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="likelihood"):
        opt.sample_fisher(net(x), "poisson")


@pytest.mark.parametrize("edit", ["none", "clip", "noise"])
def test_low_rank_path_equals_the_dense_path(edit, monkeypatch):
    taken: list[bool] = []
    original = KFAC._low_rank

    def spy(*args):
        out = original(*args)
        taken.append(out is not None and bool(out[3]))  # the factors and whether the check passed
        return out

    monkeypatch.setattr(KFAC, "_low_rank", staticmethod(spy))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 10, (8,), generator=gen)
    results = []
    for low_rank in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10)).double()
        opt = KFAC(net, lr=0.1, low_rank=low_rank, inv_every=2, weight_decay=1e-3)
        noise = torch.Generator().manual_seed(1)

        def closure(net=net, opt=opt, noise=noise):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if edit == "clip":  # what norm clipping does: a common scale
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
            elif edit == "noise":  # anything else: the gradient is no longer the batch's
                for p in net.parameters():
                    p.grad.add_(1e-3 * torch.randn(p.shape, generator=noise, dtype=DTYPE))
            return loss

        for _ in range(4):
            opt.step(closure)
        results.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # the first layer qualifies (2 * 8 < min(64, 256)); the last (10 outputs) never does
    assert any(taken) == (edit != "noise")


def test_hooks_are_inactive_outside_the_step_closure():
    net = _net()
    x, y = _batch()
    opt = KFAC(net, stat_every=1)
    opt.step(_closure(opt, net, x, y))  # attaches the hooks
    before = {f"{i}{k}": opt.state[m.weight][k].clone() for i, m in enumerate((net[0], net[3])) for k in "AG"}
    F.cross_entropy(net(2 * x), y).backward()  # a plain training forward/backward
    net.eval()
    with torch.no_grad():
        net(x)  # validation
    net.train()
    assert opt._pending == {}
    after = {f"{i}{k}": opt.state[m.weight][k] for i, m in enumerate((net[0], net[3])) for k in "AG"}
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_conv_with_unsupported_options_gets_a_plain_step():
    net = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2 * 3 * 3, 1))
    opt = KFAC(net)
    assert opt._layers == [net[2]]


def _least_squares(cond: float = 1e4, n: int = 256, d: int = 8, noise: float = 0.5):
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    scales = torch.logspace(0, math.log10(cond) / 2, d, dtype=DTYPE)  # singular values: eigs span cond
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    x = (x - x.mean(0)) / x.std(0)
    x = x @ torch.diag(scales) @ q.T
    w_star = torch.randn(d, 1, generator=gen, dtype=DTYPE)
    y = x @ w_star + noise * torch.randn(n, 1, generator=gen, dtype=DTYPE)
    hessian = x.T @ x / n
    solution = torch.linalg.solve(hessian, x.T @ y / n)
    f_star = float(0.5 * (x @ solution - y).pow(2).mean())
    return x, y, hessian, f_star


def _steps_to_tolerance(make_opt, x, y, f_star, budget, rel_tol=1e-6):
    model = nn.Linear(x.shape[1], 1, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = make_opt(model)
    sample_fisher = getattr(opt, "sample_fisher", None)

    def loss_fn():
        out = model(x)
        if sample_fisher is not None:
            sample_fisher(out, "gaussian")  # the Fisher of a squared loss: Gauss-Newton
        return 0.5 * (out - y).pow(2).mean()

    with torch.no_grad():
        f0 = float(loss_fn())

    closure = make_closure(opt, loss_fn)
    for step in range(1, budget + 1):
        opt.step(closure)
        with torch.no_grad():
            gap = float(loss_fn()) - f_star
        if not math.isfinite(gap):
            return None
        if gap <= rel_tol * (f0 - f_star):
            return step
    return None


#: K-FAC must reach the tolerance within this many steps; SGD gets SGD_FACTOR times as many per step size.
KFAC_STEP_BUDGET = 30
SGD_FACTOR = 100


def test_kfac_beats_sgd_at_its_best_step_size_on_ill_conditioned_least_squares():
    x, y, hessian, f_star = _least_squares()
    eigs = torch.linalg.eigvalsh(hessian)
    assert float(eigs[-1] / eigs[0]) >= 1e3
    kfac_steps = _steps_to_tolerance(
        lambda m: KFAC(m, lr=1.0, momentum=0.0, damping=1e-8, inv_every=1, kl_clip=None, fisher="mc",
                       pi_correction=False),
        x, y, f_star, budget=KFAC_STEP_BUDGET)
    assert kfac_steps is not None
    # SGD: the optimal constant step 2/(L+mu), and a grid up to the stability limit 2/L.
    lam_max, lam_min = float(eigs[-1]), float(eigs[0])
    grid = [2 / (lam_max + lam_min)] + [c / lam_max for c in (0.5, 1.0, 1.5, 1.9)]
    budget = SGD_FACTOR * kfac_steps
    for lr in grid:
        sgd_steps = _steps_to_tolerance(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr),
                                        x, y, f_star, budget=budget)
        assert sgd_steps is None, (lr, sgd_steps, kfac_steps)


def test_empirical_fisher_is_not_gauss_newton_on_least_squares():
    # Its G is the mean squared residual, so each step moves by lr / (2 loss) along the Newton
    # direction: from a far start it crawls where the Monte-Carlo Fisher converges.
    x, y, _, f_star = _least_squares()
    steps = _steps_to_tolerance(
        lambda m: KFAC(m, lr=1.0, momentum=0.0, damping=1e-8, inv_every=1, kl_clip=None, pi_correction=False),
        x, y, f_star, budget=KFAC_STEP_BUDGET)
    assert steps is None


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_registry_passes_the_model_and_classifier_module_trains_with_it(fisher):
    module = ClassifierModule("mlp", optimizer="kfac", optimizer_kwargs={"fisher": fisher})
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DigitsDataModule())
    opt = trainer.optimizers[0]
    assert isinstance(opt, KFAC)
    assert all("A_inv" in opt.state[m.weight] for m in opt._layers)
    assert opt.state["kfac"]["step"] == 3


# ------------------------------------------------------------------------ resume under Lightning (ours)

def _loader() -> DataLoader:
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.train_set.tensors
    return DataLoader(TensorDataset(x[:160], y[:160]), batch_size=32, shuffle=False)


def _fit(optimizer: str, epochs: int, tmp_path, ckpt_path=None, save=False):
    torch.manual_seed(0)
    module = ClassifierModule("cnn_bn", optimizer=optimizer)
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if save else []
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=save,
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, deterministic=True)
    trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("optimizer", ["kfac", "sam", "entropy_sgd", "lpf_sgd", "svrg", "shampoo"])
def test_resume_mid_run_gives_the_same_trajectory(optimizer, tmp_path):
    straight = _fit(optimizer, 2, tmp_path / "a")
    _fit(optimizer, 1, tmp_path / "b", save=True)
    resumed = _fit(optimizer, 2, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q), optimizer


def test_diverged_factors_raise_a_clear_error():
    net = nn.Linear(3, 2)
    opt = KFAC(net)

    with pytest.raises(FloatingPointError, match="diverged"):
        opt.step(make_closure(opt, lambda: net(torch.full((4, 3), float("nan"))).sum()))


def test_inverse_refresh_tells_overflowing_sums_from_non_finite_factors():
    # The refresh checks finiteness through each factor's sum; a finite factor whose sum overflows
    # must still be inverted, and a factor with a nan or an inf anywhere must still be refused.
    huge = torch.diag(torch.tensor([3e38, 3e38, 1.0]))
    assert not torch.isfinite(huge.sum())
    (inverse,) = KFAC._damped_inverses([(huge, 0.5)])
    torch.testing.assert_close(inverse, torch.diag(1 / torch.tensor([3e38, 3e38, 1.5])))
    for bad in (float("nan"), float("inf")):
        broken = torch.eye(3)
        broken[2, 0] = broken[0, 2] = bad
        assert KFAC._damped_inverses([(torch.eye(2), 0.1), (broken, 0.1)]) is None


class _Meddler(Callback):
    """Runs extra training-mode forward/backward passes where measuring callbacks run, and inside the
    closure (after its backward), as a callback hooked on on_before_optimizer_step would."""

    def _poke(self, pl_module) -> None:
        with measuring(pl_module.net) as net:
            net.train()
            x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
            F.cross_entropy(net(3 * x), torch.zeros(16, dtype=torch.long)).backward()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._poke(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._poke(pl_module)


def test_measuring_and_extra_passes_leave_the_factors_alone():
    states = []
    for callbacks in ([], [_Meddler()]):
        torch.manual_seed(0)
        module = ClassifierModule("cnn", optimizer="kfac", optimizer_kwargs={"inv_every": 2, "stat_every": 1})
        trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu",
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
        trainer.fit(module, _loader())
        opt = trainer.optimizers[0]
        factors = {f"{i}{k}": opt.state[m.weight][k].clone() for i, m in enumerate(opt._layers) for k in "AG"}
        params = {f"p{i}": p.detach().clone() for i, p in enumerate(module.parameters())}
        states.append(factors | params)
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


#: Unit round-off of bfloat16 (8 significand bits): storing the new weights may move each by this, relatively.
BF16_UNIT = 2.0**-8
#: Relative error of the bfloat16 step itself (factors and gradients accumulated in bfloat16).
BF16_RTOL = 2e-2


def test_bfloat16_parameters_step_like_float64():
    # Cholesky/eigh have no half-precision kernels: the inverses must still be computed (in float32).
    x, y = _batch(5)
    low = _net().to(torch.bfloat16)
    reference = _net()
    reference.load_state_dict({k: v.double() for k, v in low.state_dict().items()})  # same rounded start
    start = [p.detach().double() for p in low.parameters()]
    for net, data in ((reference, x.to(torch.bfloat16).double()), (low, x.to(torch.bfloat16))):
        opt = KFAC(net, lr=0.1, momentum=0.0, damping=0.1, kl_clip=None, inv_every=1)
        opt.step(_closure(opt, net, data, y))
    for p0, p, q in zip(start, reference.parameters(), low.parameters()):
        assert q.dtype == torch.bfloat16
        step, low_step = p.detach() - p0, q.detach().double() - p0
        error = torch.linalg.vector_norm(low_step - step)
        bound = BF16_RTOL * torch.linalg.vector_norm(step) + BF16_UNIT * torch.linalg.vector_norm(p.detach())
        assert error <= bound, (error, bound)


def _autocast_closure(opt, net, x, y, dtype):
    def loss():
        with torch.autocast("cpu", dtype=dtype):
            return F.cross_entropy(net(x), y)

    return make_closure(opt, loss)


def test_bf16_autocast_keeps_the_statistics_in_the_weights_dtype():
    # precision="bf16-mixed": activations and output gradients are bf16, the weights and gradients float32.
    net = _net().float()
    x, y = _batch(3)
    reference = _reference_factors(_net(), x, y)
    opt = KFAC(net, lr=0.1, momentum=0.0, damping=0.1, kl_clip=None, inv_every=1)
    opt.step(_autocast_closure(opt, net, x.float(), y, torch.bfloat16))
    for key, layer in (("conv", net[0]), ("linear", net[3])):
        state = opt.state[layer.weight]
        for name, expected in zip(("A", "G"), reference[key]):
            assert state[name].dtype == torch.float32 and state[f"{name}_inv"].dtype == torch.float32
            error = torch.linalg.matrix_norm(state[name].double() - expected)
            assert error <= 0.03 * torch.linalg.matrix_norm(expected), (key, name, error)  # bf16 rounding
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in net.parameters())


def test_float16_autocast_is_refused_at_the_first_forward():
    net = _net().float()
    x, y = _batch(3)
    opt = KFAC(net, lr=0.1)
    with pytest.raises(RuntimeError, match=r"loss scale; use precision='bf16-mixed' or 32-bit"):
        opt.step(_autocast_closure(opt, net, x.float(), y, torch.float16))


# ------------------------------------------------------------------ issue 14: config, groups, hooks


class _KFACModule(LightningModule):
    """A user module whose K-FAC options come from the YAML as one typed section."""

    def __init__(self, kfac: KFACConfig = KFACConfig()) -> None:  # noqa: B008 (frozen dataclass)
        super().__init__()
        self.kfac = kfac
        self.net = nn.Linear(4, 2)

    def configure_optimizers(self):
        return KFAC(self.net, self.kfac)


def test_kfac_config_comes_from_a_yaml_through_lightning_cli(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  kfac:\n    lr: 0.2\n    inv_every: 7\n    kl_clip: null\n    fisher: mc\n")
    cli = LightningCLI(_KFACModule, run=False, args=["--config", str(config)], save_config_callback=None,
                       trainer_defaults={"logger": False, "enable_checkpointing": False})
    assert cli.model.kfac == KFACConfig(lr=0.2, inv_every=7, kl_clip=None, fisher="mc")
    opt = cli.model.configure_optimizers()
    assert opt.param_groups[0]["inv_every"] == 7 and opt.defaults["fisher"] == "mc"
    config.write_text("model:\n  kfac:\n    inv_every: 0\n")
    with pytest.raises((SystemExit, ValueError)):
        LightningCLI(_KFACModule, run=False, args=["--config", str(config)], save_config_callback=None)


def test_docstrings_keep_their_latex():
    # A "\\nabla" or "\\top" written through an escaping editor becomes a newline or a tab in the source.
    import lightning_optsurvey.optim.kfac as kfac_module

    for doc in (KFACConfig.__doc__, KFAC.__doc__, KFAC._low_rank.__doc__, kfac_module.__doc__):
        assert not any(c in doc for c in "\t\r\x0b\x0c\x07\x08"), doc
    assert r":math:`\nabla W = \Delta^\top [X, 1]`" in KFACConfig.__doc__


def test_kfac_config_is_validated_and_accepts_a_mapping_with_overrides():
    net = nn.Linear(3, 2)
    opt = KFAC(net, {"damping": 0.5, "inv_every": 3}, inv_every=4)
    assert opt.config == KFACConfig(damping=0.5, inv_every=4)
    assert opt.param_groups[0]["damping"] == 0.5 and opt.param_groups[0]["inv_every"] == 4
    with pytest.raises(TypeError, match="inv_every"):
        KFACConfig(inv_every=2.0)
    with pytest.raises(ValueError, match="stat_decay"):
        KFACConfig(stat_decay=1.0)
    with pytest.raises(TypeError, match="'eps'"):
        KFAC(net, eps=0.1)
    with pytest.raises(TypeError, match="model"):
        KFAC([nn.Parameter(torch.ones(1))])


def test_editing_a_groups_option_takes_effect_and_is_checked():
    """Per-group options are read from the groups at every step (a scheduler may change them)."""
    x, y = _batch()
    runs = []
    for edit in (False, True):
        net = _net()
        opt = KFAC(net, stat_every=1, inv_every=1, damping=1e-3 if edit else 0.5)
        if edit:
            opt.param_groups[0]["damping"] = 0.5
        for _ in range(2):
            opt.step(_closure(opt, net, x, y))
        runs.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match="momentum"):
        opt.step(_closure(opt, net, x, y))


def test_statistics_hooks_are_attached_when_training_starts():
    net = _net()
    opt = KFAC(net)
    hooked = [m for m in net.modules() if m._forward_hooks]
    assert hooked == []  # the constructor touches nothing
    x, y = _batch()
    opt.step(_closure(opt, net, x, y))
    assert {m for m in net.modules() if m._forward_hooks} == {net[0], net[3]}
    opt.remove_hooks()
    assert not any(m._forward_hooks for m in net.modules())
