"""One conformance suite over every registered optimizer (torch's, pytorch-optimizer's and ours).

Each entry must: lower a convex quadratic (least squares through an ``nn.Linear``, so layer-aware
methods such as K-FAC see a real layer) and the Rosenbrock function from a fixed start; continue
bit-for-bit after a ``state_dict`` round trip; treat several parameter groups like one; skip parameters
whose gradient is ``None``; reject bad hyperparameters with ``ValueError``; and learn digits in a 1-epoch
``Trainer.fit`` under automatic optimization, judged by validation accuracy in eval mode on a BatchNorm
MLP, with the expected number of closure evaluations per step, the logged training loss equal to the
mean of the *first* evaluations' losses, and BatchNorm's running statistics updated once per step.

The last tests show that these checks fail on the pytorch-optimizer classes we replaced.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import pytorch_optimizer as po
import torch
from _support import make_closure
from lightning.pytorch import Trainer
from torch import nn

from lightning_optsurvey.optim import available_optimizers, create_optimizer, get_spec, registry
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

NAMES = available_optimizers()

#: Quadratic and Rosenbrock runs.
TOY_STEPS = 60
#: The quadratic must end below this fraction of its starting excess loss.
QUADRATIC_REDUCTION = 0.5
#: Rosenbrock must end below this fraction of its starting value (f(-1.5, 2) = 12.5 + 100 * 0.0625).
ROSENBROCK_REDUCTION = 0.9
#: After a 1-epoch fit the validation accuracy (eval mode, 10 classes) must reach at least this.
MIN_VAL_ACC = 0.5
STATE_STEPS_BEFORE, STATE_STEPS_AFTER = 4, 4

#: Hyperparameters for the toy problems where the digits defaults do not fit a problem of scale ~1.
TOY_KWARGS: dict[str, dict] = {
    "adadelta": {"lr": 10.0},
    "adagrad": {"lr": 0.3},
    "adam": {"lr": 0.05},
    "adamw": {"lr": 0.05, "weight_decay": 0.0},
    "amsgrad": {"lr": 0.05},
    "nadam": {"lr": 0.05},
    "radam": {"lr": 0.05},
    "rmsprop": {"lr": 0.01},
    "adabound": {"lr": 0.05},
    "adabelief": {"lr": 0.05},
    "yogi": {"lr": 0.05},
    "lamb": {"lr": 0.05},
    "lookahead": {"lr": 0.05},
    "lars": {"lr": 0.02, "trust_coefficient": 1.0},
    "sophiah": {"lr": 0.3},
    "entropy_sgd": {"lr": 1.0, "gamma": 0.3, "noise": 0.0},
    "kfac": {"lr": 0.02, "kl_clip": None},
    "lpf_sgd": {"lr": 0.02, "sigma": 0.001},
    "shampoo": {"lr": 0.02},
    "sgd": {"lr": 0.02},
    "momentum": {"lr": 0.005},
    "nesterov": {"lr": 0.005},
    "sam": {"lr": 0.005},
    "asam": {"lr": 0.005},
    "gsam": {"lr": 0.005},
    "svrg": {"lr": 0.02},
    "adahessian": {"lr": 0.1},
    "lbfgs": {"lr": 0.5},
}

#: Rosenbrock's curvature (up to ~1000) needs smaller steps for the plain gradient methods.
ROSEN_KWARGS: dict[str, dict] = {
    "sgd": {"lr": 1e-3}, "momentum": {"lr": 2e-4}, "nesterov": {"lr": 2e-4}, "sam": {"lr": 2e-4, "rho": 0.01},
    "asam": {"lr": 2e-4, "rho": 0.01}, "gsam": {"lr": 2e-4, "rho": 0.01}, "svrg": {"lr": 1e-3},
    "kfac": {"lr": 2e-4, "kl_clip": None}, "lpf_sgd": {"lr": 2e-4, "sigma": 1e-3},
    "entropy_sgd": {"lr": 0.01, "gamma": 1.0, "noise": 0.0, "inner_lr": 1e-3}, "shampoo": {"lr": 1e-3},
    "lars": {"lr": 2e-4},  # a 1-D parameter: LARS leaves it to plain momentum SGD
    "radam": {"lr": 0.002},
}

#: Out-of-range hyperparameters beyond lr=-1 that each entry must reject.
BAD_KWARGS: dict[str, list[dict]] = {
    "sgd": [{"momentum": -0.1}, {"weight_decay": -1.0}],
    "momentum": [{"momentum": -0.1}],
    "nesterov": [{"momentum": 0.0}],
    "adam": [{"betas": (1.5, 0.999)}, {"eps": -1.0}],
    "adamw": [{"betas": (0.9, 1.5)}],
    "amsgrad": [{"eps": -1.0}],
    "adagrad": [{"lr_decay": -1.0}],
    "rmsprop": [{"alpha": -0.5}],
    "adadelta": [{"rho": 1.5}],
    "nadam": [{"betas": (1.5, 0.999)}],
    "radam": [{"betas": (1.5, 0.999)}],
    "lbfgs": [],  # torch validates only lr
    "adabound": [{"betas": (1.5, 0.999)}],
    "adabelief": [{"betas": (1.5, 0.999)}],
    "yogi": [{"betas": (1.5, 0.999)}],
    "lars": [{"weight_decay": -1.0}],
    "lamb": [{"betas": (1.5, 0.999)}],
    "lookahead": [{"k": 0}, {"alpha": 1.5}, {"base": "sam"}, {"base": "nosuch"}],
    "adahessian": [{"hessian_power": 2.0}],
    "sophiah": [{"weight_decay": -1.0}],
    "shampoo": [{"precondition_every": 0}, {"eps": 0.0}, {"momentum": 1.0}, {"block_size": 0},
                {"statistics_every": 0}, {"graft": "adam"}, {"graft_eps": 0.0}],
    "sam": [{"rho": -0.1}, {"base": "lbfgs"}, {"base": "nosuch"}, {"momentum": -0.5}],
    "asam": [{"rho": -0.1}, {"eta": -1.0}],
    "gsam": [{"alpha": -1.0}, {"rho": -0.1}],
    "kfac": [{"damping": 0.0}, {"stat_decay": 1.0}, {"inv_every": 0}, {"kl_clip": 0.0}, {"momentum": 1.0}],
    "entropy_sgd": [{"inner_steps": 0}, {"gamma": 0.0}, {"alpha": 0.0}, {"noise": -1.0}],
    "lpf_sgd": [{"sigma": -0.1}, {"num_samples": 0}],
    "svrg": [{"momentum": 1.0}, {"weight_decay": -1.0}],
}
#: Values of the wrong type: TypeError under the package's one rule (lightning_optsurvey/validation.py).
BAD_TYPES = {
    "lpf_sgd": [{"sigma_schedule": 3}, {"num_samples": 2.0}],
    "shampoo": [{"graft": 3}, {"block_size": 128.0}],
    "lookahead": [{"pullback_momentum": 1}],
    "kfac": [{"inv_every": 10.0}, {"fisher": 1}, {"low_rank": "yes"}, {"config": 3}],
    "entropy_sgd": [{"inner_steps": 5.0}, {"nesterov": 1}],
}


def _toy_kwargs(name: str, rosen: bool = False) -> dict:
    return dict((ROSEN_KWARGS if rosen else {}).get(name, TOY_KWARGS.get(name, {})))


class LeastSquares(nn.Module):
    """f(W, b) = 0.5 mean ||X W^T + b - Y||^2 on fixed data: a convex quadratic through a real Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layer = nn.Linear(4, 3)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(3, 4, generator=gen))
            self.layer.bias.copy_(torch.randn(3, generator=gen))
        self.register_buffer("x", torch.randn(32, 4, generator=gen))
        self.register_buffer("y", torch.randn(32, 3, generator=gen))

    def forward(self) -> torch.Tensor:
        return 0.5 * (self.layer(self.x) - self.y).pow(2).sum(1).mean()

    def minimum(self) -> float:
        design = torch.cat([self.x, torch.ones(len(self.x), 1)], 1).double()
        solution = torch.linalg.lstsq(design, self.y.double()).solution
        return float(0.5 * (design @ solution - self.y.double()).pow(2).sum(1).mean())


class Rosenbrock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor([-1.5, 2.0]))

    def forward(self) -> torch.Tensor:
        x, y = self.xy
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _build(name: str, model: nn.Module, params=None, **kwargs):
    return create_optimizer(name, model.parameters() if params is None else params, model=model, **kwargs)


def _closure(name: str, opt, objective: Callable[[], torch.Tensor]):
    return make_closure(opt, objective, get_spec(name).create_graph)


def _run(name: str, model: nn.Module, opt, steps: int) -> None:
    for _ in range(steps):
        opt.step(_closure(name, opt, model))


@pytest.mark.parametrize("name", NAMES)
def test_lowers_a_convex_quadratic(name):
    model = LeastSquares()
    with torch.no_grad():
        start, best = float(model()), model.minimum()
    opt = _build(name, model, **_toy_kwargs(name))
    _run(name, model, opt, TOY_STEPS)
    with torch.no_grad():
        final = float(model())
    assert math.isfinite(final)
    assert final - best < QUADRATIC_REDUCTION * (start - best), (start, final, best)


@pytest.mark.parametrize("name", NAMES)
def test_lowers_rosenbrock(name):
    model = Rosenbrock()
    with torch.no_grad():
        start = float(model())
    opt = _build(name, model, **_toy_kwargs(name, rosen=True))
    _run(name, model, opt, TOY_STEPS)
    with torch.no_grad():
        final = float(model())
    assert math.isfinite(final) and final < ROSENBROCK_REDUCTION * start, (start, final)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    torch.manual_seed(0)  # global RNG: pytorch-optimizer's Hutchinson probes draw from it
    model = LeastSquares()
    opt = _build(name, model, **_toy_kwargs(name))
    _run(name, model, opt, STATE_STEPS_BEFORE)
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(opt.state_dict())
    twin_opt = _build(name, twin, **_toy_kwargs(name))
    twin_opt.load_state_dict(saved)
    rng = torch.get_rng_state()
    _run(name, model, opt, STATE_STEPS_AFTER)
    torch.set_rng_state(rng)
    _run(name, twin, twin_opt, STATE_STEPS_AFTER)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_behave_like_one_group(name):
    def trajectory(grouped: bool, bias_lr_scale: float = 1.0):
        torch.manual_seed(0)
        model = LeastSquares()
        kwargs = _toy_kwargs(name)
        if grouped:
            lr = kwargs.get("lr", get_spec(name).defaults.get("lr"))
            groups = [{"params": [model.layer.weight]},
                      {"params": [model.layer.bias], "lr": lr * bias_lr_scale}]
            opt = _build(name, model, params=groups, **kwargs)
        else:
            opt = _build(name, model, **kwargs)
        _run(name, model, opt, 5)
        return [p.detach().clone() for p in model.parameters()], opt

    if name == "lbfgs":
        with pytest.raises(ValueError, match="parameter groups|per-parameter"):
            trajectory(True)
        return
    single, _ = trajectory(False)
    grouped, opt = trajectory(True)
    assert len(opt.param_groups) == 2
    for a, b in zip(single, grouped):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    changed, opt = trajectory(True, bias_lr_scale=0.5)
    assert opt.param_groups[1]["lr"] == 0.5 * opt.param_groups[0]["lr"]
    assert not torch.equal(changed[1], single[1])


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_gradient_are_skipped(name):
    model = LeastSquares()
    model.unused = nn.Linear(2, 2)  # in the optimizer, never in the loss: grad stays None
    before = [p.detach().clone() for p in model.unused.parameters()]
    opt = _build(name, model, **_toy_kwargs(name))
    _run(name, model, opt, 3)
    for p, b in zip(model.unused.parameters(), before):
        assert p.grad is None and torch.equal(p, b)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameters_raise_value_error(name):
    for bad in [{"lr": -1.0}, *BAD_KWARGS.get(name, [])]:
        model = LeastSquares()
        with pytest.raises(ValueError):
            _build(name, model, **bad)
    for bad in BAD_TYPES.get(name, []):
        with pytest.raises(TypeError):
            _build(name, LeastSquares(), **bad)


def test_every_entry_has_a_reference_family_and_bad_values():
    for name in NAMES:
        spec = get_spec(name)
        assert spec.reference and spec.summary, name
        assert name in BAD_KWARGS, f"add out-of-range hyperparameters of {name!r} to BAD_KWARGS"
        assert name in TOY_KWARGS, f"add toy-problem hyperparameters of {name!r} to TOY_KWARGS"


# ---------------------------------------------------------------------------------------------- Lightning

def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def _expected_evaluations(name: str) -> int | None:
    """Closure evaluations per step from the spec's defaults (None: variable, as for L-BFGS)."""
    spec = get_spec(name)
    if not spec.needs_closure:
        return 1
    fixed = {"sam": 2, "asam": 2, "gsam": 2, "svrg": 2}
    if name in fixed:
        return fixed[name]
    if name == "entropy_sgd":
        return spec.defaults["inner_steps"]
    if name == "lpf_sgd":
        return spec.defaults["num_samples"]
    return None


class _Counting(ClassifierModule):
    """Records every training_step evaluation and the loss of the first one per batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evaluations = 0
        self.first_losses: list[float] = []
        self._this_batch = 0

    def on_train_batch_start(self, batch, batch_idx):
        self._this_batch = 0

    def training_step(self, batch, batch_idx):
        first = self._this_batch == 0
        self._this_batch += 1
        loss = super().training_step(batch, batch_idx)
        self.evaluations += 1
        if first:
            self.first_losses.append(float(loss))
        return loss


def fit_and_check(name: str, *, expected_evaluations: int | None, min_val_acc: float = MIN_VAL_ACC,
                  **optimizer_kwargs) -> dict:
    """1-epoch fit of a BatchNorm MLP on digits; raises AssertionError when the optimizer misbehaves."""
    torch.manual_seed(0)
    module = _Counting(bn_mlp(), optimizer=name, optimizer_kwargs=optimizer_kwargs)
    data = DigitsDataModule(batch_size=32, seed=0)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      deterministic=True)
    initial = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    logged = float(trainer.callback_metrics["train/loss"])
    final = trainer.validate(module, data, verbose=False)[0]
    steps = trainer.global_step
    assert steps > 0
    if expected_evaluations is not None:
        assert module.evaluations == expected_evaluations * steps, (
            f"{name}: {module.evaluations} training_step calls for {steps} steps, "
            f"expected {expected_evaluations} per step"
        )
    else:
        assert module.evaluations >= steps
    assert len(module.first_losses) == steps
    # Lightning's epoch mean weights each batch by its size; all train batches but the last have 32.
    sizes = [32] * (steps - 1) + [len(data.train_set) - 32 * (steps - 1)]
    expected_mean = sum(s * v for s, v in zip(sizes, module.first_losses)) / sum(sizes)
    assert logged == pytest.approx(expected_mean, rel=1e-5), (name, logged, expected_mean)
    bn = module.net[2]
    assert int(bn.num_batches_tracked) == steps, f"{name}: BatchNorm updated {int(bn.num_batches_tracked)} times"
    assert final["val/loss"] < initial["val/loss"], (name, initial, final)
    assert final["val/acc"] >= min_val_acc, f"{name}: val acc {final['val/acc']:.3f} after one epoch"
    return final


@pytest.mark.parametrize("name", NAMES)
def test_trainer_fit_learns_digits(name):
    fit_and_check(name, expected_evaluations=_expected_evaluations(name))


# ------------------------------------------------------------------ the checks catch the known failures

@pytest.fixture
def temporary_entry(monkeypatch):
    def add(spec: registry.OptimizerSpec) -> str:
        monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
        return spec.name

    return add


def test_suite_catches_pytorch_optimizer_sam_single_closure_call(temporary_entry):
    name = temporary_entry(registry.OptimizerSpec(
        "po_sam", lambda params, lr=0.05: po.SAM(params, torch.optim.SGD, lr=lr, momentum=0.9),
        "landscape", needs_closure=True, reference="test", summary="test"))
    with pytest.raises(AssertionError, match="expected 2 per step"):
        fit_and_check(name, expected_evaluations=2)


def test_suite_catches_pytorch_optimizer_adahessian_default_eps(temporary_entry):
    name = temporary_entry(registry.OptimizerSpec(
        "po_adahessian", lambda params, lr=0.1: po.AdaHessian(params, lr=lr), "second_order",
        create_graph=True, reference="test", summary="test"))
    with pytest.raises(AssertionError):
        fit_and_check(name, expected_evaluations=1)


def test_suite_catches_pytorch_optimizer_shampoo(temporary_entry):
    name = temporary_entry(registry.OptimizerSpec(
        "po_shampoo", lambda params, lr=0.05: po.Shampoo(params, lr=lr, momentum=0.9,
                                                          preconditioning_compute_steps=10),
        "second_order", reference="test", summary="test"))
    with pytest.raises((AssertionError, RuntimeError)):  # diverges; may end in a failed SVD on NaNs
        fit_and_check(name, expected_evaluations=1)


def test_pytorch_optimizer_gsam_needs_model_and_rho_scheduler():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="model|rho_scheduler"):
        po.GSAM(model.parameters(), base_optimizer=torch.optim.SGD)  # what create_optimizer would do


def test_lookahead_takes_a_base_name_not_a_composite_string():
    model = LeastSquares()
    opt = create_optimizer("lookahead", model.parameters(), base="sgd", lr=0.01, k=3)
    assert opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer("lookahead_adam", model.parameters())


def test_create_graph_is_honoured_in_the_fit():
    # AdaHessian's Hutchinson products need a graph on the gradient; without it autograd raises.
    model = LeastSquares()
    opt = create_optimizer("adahessian", model.parameters())
    opt.zero_grad()
    model().backward()
    with pytest.raises(RuntimeError):
        opt.step()
