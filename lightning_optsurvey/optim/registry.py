"""One registry for every optimizer of the survey: torch's, pytorch-optimizer's and ours.

An :class:`OptimizerSpec` records what an optimizer needs from the training loop, so that the same
``LightningModule`` can train with any of them:

- ``needs_closure``: ``step`` evaluates the loss itself, possibly several times (L-BFGS, SAM, ...);
- ``create_graph``: the backward pass must keep its graph (AdaHessian, Sophia-H use Hessian-vector
  products of the gradient);
- ``needs_model``: the constructor takes the module, not only its parameters (K-FAC hooks layers).

``create_optimizer`` checks the hyperparameters against the factory's signature before building, so a
misspelt name is an error rather than silently ignored (several libraries swallow unknown keywords), and
applies the package's one rule for float hyperparameters to every entry, torch's and pytorch-optimizer's
included: a wrong type is a ``TypeError``, a NaN or infinite value a ``ValueError``, both naming the
parameter (:func:`~lightning_optsurvey.validation.check_float_hparam`; ranges stay with each optimizer).

``deviations`` declares where an entry knowingly differs from a ``torch.optim`` optimizer in the generic
properties PyTorch tests all of its optimizers for (``tests/optim/test_torch_battery.py`` ports that
battery); each key names a difference from :data:`DEVIATIONS`, its value says why, and the battery checks
the declared behaviour instead of the torch one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_optsurvey.optim import loop
from lightning_optsurvey.validation import check_bool, check_float_hparam, check_type

FAMILIES = ("first_order", "adaptive", "second_order", "landscape")

#: The differences from ``torch.optim``'s generic behaviour an entry may declare, and what the battery then
#: checks instead.
DEVIATIONS: Mapping[str, str] = MappingProxyType({
    "complex": "complex parameters are rejected with a ValueError at construction",
    "tensor_lr": "a tensor lr is rejected with a ValueError at construction",
    "moves_at_zero_grad": "a step moves the parameters even at a zero gradient",
    "grad_replaced": "after step, .grad holds the gradient the update used, not the closure's last one",
    "bounded_step": "the step size is clipped into bounds that do not scale to zero with lr",
    "linear_loss": "a loss linear in every parameter is refused with a RuntimeError (no gradient has a graph: "
                   "indistinguishable from a backward without create_graph)",
    "deepcopy": "a deep copy (or pickle) cannot continue stepping",
    "param_groups": "one parameter group only: several are rejected with a ValueError",
    "global_rng": "steps draw from torch's global RNG: two copies stepped in turn diverge unless it is forked",
})

_REGISTRY: dict[str, OptimizerSpec] = {}


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer is and what it needs from the training loop.

    Args:
        name: Registry name (lower case, ``[a-z0-9_]``).
        factory: Callable ``factory(params, **hparams)`` (``factory(params, model=..., **hparams)`` when
            ``needs_model``) returning a ``torch.optim.Optimizer``.
        family: One of ``first_order``, ``adaptive``, ``second_order``, ``landscape``.
        needs_closure: ``step`` must be given a closure that recomputes loss and gradients.
        create_graph: The backward pass must be run with ``create_graph=True``.
        needs_model: The factory needs the ``nn.Module`` (keyword ``model``).
        reference: The paper, as "Authors Year, arXiv/venue link".
        defaults: Hyperparameters used unless overridden (tuned for the digits task).
        summary: One line for tables.
        strict: Reject hyperparameters that the factory's signature does not name.
        deviations: Declared differences from ``torch.optim``'s generic behaviour: keys from
            :data:`DEVIATIONS`, values the reason.

    Raises:
        ValueError: If ``name`` or ``family`` is invalid, or ``defaults`` names a keyword that a ``strict``
            factory does not take.
        TypeError: If ``factory`` is not callable.
    """

    name: str
    factory: Callable[..., Optimizer]
    family: str
    needs_closure: bool = False
    create_graph: bool = False
    needs_model: bool = False
    reference: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    strict: bool = True
    deviations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not all(
            c.islower() or c.isdigit() or c == "_" for c in self.name
        ):
            raise ValueError(f"optimizer name must be lower-case [a-z0-9_], got {self.name!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not callable(self.factory):
            raise TypeError(f"factory of {self.name!r} must be callable, got {self.factory!r}")
        for flag in ("needs_closure", "create_graph", "needs_model", "strict"):
            check_bool(flag, getattr(self, flag))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        unknown = set(self.deviations) - set(DEVIATIONS)
        if unknown:
            raise ValueError(f"deviations of {self.name!r} name {sorted(unknown)}; known: {sorted(DEVIATIONS)}")
        if not all(isinstance(v, str) and v for v in self.deviations.values()):
            raise ValueError(f"every deviation of {self.name!r} needs a reason (a non-empty string)")
        object.__setattr__(self, "deviations", MappingProxyType(dict(self.deviations)))
        accepted = self.accepted_hparams()
        if accepted is not None and set(self.defaults) - accepted:
            raise ValueError(
                f"defaults of {self.name!r} name {sorted(set(self.defaults) - accepted)}, which its factory "
                f"does not take; it takes: {sorted(accepted)}"
            )

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy does not pickle; rebuild from a plain dict (needed by ddp_spawn and checkpoints).
        return (
            type(self),
            (self.name, self.factory, self.family, self.needs_closure, self.create_graph, self.needs_model,
             self.reference, dict(self.defaults), self.summary, self.strict, dict(self.deviations)),
        )

    def accepted_hparams(self) -> set[str] | None:
        """Names the factory accepts, or ``None`` when it takes arbitrary keywords and ``strict`` is off."""
        signature = inspect.signature(self.factory)
        names = {
            n
            for n, p in signature.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("params", "model", "self")
        }
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        if takes_any and not self.strict:
            return None
        return names

    def float_hparams(self) -> set[str]:
        """Names whose default in the factory's signature is a number or a tuple of floats (and ``lr``).

        An integer default counts: torch writes ``weight_decay=0`` and ``momentum=0`` for float options, and an
        integer option (L-BFGS's ``history_size``) must be a finite real number too.
        """
        names = {"lr"}
        for n, p in inspect.signature(self.factory).parameters.items():
            default = p.default
            if isinstance(default, (tuple, list)) and default and all(
                isinstance(v, float) for v in default
            ):
                names.add(n)
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                names.add(n)
        return names

    def tuple_lengths(self) -> dict[str, int]:
        """Names whose default in the factory's signature is a tuple of floats, and its length (``betas``: 2)."""
        return {n: len(p.default) for n, p in inspect.signature(self.factory).parameters.items()
                if isinstance(p.default, tuple) and p.default and all(isinstance(v, float) for v in p.default)}

    def bool_hparams(self) -> set[str]:
        """Names whose default in the factory's signature is a ``bool`` (``nesterov``, ``amsgrad``, ...)."""
        return {n for n, p in inspect.signature(self.factory).parameters.items() if isinstance(p.default, bool)}


def _params_list(params: Iterable[Any]) -> list[Any]:
    """``params`` as a list whose groups' ``params`` are lists too (generators are consumed once)."""
    if isinstance(params, Tensor):
        return params  # type: ignore[return-value]  # the optimizer raises its own TypeError
    out = []
    for item in params:
        if isinstance(item, dict) and "params" in item and not isinstance(item["params"], Tensor):
            item = {**item, "params": list(item["params"])}
        out.append(item)
    return out


def _check_hparams(spec: OptimizerSpec, values: dict[str, Any], given: set[str], prefix: str = "") -> None:
    """The registry-wide rule: float options finite reals (tuples of the default's length), bools bools."""
    name = (lambda key: f"{prefix}['{key}']") if prefix else (lambda key: key)
    lengths = spec.tuple_lengths()
    for key in spec.float_hparams() & set(values):
        value = values[key]
        if key in lengths and isinstance(value, (tuple, list)) and len(value) != lengths[key]:
            raise ValueError(f"{name(key)} must have {lengths[key]} elements, got {value!r}")
        check_float_hparam(name(key), value)
    for key in spec.bool_hparams() & given:
        check_bool(name(key), values[key])


def _check_group(spec: OptimizerSpec, kwargs: dict[str, Any], group: dict[str, Any], index: int) -> None:
    """A parameter group's own options get the checks the defaults get.

    torch's optimizers (and most others) validate only their defaults, so ``{"params": ..., "lr": nan}`` in a
    group would train to NaN silently. The group's hyperparameters go through the registry's float and bool
    rule, then through the optimizer's own constructor on a throwaway parameter (its range checks, whatever
    they are); an optimizer that needs the model (K-FAC) checks its groups itself.
    """
    accepted = spec.accepted_hparams()
    options = {k: v for k, v in group.items() if k != "params" and (accepted is None or k in accepted)}
    if not options:
        return
    _check_hparams(spec, options, set(options), prefix=f"param_groups[{index}]")
    if spec.needs_model:
        return
    try:
        spec.factory([nn.Parameter(torch.zeros(1))], **{**kwargs, **options})
    except (TypeError, ValueError) as err:
        raise type(err)(f"param_groups[{index}]: {err}") from None


def _complex_params(params: list[Any]) -> list[Tensor]:
    found = []
    for item in params if isinstance(params, list) else []:
        group = item["params"] if isinstance(item, dict) else [item]
        group = [group] if isinstance(group, Tensor) else group
        for p in group:
            if isinstance(p, tuple) and len(p) == 2:  # named parameters
                p = p[1]
            if isinstance(p, Tensor) and p.is_complex():
                found.append(p)
    return found


def register(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    """Add ``spec`` to the registry.

    Args:
        spec: The optimizer's description.
        replace: Allow replacing an existing entry of the same name.

    Returns:
        ``spec``, so that the call can be used as an expression.

    Raises:
        TypeError: If ``spec`` is not an :class:`OptimizerSpec`.
        ValueError: If the name is taken and ``replace`` is false.
    """
    if not isinstance(spec, OptimizerSpec):
        raise TypeError(f"register expects an OptimizerSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise ValueError(f"optimizer {spec.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # The built-in entries live in modules that import their implementations; importing the package
    # registers them. Done lazily so that `registry` itself stays import-cycle free.
    import lightning_optsurvey.optim  # noqa: F401


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered under ``name``.

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: If no optimizer of that name is registered (the message lists the known ones).
    """
    _ensure_loaded()
    check_type("optimizer name", name, str, "a registered name (a string)")
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {', '.join(available_optimizers())}")
    return _REGISTRY[name]


def available_optimizers(family: str | None = None) -> list[str]:
    """Sorted names of the registered optimizers, optionally of one family.

    Raises:
        ValueError: If ``family`` is not one of :data:`FAMILIES`.
    """
    _ensure_loaded()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def create_optimizer(
    name: str,
    params: Iterable[Any],
    *,
    model: nn.Module | None = None,
    **hparams: Any,
) -> Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        name: A name from :func:`available_optimizers`.
        params: Parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        model: The module, required by optimizers whose spec has ``needs_model`` (K-FAC).
        **hparams: Hyperparameters overriding the spec's defaults.

    Returns:
        The optimizer.

    Raises:
        ValueError: For an unknown name, a missing ``model``, an invalid hyperparameter value (NaN and
            infinite floats included), or complex parameters for an entry that declares them unsupported.
        TypeError: For a hyperparameter the optimizer does not take, or a float hyperparameter that is not
            a real number (``lr="0.1"``).

    Example:
        >>> from torch import nn
        >>> opt = create_optimizer("adam", nn.Linear(2, 1).parameters(), lr=1e-2)
        >>> type(opt).__name__, opt.defaults["lr"]
        ('Adam', 0.01)
    """
    spec = get_spec(name)
    accepted = spec.accepted_hparams()
    if accepted is not None:
        unknown = sorted(set(hparams) - accepted)
        if unknown:
            raise TypeError(
                f"optimizer {name!r} does not take {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(sorted(accepted))}"
            )
    kwargs = {**spec.defaults, **hparams}
    _check_hparams(spec, kwargs, set(hparams))
    params = _params_list(params)
    for index, group in enumerate(params if isinstance(params, list) else []):
        if isinstance(group, dict):
            _check_group(spec, kwargs, group, index)
    if "complex" in spec.deviations and _complex_params(params):
        p = _complex_params(params)[0]
        raise ValueError(
            f"optimizer {name!r} does not support complex parameters (got one of shape {tuple(p.shape)}, "
            f"{p.dtype}): {spec.deviations['complex']}; optimize torch.view_as_real(param) instead"
        )
    if spec.needs_model:
        if model is None:
            raise ValueError(f"optimizer {name!r} needs the model: call create_optimizer(..., model=module)")
        optimizer = spec.factory(params, model=model, **kwargs)
    else:
        optimizer = spec.factory(params, **kwargs)
    # What the method needs from a training loop is served by callbacks.OptimizerLoopAdapter; the guard
    # refuses a Lightning step without it (see optim/loop.py).
    loop.tag(optimizer, name, spec, model)
    loop.install_guard(optimizer, name)
    return optimizer


def methods_markdown() -> str:
    """The registry as a markdown table, as in the README.

    Columns: name, family, needs, summary, reference, and the differences from ``torch.optim`` the entry
    declares (:data:`DEVIATIONS` keys with the entry's reason), followed by the keys' meanings.
    """
    _ensure_loaded()
    lines = ["| name | family | needs | summary | reference | differs from torch.optim |", "|---|---|---|---|---|---|"]
    for name in available_optimizers():
        spec = _REGISTRY[name]
        needs = ", ".join(
            flag for flag, on in (("closure", spec.needs_closure), ("create_graph", spec.create_graph),
                                  ("model", spec.needs_model)) if on
        )
        differs = "; ".join(f"`{k}`: {why}" for k, why in sorted(spec.deviations.items()))
        lines.append(f"| `{name}` | {spec.family} | {needs} | {spec.summary} | {spec.reference} | {differs} |")
    lines.append("")
    lines.append("Declared differences from `torch.optim` (each checked as declared by "
                 "`tests/optim/test_torch_battery.py`, PyTorch's generic optimizer tests run over every entry):")
    lines.append("")
    lines.extend(f"- `{k}`: {meaning}" for k, meaning in DEVIATIONS.items())
    return "\n".join(lines)
