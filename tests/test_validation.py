"""The package's one argument rule (``lightning_optsurvey/validation.py``), checked over every public constructor.

Every class in a public package's ``__all__`` (and every optimizer of the registry, built through
``create_optimizer``) is built once with valid arguments, then once per parameter whose default is a number or a
bool with a wrong value in its place:

- a string (an ``object()`` where the annotation admits strings) -> ``TypeError`` naming the parameter;
- for a float parameter, NaN and infinity -> ``ValueError`` naming the parameter.

A new public class with required arguments needs an entry in ``REQUIRED``; a result record (what the library
returns, not what a user configures) goes in ``RECORDS``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_optsurvey
from lightning_optsurvey.optim import available_optimizers, create_optimizer, get_spec


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(2, 2))]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2))


#: Required arguments of public classes (class name -> keyword arguments, built fresh for every call).
REQUIRED: dict[str, Callable[[Path], dict[str, Any]]] = {
    **{name: lambda _tmp: {"params": _params()} for name in (
        "GSAM", "SAM", "LPFSGD", "SVRG", "EntropySGD", "Lookahead", "Shampoo")},
    "KFAC": lambda _tmp: {"model": _model()},
    "OptimizerSpec": lambda _tmp: {"name": "probe", "factory": torch.optim.SGD, "family": "first_order"},
    "HessianOperator": lambda _tmp: {"model": nn.Linear(2, 1), "loss_fn": nn.functional.mse_loss,
                                     "batches": [(torch.zeros(3, 2), torch.zeros(3, 1))]},
    "Topology": lambda _tmp: {"kind": "ring", "world_size": 4},
    "PartitionSampler": lambda _tmp: {"part": torch.arange(4), "num_samples": 2, "rank": 0, "world_size": 2},
    "Delivery": lambda tmp: {"local_uri": f"sqlite:///{tmp / 'local.db'}", "remote_uri": "http://127.0.0.1:9",
                             "experiment": "probe"},
}
#: Results the library computes and returns (not configuration a user passes), and exceptions.
RECORDS = frozenset({
    "CheckOutcome", "CheckRun", "CommCounter", "DiagonalResult", "EigenResult", "MissingDerivativeError",
    "NoiseScale", "SpectralDensity", "SyncReport", "TraceResult",
})
#: Objects that hold a resource to release after construction.
CLOSE: dict[str, Callable[[Any], Any]] = {"Delivery": lambda delivery: delivery.finish(0)}



def _public_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    for info in pkgutil.iter_modules(lightning_optsurvey.__path__):
        if info.name.startswith("_") or info.name == "cli":
            continue
        module = importlib.import_module(f"lightning_optsurvey.{info.name}")
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isclass(obj) and name not in RECORDS:
                classes[name] = obj
    return classes


def _checked_parameters(signature: inspect.Signature, defaults: dict[str, Any] | None = None
                        ) -> list[tuple[str, Any, str]]:
    """``(name, default, annotation)`` of the parameters whose default is a number or a bool."""
    found = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = (defaults or {}).get(p.name, p.default)
        if isinstance(default, (bool, int, float)):
            found.append((p.name, default, str(p.annotation)))
    return found


def _bad_values(default: Any, annotation: str) -> list[tuple[str, Any, type[Exception]]]:
    wrong_type = object() if "str" in annotation else "x"
    bad: list[tuple[str, Any, type[Exception]]] = [(repr(wrong_type) if wrong_type == "x" else "object()",
                                                    wrong_type, TypeError)]
    if not isinstance(default, bool) and (isinstance(default, float) or "float" in annotation):
        bad += [("nan", math.nan, ValueError), ("inf", math.inf, ValueError)]
    return bad


def _construct(cls: type, required: Callable[[Path], dict[str, Any]], tmp_path: Path, param: str, value: Any) -> Any:
    return cls(**{**required(tmp_path), param: value})


def _outcome(build: Callable[[], Any], param: str, expected: type[Exception], close: Callable[[Any], Any] | None
             ) -> str | None:
    """``None`` if ``build()`` raised ``expected`` naming ``param``; else what happened."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = build()
    except expected as err:
        return None if param in str(err) else f"{type(err).__name__} not naming it ({err})"
    except Exception as err:
        return f"{type(err).__name__} ({err})"
    if close is not None:
        close(obj)
    return "accepted"


def test_every_public_constructor_follows_the_rule(tmp_path: Path) -> None:
    found: set[str] = set()
    for name, cls in sorted(_public_classes().items()):
        params = _checked_parameters(inspect.signature(cls))
        if not params:
            continue
        required = REQUIRED.get(name, lambda _tmp: {})
        close = CLOSE.get(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                valid = cls(**required(tmp_path))
        except Exception as err:  # the table of required arguments must build every class
            raise AssertionError(f"{name}(): add its required arguments to REQUIRED in tests/test_validation.py "
                                 f"({type(err).__name__}: {err})") from err
        if close is not None:
            close(valid)
        for param, default, annotation in params:
            for label, value, expected in _bad_values(default, annotation):
                build = partial(_construct, cls, required, tmp_path, param, value)
                what = _outcome(build, param, expected, close)
                if what is not None:
                    found.add(f"{name}.{param}: {label} -> {what.split(' (')[0]}, expected {expected.__name__}")

    for name in available_optimizers():
        spec = get_spec(name)
        model = _model()
        kwargs = {"model": model} if spec.needs_model else {}
        accepted = spec.accepted_hparams()
        signature = inspect.signature(spec.factory)
        for param, default, annotation in _checked_parameters(signature, dict(spec.defaults)):
            if accepted is not None and param not in accepted:
                continue
            for label, value, expected in _bad_values(default, annotation):
                build = partial(create_optimizer, name, model.parameters(), **kwargs, **{param: value})
                what = _outcome(build, param, expected, None)
                if what is not None:
                    found.add(f"optimizer {name!r}.{param}: {label} -> {what.split(' (')[0]}, "
                              f"expected {expected.__name__}")

    new = sorted(found)
    assert not new, "constructors against the rule of lightning_optsurvey/validation.py:\n" + "\n".join(new)


def test_an_integer_too_large_for_a_float_is_not_finite() -> None:
    from lightning_optsurvey.validation import check_float, check_float_hparam

    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0.0, inf\), got 1000"):
        check_float("lr", 10**400, low=0.0, low_open=True)
    with pytest.raises(ValueError, match="lr must be finite, got 1000"):
        check_float_hparam("lr", 10**400)
