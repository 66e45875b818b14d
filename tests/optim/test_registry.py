"""The optimizer registry's own contract (the per-optimizer conformance suite lives in test_optim_*)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_optsurvey.optim import (
    FAMILIES,
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_spec,
    register,
)

SURVEY_TORCH_METHODS = {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "amsgrad",
                        "adamw", "nadam", "radam", "lbfgs"}


def test_torch_methods_are_registered_with_the_right_classes():
    assert SURVEY_TORCH_METHODS <= set(available_optimizers())
    params = [nn.Parameter(torch.zeros(3))]
    assert isinstance(create_optimizer("momentum", params), torch.optim.SGD)
    nesterov = create_optimizer("nesterov", params)
    assert nesterov.defaults["nesterov"] and nesterov.defaults["momentum"] == 0.9
    assert create_optimizer("amsgrad", params).defaults["amsgrad"] is True
    assert isinstance(create_optimizer("lbfgs", params), torch.optim.LBFGS)
    assert get_spec("lbfgs").needs_closure


def test_hyperparameters_override_defaults():
    opt = create_optimizer("adam", [nn.Parameter(torch.zeros(2))], lr=0.123, betas=(0.8, 0.9))
    assert opt.defaults["lr"] == 0.123 and opt.defaults["betas"] == (0.8, 0.9)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown optimizer 'nosuch'.*known optimizers: .*adam"):
        create_optimizer("nosuch", [nn.Parameter(torch.zeros(1))])


def test_a_name_that_is_not_a_string_is_a_type_error():
    with pytest.raises(TypeError, match=r"optimizer name must be a registered name \(a string\), got 3 \(int\)"):
        create_optimizer(3, [nn.Parameter(torch.zeros(1))])


def _groups(model: nn.Module, **options):
    return [{"params": model[0].parameters(), **options}, {"params": model[1].parameters()}]


@pytest.mark.parametrize("name", [n for n in available_optimizers() if n != "lbfgs"])  # L-BFGS takes one group
def test_a_parameter_groups_options_get_the_defaults_checks(name):
    """torch checks only the defaults: a NaN or a string lr in a group would otherwise train to NaN or fail late."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    extra = {"model": model} if get_spec(name).needs_model else {}
    optimizer = create_optimizer(name, _groups(model, lr=0.01), **extra)  # a valid group builds
    assert optimizer.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be finite, got nan"):
        create_optimizer(name, _groups(model, lr=float("nan")), **extra)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] must be a real number, got '0.1' \(str\)"):
        create_optimizer(name, _groups(model, lr="0.1"), **extra)


@pytest.mark.parametrize(("name", "options", "message"), [
    ("sam", {"rho": -0.05}, r"param_groups\[0\]: rho must be in \[0.0, inf\), got -0.05"),
    ("lpf_sgd", {"sigma": -1.0}, r"param_groups\[0\]: sigma must be in \[0.0, inf\), got -1.0"),
    ("adam", {"betas": (0.9, 1.5)}, r"param_groups\[0\]: Invalid beta parameter at index 1: 1.5"),
    ("adam", {"betas": (0.9,)}, r"param_groups\[0\]\['betas'\] must have 2 elements, got \(0.9,\)"),
])
def test_a_groups_out_of_range_option_is_refused_by_the_optimizers_own_check(name, options, message):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=message):
        create_optimizer(name, _groups(model, **options))


def test_tuple_options_must_have_the_defaults_length():
    for betas in ((0.9,), (0.9, 0.99, 0.5)):
        with pytest.raises(ValueError, match=r"betas must have 2 elements"):
            create_optimizer("adam", [nn.Parameter(torch.zeros(1))], betas=betas)


def test_misspelt_hyperparameter_is_rejected_not_ignored():
    with pytest.raises(TypeError, match="does not take 'lrr'"):
        create_optimizer("sgd", [nn.Parameter(torch.zeros(1))], lrr=0.1)


def test_invalid_value_is_a_value_error():
    with pytest.raises(ValueError):
        create_optimizer("adam", [nn.Parameter(torch.zeros(1))], lr=-1.0)


def test_families_filter_and_validation():
    for family in FAMILIES:
        assert all(get_spec(n).family == family for n in available_optimizers(family))
    assert sum(len(available_optimizers(f)) for f in FAMILIES) == len(available_optimizers())
    with pytest.raises(ValueError, match="family"):
        available_optimizers("zeroth_order")


def test_spec_validation_and_registration_rules():
    with pytest.raises(ValueError, match="lower-case"):
        OptimizerSpec("Bad Name", torch.optim.SGD, "first_order")
    with pytest.raises(ValueError, match="family"):
        OptimizerSpec("x", torch.optim.SGD, "magic")
    with pytest.raises(TypeError, match="OptimizerSpec"):
        register("sgd")  # type: ignore[arg-type]
    # A default the factory does not take would only fail (or be swallowed) at the first create_optimizer.
    with pytest.raises(ValueError, match="momentun"):
        OptimizerSpec("x", torch.optim.SGD, "first_order", defaults={"lr": 0.1, "momentun": 0.9})
    with pytest.raises(TypeError, match="factory"):
        OptimizerSpec("x", "not callable", "first_order")  # type: ignore[arg-type]
    clash = OptimizerSpec("sgd", torch.optim.Adam, "adaptive")
    with pytest.raises(ValueError, match="already registered"):
        register(clash)


def test_needs_model_requires_the_model(monkeypatch):
    from lightning_optsurvey.optim import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def factory(params, model, lr=0.1):
        return torch.optim.SGD(params, lr=lr)

    spec = register(OptimizerSpec("_test_needs_model", factory, "second_order", needs_model=True), replace=True)
    assert spec.needs_model
    with pytest.raises(ValueError, match="needs the model"):
        create_optimizer("_test_needs_model", [nn.Parameter(torch.zeros(1))])
    layer = nn.Linear(2, 2)
    assert isinstance(create_optimizer("_test_needs_model", layer.parameters(), model=layer), torch.optim.SGD)


def test_every_entry_has_a_reference_and_a_summary():
    for name in available_optimizers():
        spec = get_spec(name)
        assert spec.reference, name
        assert spec.summary, name
