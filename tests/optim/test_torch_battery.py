"""PyTorch's generic optimizer tests, ported and run over every registry entry.

A port of the generic tests of ``test/test_optim.py`` (``TestOptimRenewed``, driven by
``torch.testing._internal.common_optimizers``): the ones that need no CUDA and test no torch internals
(fused/foreach kernels, capturable, compile, sparse gradients). They are parametrized over
``available_optimizers()`` through the registry's specs (a closure where ``needs_closure``, a
``create_graph`` backward where ``create_graph``, the module where ``needs_model``), with
``torch.optim.Adam`` and ``torch.optim.SGD`` built directly as controls. A difference an entry declares on
its spec (``OptimizerSpec.deviations``) is checked as declared (for example "complex parameters are
rejected with a ValueError") instead of being skipped. Tests added beyond torch's: the gradients the
closure computed are left in ``.grad``; ``maximize`` works per group; ``add_param_group`` then ``step``;
a deep copy or pickle continues the trajectory; the registry's float-hyperparameter rule.

Hyperparameters are the registry defaults with a small learning rate (``BATTERY_KWARGS``), as torch's
``optim_inputs`` use small ones for its toy problem; variants (``maximize``, ``weight_decay``) are added
where the optimizer takes them, as torch's inputs do.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _support import make_closure
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lightning_optsurvey.optim import available_optimizers, create_optimizer, get_spec
from lightning_optsurvey.optim.registry import DEVIATIONS

#: Toy-problem hyperparameters (the registry defaults are tuned for digits; torch's inputs use small lr).
BATTERY_KWARGS: dict[str, dict[str, Any]] = {
    "lbfgs": {},
    "adadelta": {"lr": 1.0},
    "entropy_sgd": {"lr": 0.1, "gamma": 0.3, "inner_lr": 0.01},
    "kfac": {"lr": 1e-3, "kl_clip": None},
}
DEFAULT_LR = 1e-3

#: The torch flags a state dict saved by an older release lacks (common_optimizers' not_og_supported_flags).
NEWER_FLAGS = ("foreach", "differentiable", "maximize", "capturable", "fused", "decoupled_weight_decay")


@dataclass(frozen=True)
class Subject:
    """One optimizer under test: a registry entry, or a torch control built directly."""

    name: str

    @property
    def control(self) -> type[torch.optim.Optimizer] | None:
        return {"control_adam": torch.optim.Adam, "control_sgd": torch.optim.SGD}.get(self.name)

    @property
    def needs_closure(self) -> bool:
        return self.control is None and get_spec(self.name).needs_closure

    @property
    def create_graph(self) -> bool:
        return self.control is None and get_spec(self.name).create_graph

    @property
    def deviations(self) -> dict[str, str]:
        return {} if self.control is not None else dict(get_spec(self.name).deviations)

    def build(self, params: Any, model: nn.Module | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        if self.control is not None:
            return self.control(params, **{"lr": DEFAULT_LR, **kwargs})
        base = BATTERY_KWARGS.get(self.name, {"lr": DEFAULT_LR})
        return create_optimizer(self.name, params, model=model, **{**base, **kwargs})

    def takes(self, key: str) -> bool:
        probe = nn.Linear(1, 1)
        return key in self.build(probe.parameters(), model=probe).defaults

    def __str__(self) -> str:
        return self.name


SUBJECTS = [Subject(n) for n in [*available_optimizers(), "control_adam", "control_sgd"]]


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (Hutchinson probes draw from it), whatever ran before."""
    torch.manual_seed(0)


def _toy(contiguous: bool = True, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """torch's problem, ``(W x + b)^2`` summed, through a real ``nn.Linear`` (K-FAC needs a layer)."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(5, 10)
    with torch.no_grad():
        if contiguous:
            layer.weight = nn.Parameter(torch.randn(10, 5, generator=gen))
            layer.bias = nn.Parameter(torch.randn(10, generator=gen))
        else:
            layer.weight = nn.Parameter(torch.randn(10, 5, 2, generator=gen)[..., 0])
            layer.bias = nn.Parameter(torch.randn(10, 2, generator=gen)[..., 0])
    return layer, torch.randn(1, 5, generator=gen)


def _closure(subject: Subject, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]):
    return make_closure(opt, loss_fn, subject.create_graph)


def _step(subject: Subject, opt: torch.optim.Optimizer, closure: Callable[[], Any]) -> Any:
    """As torch's tests: ``step(closure)`` where a closure is required, else ``closure(); step()``."""
    if subject.needs_closure:
        return opt.step(closure)
    loss = closure()
    opt.step()
    return loss


def _set_grads(subject: Subject, params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Set ``.grad`` to ``values``; for a ``create_graph`` entry with the graph its spec asks for."""
    if not subject.create_graph:
        for p, v in zip(params, values):
            p.grad = v.clone()
        return
    for p in params:
        p.grad = None
    loss = sum((v * p).sum() + 0.0 * (p * p).sum() for p, v in zip(params, values))
    loss.backward(create_graph=True)


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality of state dicts (tensors to float tolerance, everything else exactly)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), (path, a, b)
        torch.testing.assert_close(a, b, msg=lambda m: f"{path}: {m}")
    else:
        assert a == b, (path, a, b)


def _fork_rng(subject: Subject) -> bool:
    return "global_rng" in subject.deviations


# ------------------------------------------------------------------------------- direction and groups

def _goes_right_direction(subject: Subject, contiguous: bool, with_lrsched: bool) -> None:
    variants: list[dict[str, Any]] = [{}]
    if subject.takes("maximize"):
        variants.append({"maximize": True})
    if subject.takes("weight_decay"):
        variants.append({"weight_decay": 0.1})
    for kwargs in variants:
        layer, x = _toy(contiguous)
        opt = subject.build(layer.parameters(), model=layer, **kwargs)
        schedulers = [StepLR(opt, gamma=0.9, step_size=10), ReduceLROnPlateau(opt)] if with_lrsched else []
        closure = _closure(subject, opt, lambda layer=layer, x=x: layer(x).pow(2).sum())
        initial = float(closure())
        for _ in range(20):
            loss = _step(subject, opt, closure)
            for s in schedulers:
                s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()
        final = float(closure())
        if kwargs.get("maximize"):
            assert final > initial, (subject, kwargs, initial, final)
        else:
            assert final < initial, (subject, kwargs, initial, final)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_forloop_goes_right_direction(subject):
    _goes_right_direction(subject, contiguous=True, with_lrsched=False)


@pytest.mark.parametrize("contiguous,with_lrsched", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_forloop_goes_right_direction_variants(subject, contiguous, with_lrsched):
    _goes_right_direction(subject, contiguous=contiguous, with_lrsched=with_lrsched)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_param_group_with_lrscheduler_goes_right_direction(subject):
    layer, x = _toy()
    groups = [{"params": [layer.weight]}, {"params": [layer.bias], "lr": 0.01}]
    if "param_groups" in subject.deviations:
        with pytest.raises(ValueError):
            subject.build(groups, model=layer)
        return
    opt = subject.build(groups, model=layer)
    scheduler = StepLR(opt, gamma=0.9, step_size=10)
    closure = _closure(subject, opt, lambda: layer(x).pow(2).sum())
    initial = float(closure())
    for _ in range(20):
        opt.step(closure)
        scheduler.step()
    assert float(closure()) < initial


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_param_groups_weight_decay(subject):
    layer, x = _toy()
    decay = subject.takes("weight_decay")
    groups = [{"params": [layer.weight], **({"weight_decay": 0.1} if decay else {})},
              {"params": [layer.bias], **({"weight_decay": 0.0} if decay else {})}]
    if "param_groups" in subject.deviations:
        with pytest.raises(ValueError):
            subject.build(groups, model=layer)
        return
    opt = subject.build(groups, model=layer)
    closure = _closure(subject, opt, lambda: layer(x).pow(2).sum())
    initial = float(closure())
    for _ in range(20):
        _step(subject, opt, closure)
    assert float(closure()) < initial


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_param_groups_lr(subject):
    layer, x = _toy()
    irrelevant = nn.Parameter(torch.randn(2))
    before = irrelevant.detach().clone()
    groups = [{"params": [layer.weight, layer.bias], "lr": BATTERY_KWARGS.get(subject.name, {}).get("lr", 1e-3)},
              {"params": [irrelevant]}]
    if "param_groups" in subject.deviations:
        with pytest.raises(ValueError):
            subject.build(groups, model=layer)
        return
    opt = subject.build(groups, model=layer, lr=1e-28)

    gen = torch.Generator().manual_seed(0)

    def loss_fn():  # irrelevant gets a random gradient, as torch's test gives it
        return layer(x).pow(2).sum() + (irrelevant * torch.rand(2, generator=gen)).sum()

    def main_loss() -> float:
        with torch.no_grad():
            return float(layer(x).pow(2).sum())

    closure = _closure(subject, opt, loss_fn)
    initial = main_loss()
    for _ in range(20):
        _step(subject, opt, closure)
    assert main_loss() < initial
    if "bounded_step" in subject.deviations:  # a near-zero lr does not freeze the group
        assert not torch.equal(irrelevant.detach(), before) and torch.isfinite(irrelevant).all()
        return
    torch.testing.assert_close(irrelevant.detach(), before)


# ------------------------------------------------------------------------------- hyperparameter kinds

@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_tensor_lr(subject):
    lr = 1.0 if subject.needs_closure and subject.name == "lbfgs" else BATTERY_KWARGS.get(
        subject.name, {}).get("lr", DEFAULT_LR)
    if "tensor_lr" in subject.deviations:
        layer, _ = _toy()
        with pytest.raises(ValueError, match="as a Tensor is not supported"):
            subject.build(layer.parameters(), model=layer, lr=torch.tensor(lr))
        return
    runs = []
    for value in (lr, torch.tensor(lr)):
        torch.manual_seed(0)
        layer, x = _toy()
        opt = subject.build(layer.parameters(), model=layer, lr=value)
        closure = _closure(subject, opt, lambda layer=layer, x=x: layer(x).pow(2).sum())
        for _ in range(5):
            _step(subject, opt, closure)
        runs.append([p.detach().clone() for p in layer.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_complex(subject):
    """Complex parameters step as their ``view_as_real`` twins, or are rejected as declared."""
    gen = torch.Generator().manual_seed(0)
    complex_params = [torch.randn(10, 5, dtype=torch.complex64, generator=gen).requires_grad_(),
                      torch.randn(10, 5, generator=gen).requires_grad_()]
    if "complex" in subject.deviations:
        with pytest.raises(ValueError, match="complex"):
            subject.build(complex_params, model=nn.Linear(1, 1))
        return
    real_params = [torch.view_as_real(p).detach().clone().requires_grad_() if p.is_complex()
                   else p.detach().clone().requires_grad_() for p in complex_params]
    complex_opt = subject.build(complex_params, model=nn.Linear(1, 1))
    real_opt = subject.build(real_params, model=nn.Linear(1, 1))
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in real_params]

        def real_closure(grads=grads):
            for p, g in zip(real_params, grads):
                p.grad = g.clone()
            return torch.tensor(1.0)

        def complex_closure(grads=grads):
            for p, g in zip(complex_params, grads):
                p.grad = torch.view_as_complex(g.clone()) if p.is_complex() else g.clone()
            return torch.tensor(1.0)

        real_opt.step(real_closure) if subject.needs_closure else (real_closure(), real_opt.step())
        complex_opt.step(complex_closure) if subject.needs_closure else (complex_closure(), complex_opt.step())
    for c, r in zip(complex_params, real_params):
        torch.testing.assert_close(torch.view_as_real(c) if c.is_complex() else c, r)


@pytest.mark.parametrize("subject", [s for s in SUBJECTS if s.control is None], ids=str)
def test_errors_one_rule_for_float_hyperparameters(subject):
    """Registry-wide (issue 13): wrong type TypeError naming lr; NaN, inf or negative lr ValueError."""
    layer, _ = _toy()
    with pytest.raises(TypeError, match="lr"):
        subject.build(layer.parameters(), model=layer, lr="0.1")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="lr|learning rate"):
            subject.build(layer.parameters(), model=layer, lr=bad)
    with pytest.raises(ValueError):
        subject.build(layer.parameters(), model=layer, lr=torch.tensor([1e-3, 1e-3]))


# ------------------------------------------------------------------------------- no-op steps

@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_step_is_noop_when_params_have_no_grad(subject):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    opt = subject.build(params, model=nn.Linear(1, 1))
    opt.step(lambda: torch.tensor([1.0]))
    for p, o in zip(params, old):
        assert torch.equal(p, o)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_step_is_noop_for_zero_grads(subject):
    param = nn.Parameter(torch.randn(5, 1))
    old = param.detach().clone()
    kwargs = {"weight_decay": 0.0} if subject.takes("weight_decay") else {}
    opt = subject.build([param], model=nn.Linear(1, 1), **kwargs)

    def closure():
        return torch.tensor([1.0])

    _set_grads(subject, [param], [torch.zeros_like(param)])
    opt.step(closure)
    if "moves_at_zero_grad" in subject.deviations:
        assert not torch.equal(param, old) and torch.isfinite(param).all()
        if not subject.takes("noise"):
            return
        with torch.no_grad():
            param.copy_(old)
        opt = subject.build([param], model=nn.Linear(1, 1), noise=0.0, **kwargs)  # noise is what moves it
        _set_grads(subject, [param], [torch.zeros_like(param)])
        opt.step(closure)
    assert torch.equal(param.detach(), old)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_optimizer_can_be_printed(subject):
    params = [nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    assert repr(subject.build(params, model=nn.Linear(1, 1)))


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_non_empty_state(subject):
    layer = nn.Linear(5, 5)
    opt = subject.build(layer.parameters(), model=layer)
    closure = _closure(subject, opt, lambda: layer(torch.rand(2, 5)).sum())  # linear in every parameter
    if "linear_loss" in subject.deviations:
        with pytest.raises(RuntimeError, match="create_graph"):
            _step(subject, opt, closure)
        closure = _closure(subject, opt, lambda: layer(torch.rand(2, 5)).pow(2).sum())
    _step(subject, opt, closure)
    for state in opt.state.values():
        assert len(state) > 0


@pytest.mark.parametrize("subject", [s for s in SUBJECTS if s.needs_closure], ids=str)
def test_second_order_optims_return_consistent_types(subject):
    """A step returns the closure's kind of loss: a tensor for tensors, a number for numbers."""
    params = [nn.Parameter(torch.randn(10, 5)), nn.Parameter(torch.randn(10))]
    opt = subject.build(params, model=nn.Linear(1, 1))
    assert isinstance(opt.step(lambda: torch.tensor([10.0])), torch.Tensor)
    assert isinstance(opt.step(lambda: 10), (int, float))


# ------------------------------------------------------------------------------- state dicts

def _prime(subject: Subject, opt, closure, steps: int) -> None:
    for _ in range(steps):
        _step(subject, opt, closure)


def _named(params: list[torch.Tensor], named: bool) -> list[Any]:
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _state_dict_deterministic(subject: Subject, named0: bool, named1: bool) -> None:
    layer, x = _toy()
    params = [layer.weight, layer.bias]
    opt = subject.build(_named(params, named0), model=layer)
    closure = _closure(subject, opt, lambda: layer(x).pow(2).sum())
    _prime(subject, opt, closure, 10)
    twin = copy.deepcopy(layer)
    opt_c = subject.build(_named([twin.weight, twin.bias], named1), model=twin)
    closure_c = _closure(subject, opt_c, lambda: twin(x).pow(2).sum())
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        rng = torch.get_rng_state()
        _step(subject, opt, closure)
        if _fork_rng(subject):
            torch.set_rng_state(rng)
        _step(subject, opt_c, closure_c)
        torch.testing.assert_close(layer.weight, twin.weight)
        torch.testing.assert_close(layer.bias, twin.bias)

    def without_names(sd):
        sd = copy.deepcopy(sd)
        for group in sd["param_groups"]:
            group.pop("param_names", None)
        return sd

    _assert_same(without_names(opt.state_dict()), without_names(opt_c.state_dict()))
    opt_c.param_groups.extend(opt_c.param_groups)
    assert (without_names(opt.state_dict())["param_groups"][-1]
            == without_names(opt_c.state_dict())["param_groups"][-1])


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_state_dict_deterministic(subject):
    _state_dict_deterministic(subject, False, False)


@pytest.mark.parametrize("named0,named1", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_state_dict_deterministic_named(subject, named0, named1):
    _state_dict_deterministic(subject, named0, named1)


def _conv_bn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2))
    return model, torch.rand(1, 4, 16, 16)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_can_load_older_state_dict(subject):
    model, x = _conv_bn()
    opt = subject.build(model.parameters(), model=model)
    closure = _closure(subject, opt, lambda: model(x).sum())
    _prime(subject, opt, closure, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in NEWER_FLAGS:
            group.pop(flag, None)
    opt.load_state_dict(old)
    _step(subject, opt, closure)


@pytest.mark.parametrize("named0,named1", [(True, False), (False, True)])
@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_can_load_from_to_named_state_dict(subject, named0, named1):
    model, x = _conv_bn()
    opt = subject.build(model.named_parameters() if named0 else model.parameters(), model=model)
    closure = _closure(subject, opt, lambda: model(x).sum())
    _prime(subject, opt, closure, 3)
    saved = copy.deepcopy(opt.state_dict())
    opt2 = subject.build(model.named_parameters() if named1 else model.parameters(), model=model)
    opt2.load_state_dict(saved)
    _step(subject, opt2, _closure(subject, opt2, lambda: model(x).sum()))
    assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_save_load_equality_with_weights_only(subject):
    layer, x = _toy()
    opt = subject.build(layer.parameters(), model=layer)
    _prime(subject, opt, _closure(subject, opt, lambda: layer(x).pow(2).sum()), 3)
    sd = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        _assert_same(torch.load(buffer, weights_only=weights_only), sd)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_load_nontensor_step(subject):
    params = [nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = subject.build(params, model=nn.Linear(1, 1))
    closure_loss = torch.rand(1)

    def step():
        _set_grads(subject, params, [torch.rand_like(p) for p in params])
        opt.step(lambda: closure_loss)

    for _ in range(3):
        step()
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        if isinstance(state, dict) and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].item()
    opt.load_state_dict(sd)
    step()


# ------------------------------------------------------------------------------- hooks

def _hook_subject(subject: Subject):
    param = nn.Parameter(torch.rand(2, 3))
    return subject.build([param], model=nn.Linear(1, 1)), (lambda: 1) if subject.needs_closure else None


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_state_dict_hooks(subject):
    """torch's test_state_dict_pre_hook, _post_hook and _pre_post_hook."""

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, state_dict):
        state_dict["ran_pre"] = "test" in state_dict["state"]
        state_dict["state"].pop("test", None)
        return state_dict

    opt, _ = _hook_subject(subject)
    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt, _ = _hook_subject(subject)
    opt.register_state_dict_post_hook(post)
    assert opt.state_dict()["ran_pre"] is False
    opt, _ = _hook_subject(subject)
    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert "test" not in sd["state"] and sd["ran_pre"] is True


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_load_state_dict_hooks(subject):
    """torch's test_load_state_dict_pre_hook_and_prepend, _post_hook and _pre_post_hook."""

    def pre1(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def pre2(optimizer, state_dict):
        mine = copy.deepcopy(state_dict)
        mine["param_groups"][0]["lr"] = 0.003
        return mine

    def post(optimizer):
        optimizer.state["ran_pre2"] = optimizer.param_groups[0]["lr"] == 0.003
        optimizer.state["ran_post"] = True

    opt, _ = _hook_subject(subject)
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(pre1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(pre2, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt, _ = _hook_subject(subject)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_pre2"] is False and opt.state["ran_post"] is True
    opt, _ = _hook_subject(subject)
    opt.register_load_state_dict_pre_hook(pre2)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_pre2"] is True and opt.state["ran_post"] is True


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_step_pre_and_post_hooks(subject):
    """torch's test_step_pre_hook and test_step_post_hook."""
    for register, start, end in (("register_step_pre_hook", 5, 9), ("register_step_post_hook", 2, 6)):
        opt, closure = _hook_subject(subject)
        data = [start]
        handle = getattr(opt, register)(lambda *_, data=data: data.__setitem__(0, data[0] + 2))
        opt.step(closure)
        opt.step(closure)
        assert data[0] == end
        handle.remove()
        opt.step(closure)
        assert data[0] == end


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_step_all_hooks(subject):
    """Global and local step hooks fire once per step, in torch's order (global pre, local pre, post)."""
    opt, closure = _hook_subject(subject)
    opt2 = torch.optim.SGD([nn.Parameter(torch.rand(2))], lr=1e-3)
    data: list[int] = []
    handles = [
        register_optimizer_step_pre_hook(lambda *_: data.append(0)),
        register_optimizer_step_post_hook(lambda *_: data.append(5)),
        opt.register_step_pre_hook(lambda *_: data.append(1)),
        opt.register_step_post_hook(lambda *_: data.append(2)),
        opt2.register_step_pre_hook(lambda *_: data.append(1)),
        opt2.register_step_post_hook(lambda *_: data.append(2)),
    ]
    try:
        opt.step(closure)
        assert data == [0, 1, 2, 5]
        opt2.step()
        assert data == [0, 1, 2, 5] * 2
        opt.step(closure)
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step(closure)
    opt2.step()
    assert data == [0, 1, 2, 5] * 3


# ------------------------------------------------------------------------------- copies

def _copy_continues(subject: Subject, duplicate: Callable[[Any], Any]) -> None:
    layer, x = _toy()
    opt = subject.build(layer.parameters(), model=layer)
    closure = _closure(subject, opt, lambda: layer(x).pow(2).sum())
    _prime(subject, opt, closure, 3)
    twin, opt_c = duplicate((layer, opt))
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in opt_c.__dict__ if not k.startswith("_")}
    closure_c = _closure(subject, opt_c, lambda: twin(x).pow(2).sum())
    if "deepcopy" in subject.deviations:
        with pytest.raises(AttributeError):
            _step(subject, opt_c, closure_c)
        return
    for _ in range(3):
        rng = torch.get_rng_state()
        _step(subject, opt, closure)
        torch.set_rng_state(rng)
        _step(subject, opt_c, closure_c)
    for p, q in zip(layer.parameters(), twin.parameters()):
        assert torch.equal(p, q), subject


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_deepcopy_copies_all_public_attrs_and_continues(subject):
    _copy_continues(subject, copy.deepcopy)


@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_pickle_continues(subject):
    _copy_continues(subject, lambda obj: pickle.loads(pickle.dumps(obj)))


# ------------------------------------------------------------------------------- beyond torch's battery

@pytest.mark.parametrize("subject", SUBJECTS, ids=str)
def test_step_leaves_the_closures_gradient_in_grad(subject):
    """After ``step`` the gradient in ``.grad`` is what the (last) closure evaluation computed."""
    layer, x = _toy()
    kwargs = {"maximize": True} if subject.takes("maximize") else {}
    opt = subject.build(layer.parameters(), model=layer, **kwargs)
    seen: list[list[torch.Tensor]] = []
    inner = _closure(subject, opt, lambda: layer(x).pow(2).sum())

    def closure():
        loss = inner()
        seen.append([p.grad.detach().clone() for p in layer.parameters()])
        return loss

    for _ in range(3):
        _step(subject, opt, closure)
        after = [p.grad.detach() for p in layer.parameters()]
        if "grad_replaced" in subject.deviations:
            assert all(torch.isfinite(g).all() for g in after)
            continue
        for g, s in zip(after, seen[-1]):
            assert torch.equal(g, s), subject


@pytest.mark.parametrize("subject", [s for s in SUBJECTS if s.takes("maximize")], ids=str)
def test_maximize_is_honoured_per_group(subject):
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    x = torch.randn(4, 5)
    model = nn.ModuleList([a, b])
    opt = subject.build([{"params": a.parameters()}, {"params": b.parameters(), "maximize": True}], model=model)
    closure = _closure(subject, opt, lambda: a(x).pow(2).sum() + b(x).pow(2).sum())
    with torch.no_grad():
        la, lb = float(a(x).pow(2).sum()), float(b(x).pow(2).sum())
    for _ in range(10):
        _step(subject, opt, closure)
    with torch.no_grad():
        assert float(a(x).pow(2).sum()) < la and float(b(x).pow(2).sum()) > lb


@pytest.mark.parametrize("subject", [s for s in SUBJECTS if "param_groups" not in s.deviations], ids=str)
def test_add_param_group_then_step(subject):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(8, 5)
    opt = subject.build(model[0].parameters(), model=model)
    closure = _closure(subject, opt, lambda: model(x).pow(2).sum())
    _prime(subject, opt, closure, 2)
    opt.add_param_group({"params": list(model[2].parameters())})
    before = [p.detach().clone() for p in model[2].parameters()]
    _prime(subject, opt, closure, 2)
    assert all(not torch.equal(p, b) for p, b in zip(model[2].parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("subject", [s for s in SUBJECTS if s.create_graph], ids=str)
def test_hessian_methods_take_a_loss_linear_in_some_parameter(subject):
    w, c = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = subject.build([w, c])
    closure = _closure(subject, opt, lambda: w.pow(2).sum() + c.sum())  # grad of c has no graph
    for _ in range(3):
        _step(subject, opt, closure)
    assert torch.isfinite(w).all() and torch.isfinite(c).all()
    opt.zero_grad()
    (w.pow(2).sum()).backward()  # no create_graph: a clear error, not a silent zero Hessian
    with pytest.raises(RuntimeError, match="create_graph"):
        opt.step()


def test_every_declared_deviation_is_known_and_checked():
    checked = {"complex", "tensor_lr", "moves_at_zero_grad", "grad_replaced", "deepcopy", "param_groups",
               "global_rng", "bounded_step", "linear_loss"}
    assert set(DEVIATIONS) <= checked, sorted(set(DEVIATIONS) - checked)
    for name in available_optimizers():
        for key, reason in get_spec(name).deviations.items():
            assert key in DEVIATIONS and reason, (name, key)

