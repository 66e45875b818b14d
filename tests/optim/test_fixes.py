"""The registry's one rule for float hyperparameters, and the fixes the torch battery asked for that it does
not pin down by itself (K-FAC's late layers and per-group options, SAM's maximize as an equivalence)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _support import make_closure
from torch import nn

from lightning_optsurvey.optim import KFAC, SAM, available_optimizers, create_optimizer, get_spec
from lightning_optsurvey.validation import check_bool, check_float_hparam, check_int, check_number


def test_check_number_one_rule():
    assert check_number("lr", 1) == 1.0 and check_number("lr", np.float32(0.5)) == 0.5
    for bad in ("0.1", None, True, [0.1]):
        with pytest.raises(TypeError, match="lr must be a real number"):
            check_number("lr", bad)
    for bad in (math.nan, math.inf, -math.inf, -1.0):
        with pytest.raises(ValueError, match=r"lr must be .*\[0\.0, inf\)"):
            check_number("lr", bad)
    with pytest.raises(ValueError, match="as a Tensor is not supported"):
        check_number("lr", torch.tensor(0.1))
    with pytest.raises(TypeError, match="k must be an integer"):
        check_int("k", 2.0)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        check_int("k", 0)
    with pytest.raises(TypeError, match="flag must be a bool"):
        check_bool("flag", 1)
    check_float_hparam("betas", (0.9, 0.99))
    with pytest.raises(ValueError, match=r"betas\[1\] must be finite"):
        check_float_hparam("betas", (0.9, math.nan))
    with pytest.raises(TypeError, match=r"betas\[0\]"):
        check_float_hparam("betas", ("0.9", 0.99))


def _float_hparams(name: str) -> list[str]:
    spec = get_spec(name)
    accepted = spec.accepted_hparams()
    return sorted(k for k in spec.float_hparams() if accepted is None or k in accepted or k == "lr")


@pytest.mark.parametrize("name", available_optimizers())
def test_every_float_hyperparameter_of_every_entry_follows_the_rule(name):
    """Issue 13: NaN/inf -> ValueError and a string -> TypeError, naming the hyperparameter, for all entries."""
    keys = _float_hparams(name)
    assert "lr" in keys
    layer = nn.Linear(2, 2)
    for key in keys:
        default = get_spec(name).defaults.get(key)
        tuple_valued = isinstance(default, (tuple, list)) or key == "betas"
        for bad in (math.nan, math.inf):
            value = (bad, 0.999) if tuple_valued else bad
            with pytest.raises(ValueError, match=key):
                create_optimizer(name, layer.parameters(), model=layer, **{key: value})
        with pytest.raises(TypeError, match=key):
            create_optimizer(name, layer.parameters(), model=layer, **{key: "0.1"})


def test_sam_rho_inf_and_string_lr_messages():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="rho must be finite"):
        create_optimizer("sam", layer.parameters(), rho=math.inf)
    with pytest.raises(TypeError, match="lr must be a real number, got '0.1'"):
        create_optimizer("sgd", layer.parameters(), lr="0.1")


def test_sam_maximize_with_rho_zero_is_the_base_maximizing():
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = copy.deepcopy(a)
    x = torch.randn(8, 4)
    sam = SAM(a.parameters(), base="sgd", rho=0.0, lr=0.05, momentum=0.9, maximize=True)
    sgd = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, maximize=True)
    for _ in range(5):
        sam.step(make_closure(sam, lambda: a(x).pow(2).mean()))
        sgd.zero_grad()
        b(x).pow(2).mean().backward()
        sgd.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def _kfac_step(opt: KFAC, model: nn.Module, x: torch.Tensor) -> None:
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))


KFAC_KW = {"lr": 0.1, "momentum": 0.0, "stat_decay": 0.0, "inv_every": 1, "stat_every": 1, "kl_clip": None,
           "damping": 0.1, "low_rank": False}


def test_kfac_preconditions_a_layer_added_by_add_param_group():
    """After add_param_group a layer steps exactly as in a K-FAC that had it from the start.

    With no momentum, factors from the current batch only (stat_decay=0) and inverses every step, a step
    depends on the current weights and batch alone, so the two optimizers must agree from there on.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(16, 6)
    late = KFAC(model, params=list(model[0].parameters()), **KFAC_KW)
    _kfac_step(late, model, x)  # layer 2 frozen so far
    late.add_param_group({"params": list(model[2].parameters())})
    twin = copy.deepcopy(model)
    full = KFAC(twin, **KFAC_KW)
    for _ in range(2):
        _kfac_step(late, model, x)
        _kfac_step(full, twin, x)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q)
    # ... and differs from the plain-gradient step the layer took before the fix
    plain = copy.deepcopy(model)
    sgd = torch.optim.SGD(plain[2].parameters(), lr=0.1)
    sgd.zero_grad()
    plain(x).pow(2).mean().backward()
    sgd.step()
    _kfac_step(late, model, x)
    assert not torch.allclose(plain[2].weight, model[2].weight)


class _Parallel(nn.Module):
    """Two layers on the same input whose losses add up: neither one's gradient depends on the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def test_kfac_per_group_inv_every_is_honoured():
    torch.manual_seed(0)
    model = _Parallel()
    x = torch.randn(16, 6)
    kw = {**KFAC_KW, "stat_decay": 0.5}
    reference = {}
    for every in (1, 3):
        twin = copy.deepcopy(model)
        opt = KFAC(twin, **{**kw, "inv_every": every})
        for _ in range(4):
            _kfac_step(opt, twin, x)
        reference[every] = twin
    mixed_model = copy.deepcopy(model)
    mixed = KFAC(mixed_model, params=[{"params": list(mixed_model.a.parameters()), "inv_every": 1},
                                      {"params": list(mixed_model.b.parameters()), "inv_every": 3}], **kw)
    for _ in range(4):
        _kfac_step(mixed, mixed_model, x)
    # without KL clipping the two layers are independent: each follows its own group's schedule
    for p, q in zip(mixed_model.a.parameters(), reference[1].a.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(mixed_model.b.parameters(), reference[3].b.parameters()):
        torch.testing.assert_close(p, q)
    assert not torch.allclose(reference[1].b.weight, reference[3].b.weight)


def test_kfac_optimizer_wide_options_are_validated():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    opt = KFAC(model, params=list(model[0].parameters()), kl_clip=1e-3)
    with pytest.raises(ValueError, match="kl_clip is optimizer-wide"):
        opt.add_param_group({"params": list(model[1].parameters()), "kl_clip": 0.5})
    opt.add_param_group({"params": list(model[1].parameters()), "kl_clip": 1e-3, "inv_every": 2})
    with pytest.raises(ValueError, match="inv_every"):
        KFAC(model, params=[{"params": list(model.parameters()), "inv_every": 0}])
    opt.param_groups[1]["fisher"] = "mc"
    with pytest.raises(ValueError, match="fisher is optimizer-wide"):
        opt.step()


def _lockstep(pairs, x: torch.Tensor, steps: int = 3) -> None:
    """``steps`` plain steps of each ``(optimizer, model)`` pair on the loss ``mean(model(x)^2)``."""
    for _ in range(steps):
        for opt, model in pairs:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()


def test_lookahead_loads_a_pytorch_optimizer_lookahead_checkpoint():
    """Checkpoints written when the registry's lookahead was pytorch-optimizer's still load and continue."""
    import pytorch_optimizer as po

    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = copy.deepcopy(a)
    x = torch.randn(8, 4)
    old = po.Lookahead(torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9), k=2, alpha=0.5)
    ours = create_optimizer("lookahead", b.parameters(), base="momentum", lr=0.05, k=2, alpha=0.5)
    _lockstep(((old, a), (ours, b)), x)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)  # same algorithm
    resumed_model = copy.deepcopy(a)
    resumed = create_optimizer("lookahead", resumed_model.parameters(), base="momentum", lr=0.05, k=2, alpha=0.5)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))
    _lockstep(((old, a), (resumed, resumed_model)), x)
    for p, q in zip(a.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q)


def test_every_spec_pickles_with_its_declarations():
    """Specs travel to spawned processes and into checkpoints (the pytorch-optimizer and K-FAC ones did not)."""
    import pickle

    for name in available_optimizers():
        spec = get_spec(name)
        back = pickle.loads(pickle.dumps(spec))
        assert (back.name, dict(back.deviations), dict(back.defaults)) == (name, dict(spec.deviations),
                                                                          dict(spec.defaults))
