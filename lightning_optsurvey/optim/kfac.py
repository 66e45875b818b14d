"""K-FAC: Kronecker-factored approximate curvature for ``Linear`` and ``Conv2d`` layers.

Why ours: no maintained package offers K-FAC as a plain ``torch.optim.Optimizer`` that works with
Lightning's automatic optimization (kfac-pytorch is a separate preconditioner object stepped by hand,
pytorch-optimizer has none). Here the statistics are taken by module hooks that are *active only while
``step`` evaluates its closure* (the training forward and backward of that step), so validation,
measuring callbacks and any other forward pass never touch the factors; everything, factors and their
inverses included, lives in ``self.state`` so that a checkpoint resumes the exact trajectory.

By default the curvature is the empirical Fisher of the training loss (the gradients that the closure's
backward produces), as in kfac-pytorch. ``fisher="mc"`` gives Martens & Grosse's Monte-Carlo Fisher:
the training code passes the network's outputs to :meth:`KFAC.sample_fisher` (``ClassifierModule``
does), which back-propagates a loss on targets sampled from the model's own predictive distribution
to collect ``G``. The empirical Fisher's ``G`` shrinks with the residuals, so near a good fit its steps
grow like ``1 / loss``; the Monte-Carlo Fisher does not (for least squares it is the Gauss-Newton
matrix, and K-FAC is Newton's method).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_optsurvey.optim._common import FullStateMixin, StateGenerator, call_closure, heavy_ball
from lightning_optsurvey.validation import (
    check_bool,
    check_choice,
    check_int,
    check_lr,
    check_number,
    check_optional,
    check_type,
)

_STEP_KEY = "kfac"
#: A gradient counts as the captured batch's (up to a scale, e.g. norm clipping) within this relative error.
_LOW_RANK_RTOL = 1e-5
#: Random probes of the sketched low-rank check (a gradient that is not the batch's fails it with probability 1).
_PROBES = 4
_FISHERS = ("empirical", "mc")
#: Options that act on the whole step (one capture window, one Fisher, one trust region): optimizer-wide.
_WIDE = ("stat_every", "fisher", "kl_clip")
#: Options that may differ per parameter group (a layer follows its weight's group).
_PER_GROUP = ("lr", "momentum", "damping", "stat_decay", "inv_every", "weight_decay", "pi_correction", "low_rank")
_LIKELIHOODS = ("categorical", "gaussian")

#: How each option is checked (through :mod:`lightning_optsurvey.validation`), for the config and for groups.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "lr": lambda name, v: check_lr(v, name),
    "momentum": lambda name, v: check_number(name, v, high=1.0, high_open=True),
    "damping": lambda name, v: check_number(name, v, low_open=True),
    "stat_decay": lambda name, v: check_number(name, v, high=1.0, high_open=True),
    "inv_every": check_int,
    "kl_clip": lambda name, v: check_optional(check_number, name, v, low_open=True),
    "weight_decay": check_number,
    "pi_correction": check_bool,
    "stat_every": check_int,
    "fisher": lambda name, v: check_choice(name, v, _FISHERS),
    "seed": lambda name, v: check_int(name, v, low=0),
    "low_rank": check_bool,
}


@dataclasses.dataclass(frozen=True)
class KFACConfig:
    r"""K-FAC's options in one typed, validated record (LightningCLI and YAML build it from a mapping).

    The default cadence is the one of the K-FAC literature at scale: statistics every ``stat_every=10``
    steps and inverses every ``inv_every=100`` steps, as alecwangcq's KFAC-Pytorch (``TCov=10, TInv=100``)
    and kfac-pytorch's ImageNet setting (factor/inverse updates every 10/100 steps). Martens & Grosse
    (2015) recompute the inverses every :math:`T_3 = 20` iterations, KFAC-JAX every 5 and kfac-pytorch's
    CIFAR example every 10, all with statistics every step; those settings suit models whose forward and
    backward are expensive relative to a layer's inversion (convolutions), not wide MLP layers. With
    ``stat_decay=0.95`` and statistics every 10 steps the factors average over the last ~200 steps, so an
    inverse refreshed every 100 steps lags them by at most half their window; the refreshes then cost
    under a tenth of a step, and the step's price is the per-step preconditioning (on ``mlp_wide`` its
    products alone take more multiply-adds than SGD's forward and backward, so K-FAC cannot reach 2x
    SGD's step there; the README's benchmark section gives the floor and the measured ratio). Smaller
    values trade time for fresher curvature (``inv_every=10, stat_every=1`` is kfac-pytorch's CIFAR
    setting).

    Args:
        lr: Learning rate :math:`\eta > 0` (per group).
        momentum: Momentum :math:`\mu \in [0, 1)` (per group).
        damping: Tikhonov damping :math:`\lambda > 0` (per group).
        stat_decay: Decay of the factor averages, in :math:`[0, 1)` (per group).
        inv_every: Steps between recomputations of the inverses, ``>= 1`` (per group).
        kl_clip: :math:`\kappa > 0`, or ``None`` to disable KL clipping (optimizer-wide).
        weight_decay: L2 coefficient added after preconditioning, ``>= 0`` (per group).
        pi_correction: Use the :math:`\pi` split of the damping between the factors (per group).
        stat_every: Steps between statistics updates, ``>= 1`` (optimizer-wide).
        fisher: ``"empirical"`` (``G`` from the training loss's backward) or ``"mc"`` (``G`` from
            :meth:`KFAC.sample_fisher`'s backward of a loss on targets sampled from the model)
            (optimizer-wide).
        seed: Seed of the target sampler (``fisher="mc"``); its position is kept in the optimizer's state.
        low_rank: For a ``Linear`` layer whose batch ``B`` is below half its width, precondition the
            gradient through its factorization :math:`\nabla W = \Delta^\top [X, 1]` from the captured
            batch: :math:`(G^{-1}\Delta^\top)([X, 1] A^{-1})` costs :math:`O(B d^2)` instead of
            :math:`O(d^3)` (per group). Used only when ``.grad`` equals that product up to a scale (norm
            clipping) within relative error 1e-5 on random probes; otherwise (accumulation, a penalty on the
            weight in the loss, other edits) the dense path runs. CPU only (the check's outcome is read on
            the host; on an accelerator that would be a sync per step, so the dense path runs there).

    Raises:
        TypeError: For an option of the wrong type.
        ValueError: For an option out of range.
    """

    lr: float = 0.01
    momentum: float = 0.9
    damping: float = 1e-3
    stat_decay: float = 0.95
    inv_every: int = 100
    kl_clip: float | None = 1e-3
    weight_decay: float = 0.0
    pi_correction: bool = True
    stat_every: int = 10
    fisher: str = "empirical"
    seed: int = 0
    low_rank: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _CHECKS[f.name](f.name, getattr(self, f.name))

    @classmethod
    def build(cls, config: KFACConfig | Mapping[str, Any] | None = None, **options: Any) -> KFACConfig:
        """A config from ``config`` (a config, a mapping such as a YAML section, or ``None``) and overrides.

        Raises:
            TypeError: For an unknown option or a ``config`` of another type.
        """
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, KFACConfig):
            base = dataclasses.asdict(config)
        else:
            base = dict(check_type("config", config, Mapping, "a KFACConfig, a mapping or None"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((set(base) | set(options)) - known)
        if unknown:
            raise TypeError(
                f"K-FAC does not take {', '.join(map(repr, unknown))}; it takes: {', '.join(sorted(known))}"
            )
        return cls(**{**base, **options})


def _check_group(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Check a parameter group's K-FAC options: per-group ones by range, optimizer-wide ones by equality."""
    for key in _WIDE:
        if key in group and group[key] != defaults[key]:
            raise ValueError(
                f"K-FAC's {key} is optimizer-wide ({defaults[key]!r}); a parameter group cannot set "
                f"{group[key]!r}; change optimizer.defaults[{key!r}] and every group together"
            )
    for key in _PER_GROUP:
        if key in group:
            _CHECKS[key](key, group[key])


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _activation_factor(module: nn.Module, x: Tensor) -> Tensor:
    """Sum of the outer products of the rows of the inputs (Linear) or of the unfolded patches (Conv2d).

    A constant 1 is appended to each row when the layer has a bias; the result is assembled by blocks
    so that the rows are never copied.
    """
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (B, d, L)
        gram = torch.bmm(patches, patches.transpose(1, 2)).sum(0)
        sums = patches.sum(dim=(0, 2))
        count = patches.shape[0] * patches.shape[2]
    else:
        a = x.reshape(-1, x.shape[-1])
        gram = a.T @ a
        sums = a.sum(0)
        count = a.shape[0]
    if module.bias is None:
        return gram
    d = gram.shape[0]
    out = gram.new_empty(d + 1, d + 1)
    out[:d, :d] = gram
    out[:d, d] = sums
    out[d, :d] = sums
    out[d, d] = count
    return out


def _fold(target: Tensor | None, rows: Tensor, beta: float, alpha: float, bias: bool) -> Tensor:
    """``beta * target + alpha * [rows, 1]^T [rows, 1]`` written into ``target`` (``[rows]`` without bias).

    The Gram block is one ``addmm_`` (product, scale and average in one pass over the factor, no
    ``d x d`` temporary); the bias row and column are the row sums. ``target=None`` starts a factor
    (``beta`` is then ignored).
    """
    d = rows.shape[1]
    if target is None:
        target = rows.new_zeros(d + bias, d + bias)
        beta = 0.0
    rows = rows.to(target.dtype)
    target[:d, :d].addmm_(rows.T, rows, beta=beta, alpha=alpha)
    if bias:
        sums = rows.sum(0)
        target[:d, d].mul_(beta).add_(sums, alpha=alpha)
        target[d, :d].mul_(beta).add_(sums, alpha=alpha)
        target[d, d].mul_(beta).add_(alpha * rows.shape[0])
    return target


def _output_rows(module: nn.Module, g: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        return g.transpose(1, -1).reshape(-1, g.shape[1])  # (B*H*W, C_out)
    return g.reshape(-1, g.shape[-1])


class _Hooks:
    """Forward hook of one layer; holds the optimizer weakly so that copying the model does not copy it."""

    def __init__(self, optimizer: KFAC, module: nn.Module) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._module = weakref.ref(module)

    def __getstate__(self) -> dict[str, Any]:
        # A copy or pickle of the model (or of the optimizer with it) gets a dead hook; the copied
        # optimizer registers its own (KFAC._restore).
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._optimizer = self._module = lambda: None  # type: ignore[assignment]

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        opt = self._optimizer()
        if opt is None or not opt._capturing or not module.training or not torch.is_grad_enabled():
            return
        if module in opt._seen_forward or not isinstance(output, Tensor) or not output.requires_grad:
            return
        opt._seen_forward.add(module)
        dtype = module.weight.dtype
        if output.dtype == torch.float16 and dtype != torch.float16:
            raise RuntimeError(
                f"K-FAC takes its curvature statistics from the output gradients, which float16 autocast "
                f"(precision='16-mixed') multiplies by the GradScaler's loss scale; use precision='bf16-mixed' "
                f"or 32-bit (layer {type(module).__name__} computes in float16, its weight is {dtype})"
            )
        # Under autocast (bf16-mixed) activations and output gradients are bf16: the statistics are kept in the
        # weight's dtype, the one the gradients they precondition have, and computed outside autocast (this
        # hook runs inside the forward's autocast region, which would turn the products back to bf16).
        x = inputs[0].detach().to(dtype)
        keep_rows = opt._keeps_rows(module, x)
        if not opt._stats and not keep_rows:
            return
        batch = x.shape[0]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            pending = opt._pending.setdefault(module, {})
            if opt._stats:
                if isinstance(module, nn.Linear):
                    pending["a"] = x  # folded into the average in step (_fold): one addmm, no temporary
                else:
                    pending["A"] = _activation_factor(module, x).div_(batch)
            if keep_rows:
                pending["x"] = x
        output.register_hook(_OutputGradHook(opt, module, batch))


class _OutputGradHook:
    def __init__(self, optimizer: KFAC, module: nn.Module, batch: int) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._module = module
        self._batch = batch

    def __call__(self, grad: Tensor) -> None:
        opt = self._optimizer()
        if opt is None or self._module in opt._seen_backward:
            return
        if opt.defaults["fisher"] == "mc" and not opt._sampling:
            return  # the Monte-Carlo Fisher only takes the sampled backward
        opt._seen_backward.add(self._module)
        grad = grad.to(self._module.weight.dtype)
        with torch.no_grad():
            pending = opt._pending.setdefault(self._module, {})
            if opt._stats:
                if isinstance(self._module, nn.Linear):
                    pending["g"] = grad.detach()  # folded into the average in step (_fold)
                else:
                    # grad is d(mean loss)/d(output); per-sample gradients are batch times larger.
                    g = _output_rows(self._module, grad.detach()) * self._batch
                    pending["G"] = (g.T @ g).div_(g.shape[0])
            if "x" in pending and grad.ndim == 2:
                pending["go"] = grad.detach()


class KFAC(FullStateMixin, Optimizer):
    r"""K-FAC with momentum, factored Tikhonov damping and KL clipping.

    For a layer with input rows :math:`a` (Conv2d: unfolded patches, Grosse & Martens 2016) and output
    gradients :math:`\delta`, the Fisher block is approximated by :math:`A \otimes G` with exponential moving
    averages (decay ``stat_decay``) of :math:`A = \frac1B\sum a a^\top` and
    :math:`G = \frac1{|T| B}\sum \delta \delta^\top`. The weight gradient :math:`\nabla W` (bias as a last
    column) is preconditioned as

    .. math::
        V = (G + \tfrac{\sqrt\lambda}{\pi} I)^{-1}\, \nabla W\, (A + \pi\sqrt\lambda\, I)^{-1},\qquad
        \pi = \sqrt{\frac{\operatorname{tr}A / \dim A}{\operatorname{tr}G / \dim G}}

    (:math:`\pi = 1` without ``pi_correction`` or when a trace is zero; with no statistics both factors are
    zero, so ``damping=1`` gives :math:`V = \nabla W`). The inverses are refreshed every ``inv_every`` steps.
    KL clipping scales every preconditioned gradient by
    :math:`\nu = \min(1, \sqrt{\kappa / \sum \eta^2 \langle V, \nabla W\rangle})`, then
    :math:`d = \nu V + \text{wd}\, W`, :math:`b \leftarrow \mu b + d`, :math:`W \leftarrow W - \eta b`.
    Parameters outside supported layers take the same momentum step on their plain gradient.

    The options are those of :class:`KFACConfig` (its docstring gives their meaning and why the default
    cadence is statistics every 10 and inverses every 100 steps); pass a config, a mapping (a YAML section)
    or keywords. ``lr``, ``momentum``, ``damping``, ``stat_decay``, ``inv_every``, ``weight_decay``,
    ``pi_correction`` and ``low_rank`` may differ per parameter group (a layer follows its weight's group)
    and are read from the groups at every step, so editing a group's value takes effect (``self.config``
    records the options the optimizer was built with; the groups hold the live values); ``stat_every``,
    ``fisher`` and ``kl_clip`` act on the whole step and are optimizer-wide: a group that sets them to
    another value is refused with a ``ValueError``. Layers whose parameters arrive later through
    ``add_param_group`` (as Lightning's ``BaseFinetuning`` does when it unfreezes a block) are
    preconditioned from then on. ``copy.deepcopy`` and pickling keep the layers (the copy hooks the copied
    layers) and the trajectory continues identically.

    Statistics are collected by forward hooks that are attached to the layers when training starts (the
    first :meth:`step` or :meth:`capture`, not the constructor) and are active only during the closure
    evaluated by ``step`` (first forward and first backward of each layer in it, train mode, grad enabled)
    and only every ``stat_every`` steps (on the other steps the hooks only keep what the low-rank path
    needs). In a hand-written loop, wrap the forward and backward in ``with optimizer.capture():`` and call
    ``step()`` afterwards.

    Host reads: on an accelerator the step reads no device value except one vector per inverse refresh
    (Cholesky status and finiteness of the factors, every ``inv_every`` steps); the low-rank path, whose
    check is one boolean vector read per step, runs on the CPU only, where reading a value waits for
    nothing.

    Args:
        model: The network whose ``Linear``/``Conv2d`` layers are preconditioned.
        config: A :class:`KFACConfig`, a mapping of its fields, or ``None`` (the defaults).
        params: Parameters or groups to optimize (default: all of ``model``'s that require grad).
        **options: :class:`KFACConfig` fields overriding ``config``'s.

    Raises:
        TypeError: For a model that is not an ``nn.Module``, an unknown option or one of the wrong type.
        ValueError: For an out-of-range option.

    References:
        Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
        ICML 2015, arXiv:1503.05671.
        Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
        ICML 2016, arXiv:1602.01407.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KFACConfig | Mapping[str, Any] | None = None,
        *,
        params: Any = None,
        **options: Any,
    ) -> None:
        check_type("model", model, nn.Module)
        self.config = KFACConfig.build(config, **options)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "seed"}
        super().__init__(params, defaults)
        #: Every supported layer of the model, owned or not yet (add_param_group may bring it in).
        self._model_layers: list[nn.Module] = [m for m in model.modules() if _supported(m)]
        self._layers: list[nn.Module] = []
        self._hooked = True
        self._capturing = False
        self._stats = True
        self._sampling = False
        self._rng = StateGenerator(self.config.seed)
        self._init_transient()
        self._adopt_layers()

    _TRANSIENT = ("_handles", "_pending", "_seen_forward", "_seen_backward", "_attached", "_probes", "_groups",
                  "_checked")

    def _init_transient(self) -> None:
        self._seen_forward: set[nn.Module] = set()
        self._seen_backward: set[nn.Module] = set()
        self._pending: dict[nn.Module, dict[str, Tensor]] = {}
        self._handles: list[Any] = []
        self._attached = False
        self._probes: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self._groups: dict[Tensor, dict[str, Any]] = {}
        self._checked: list[tuple[Any, ...]] = []

    def _restore(self) -> None:
        if "_handles" in self.__dict__ or "_layers" not in self.__dict__:
            return  # load_state_dict on a live optimizer: nothing to rebuild
        self._init_transient()
        self._capturing = False

    def _attach(self) -> None:
        """Hook every preconditioned layer (done once, when training starts)."""
        self._attached = True
        if not self._hooked:
            return
        for module in self._layers:
            self._hook(module)

    def _hook(self, module: nn.Module) -> None:
        # A copied or unpickled model carries dead hooks of the original optimizer: drop them first.
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _Hooks):
                del module._forward_hooks[key]
        self._handles.append(module.register_forward_hook(_Hooks(self, module)))

    def _adopt_layers(self) -> None:
        """Precondition (and, once attached, hook) every supported layer whose parameters are all here."""
        owned = {p for group in self.param_groups for p in group["params"]}
        for m in self._model_layers:
            if m in self._layers or m.weight not in owned or (m.bias is not None and m.bias not in owned):
                continue
            self._layers.append(m)
            if self._attached and self._hooked:
                self._hook(m)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a layer whose parameters are now all in the optimizer is preconditioned from now on.

        Raises:
            ValueError: If the group sets an optimizer-wide option (``stat_every``, ``fisher``,
                ``kl_clip``) to a value other than the optimizer's, or an out-of-range per-group option.
            TypeError: For a per-group option of the wrong type.
        """
        _check_group(param_group, self.defaults)
        super().add_param_group(param_group)
        if "_model_layers" in self.__dict__:
            self._adopt_layers()

    def _check_groups(self) -> None:
        """Every group whose options were replaced since the last step, as :meth:`add_param_group` checks it.

        Values are compared by identity, so an unchanged group costs no check (and a tensor ``lr`` no read).
        """
        seen = [tuple(group.get(key) for key in _WIDE + _PER_GROUP) for group in self.param_groups]
        for group, values, old in zip(self.param_groups, seen, self._checked + [None] * len(seen), strict=False):
            if old is None or any(a is not b for a, b in zip(values, old, strict=True)):
                _check_group(group, self.defaults)
        self._checked = seen

    def remove_hooks(self) -> None:
        """Detach the statistics hooks from the model (the optimizer then steps with its last factors)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = False

    @contextmanager
    def capture(self, stats: bool = True) -> Iterator[None]:
        """Listen to the first forward and backward of each layer inside the block.

        Args:
            stats: Collect factor statistics; if false, only keep the rows for the low-rank path.
        """
        if not self._attached:
            self._attach()
        self._map_groups()
        self._capturing, self._stats, self._seen_forward, self._seen_backward = True, stats, set(), set()
        try:
            yield
        finally:
            self._capturing = False

    def sample_fisher(self, outputs: Tensor, likelihood: str = "categorical") -> None:
        r"""Collect ``G`` for the Monte-Carlo Fisher from the network's outputs (no-op unless ``fisher="mc"``).

        Targets are drawn from the model's predictive distribution and the loss on them is
        back-propagated (with ``torch.autograd.grad``, so no ``.grad`` is touched) while the output
        hooks listen. Call it inside the capture window, before the training loss's backward.

        Args:
            outputs: ``(B, C)`` logits (``"categorical"``: :math:`\hat y \sim \mathrm{softmax}`) or
                ``(B, ...)`` predictions (``"gaussian"``: :math:`\hat y \sim \mathcal N(\text{outputs}, I)`,
                the Fisher of a squared loss).
            likelihood: ``"categorical"`` or ``"gaussian"``.

        Raises:
            ValueError: For an unknown likelihood.
        """
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
        if self.defaults["fisher"] != "mc" or not (self._capturing and self._stats) or not outputs.requires_grad:
            return
        generator = self._rng.fetch(self.state, outputs.device)
        batch = outputs.shape[0]
        with torch.enable_grad():
            if likelihood == "categorical":
                logits = outputs.reshape(-1, outputs.shape[-1])
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), dim=-1)
                    target = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                loss = F.cross_entropy(logits, target, reduction="sum") / batch
            else:
                noise = torch.randn(outputs.shape, generator=generator, device=outputs.device,
                                    dtype=outputs.dtype)
                loss = 0.5 * (outputs - (outputs.detach() + noise)).pow(2).sum() / batch
            weights = [m.weight for m in self._layers]
            self._sampling = True
            try:
                torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
            finally:
                self._sampling = False
        self._rng.store(self.state)

    def _step_state(self) -> dict[str, int]:
        return self.state.setdefault(_STEP_KEY, {"step": 0})  # type: ignore[call-overload]

    def _map_groups(self) -> dict[Tensor, dict[str, Any]]:
        """Parameter -> its group, built once per step (no scan of the groups per layer)."""
        self._groups = {p: group for group in self.param_groups for p in group["params"]}
        return self._groups

    def _keeps_rows(self, module: nn.Module, x: Tensor) -> bool:
        """Whether to keep the layer's input rows for the low-rank preconditioning path."""
        group = self._groups.get(module.weight)
        return (
            group is not None and group["low_rank"] and self.defaults["fisher"] == "empirical"
            and x.device.type == "cpu"  # its check is read on the host: free on the CPU, a sync elsewhere
            and isinstance(module, nn.Linear) and x.ndim == 2
            and 2 * x.shape[0] < min(module.in_features, module.out_features)
        )

    def _update_factors(self, groups: dict[Tensor, dict[str, Any]]) -> dict[nn.Module, dict[str, Tensor]]:
        pending, self._pending = self._pending, {}
        for module in self._layers:
            stats = pending.get(module, {})
            if not ("A" in stats or "a" in stats) or not ("G" in stats or "g" in stats):
                continue
            state = self.state[module.weight]
            decay = groups[module.weight]["stat_decay"]
            # The first statistics are taken whole: A <- new, then A <- decay A + (1 - decay) new.
            beta, weight = (decay, 1.0 - decay) if "A" in state else (0.0, 1.0)
            if "a" in stats:  # Linear: A = [X, 1]^T [X, 1] / B; G = B^2 go^T go / rows (per-sample scale)
                a = stats["a"].reshape(-1, stats["a"].shape[-1])
                g = stats["g"].reshape(-1, stats["g"].shape[-1])
                batch = stats["a"].shape[0]
                state["A"] = _fold(state.get("A"), a, beta, weight / batch, module.bias is not None)
                state["G"] = _fold(state.get("G"), g, beta, weight * batch * batch / g.shape[0], False)
                continue
            for key in ("A", "G"):
                if key in state:
                    state[key].mul_(decay).add_(stats[key], alpha=1.0 - decay)
                else:
                    state[key] = stats[key].clone()
        return pending

    @staticmethod
    def _damped_inverses(pairs: list[tuple[Tensor, Tensor | float]]) -> list[Tensor] | None:
        """``(M + shift I)^-1`` for each pair by Cholesky, with one host read for all of them.

        Returns ``None`` if a factor is not finite. A factor that round-off made indefinite is inverted
        through its eigendecomposition with the spectrum clipped at the shift.
        """
        chols, works, sums = [], [], []
        for matrix, shift in pairs:
            # Cholesky and eigh have no half-precision kernels: factorize half factors in float32.
            work = matrix.float() if matrix.dtype in (torch.float16, torch.bfloat16) else matrix.clone()
            damped = work
            damped.diagonal().add_(shift)  # M + shift I without an identity matrix and two temporaries
            chol, info = torch.linalg.cholesky_ex(damped)
            # A sum is finite only if every entry is (inf or nan anywhere propagates): one read of the
            # factor instead of isfinite's mask; a non-finite sum (overflow included) is settled below.
            sums.append(matrix.sum())
            chols.append((chol, info))
            works.append(damped)
        if not pairs:
            return []
        # The refresh's one host read: every factorization's status and whether each factor's sum is finite.
        bad_sum = ~torch.isfinite(torch.stack(sums))
        status = torch.cat([torch.stack([info for _, info in chols]), bad_sum.any().to(chols[0][1].dtype)[None]])
        status = status.tolist()
        if status[-1] and not all(bool(torch.isfinite(matrix).all()) for matrix, _ in pairs):
            return None
        out = []
        for (matrix, shift), (chol, _), damped, info in zip(pairs, chols, works, status, strict=False):
            if info == 0:
                out.append(torch.cholesky_inverse(chol).to(matrix.dtype))
                continue
            values, vectors = torch.linalg.eigh(damped)  # round-off made it indefinite: clip the spectrum
            floor = values.new_tensor(shift) if not isinstance(shift, Tensor) else shift.to(values.dtype)
            out.append(((vectors / torch.maximum(values, floor)) @ vectors.T).to(matrix.dtype))
        return out

    def _update_inverses(self, step: int, groups: dict[Tensor, dict[str, Any]]) -> None:
        """Refresh a layer's inverses every ``inv_every`` steps of its group; invert new statistics at once."""
        for module in self._layers:
            state = self.state[module.weight]
            group = groups[module.weight]
            if "A" not in state or (step % group["inv_every"] != 0 and "A_inv" in state):
                continue
            a_fac, g_fac = state["A"], state["G"]
            root = group["damping"] ** 0.5
            shift_a: Tensor | float = root
            shift_g: Tensor | float = root
            if group["pi_correction"]:
                # On the device (no host sync); pi = 1 when a trace is zero.
                ta = torch.trace(a_fac).double() / a_fac.shape[0]
                tg = torch.trace(g_fac).double() / g_fac.shape[0]
                pi = torch.where((ta > 0) & (tg > 0), (ta / tg.clamp_min(1e-300)).sqrt(), 1.0)
                shift_a, shift_g = pi * root, root / pi
            inverses = self._damped_inverses([(a_fac, shift_a), (g_fac, shift_g)])
            if inverses is None:
                raise FloatingPointError(
                    f"K-FAC factors of {module} are not finite: training diverged; lower lr, raise damping "
                    "or set kl_clip"
                )
            state["A_inv"], state["G_inv"] = inverses

    def _probe(self, rows: int, like: Tensor) -> Tensor:
        """Fixed Gaussian probes of the low-rank check, one per row (the check needs no reproducible stream).

        Stored as ``(_PROBES, rows)``: the check multiplies them into the gradient from the left
        (``R^T gW^T``), which reads ``gW`` once in its storage order; ``gW R`` (a matrix times four
        columns) runs 4-6x slower on CPU BLAS for the same bytes.
        """
        key = (rows, like.device, like.dtype)
        probe = self._probes.get(key)
        if probe is None:
            gen = torch.Generator().manual_seed(rows)
            probe = torch.randn(rows, _PROBES, generator=gen, dtype=torch.float64).T.contiguous()
            probe = probe.to(like.device, like.dtype)
            self._probes[key] = probe
        return probe

    @staticmethod
    def _low_rank(weight_grad: Tensor, bias_grad: Tensor | None, rows: dict[str, Tensor], a_inv: Tensor,
                  g_inv: Tensor, probe: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        r"""``G^-1 [gW, gb] A^-1`` through the captured batch, as the factors ``(P, Q)`` of ``V = P Q``.

        Returns ``(P, Q, <V, [gW, gb]>, ok)`` (``None`` without captured rows). ``ok`` (on the device) says
        whether ``.grad`` is ``scale * go^T [X, 1]``, tested on the random probes ``R`` (``probe`` is
        :math:`R^\top`, and the products are formed transposed, :math:`R^\top [gW, gb]^\top`):
        :math:`\|[gW, gb] R - s\, go^\top [X, 1] R\| \le 10^{-5} \|[gW, gb] R\|` with the least-squares
        :math:`s`; a gradient outside that line fails it with probability 1. Nothing of size
        ``out x in`` is formed but ``V`` itself (by the caller): the check and ``<V, grad>`` cost
        :math:`O(B (d_{in} + d_{out}) (B + k))`.
        """
        x, go = rows.get("x"), rows.get("go")
        if x is None or go is None:
            return None
        d = x.shape[1]
        grad_r = probe[:, :d] @ weight_grad.T  # (k, out): gW read once, row by row
        x_r = probe[:, :d] @ x.T  # (k, B)
        if bias_grad is not None:
            grad_r.addr_(probe[:, d], bias_grad)
            x_r.add_(probe[:, d:])
        batch_r = x_r @ go  # (R^T [X, 1]^T) go = (go^T [X, 1] R)^T
        num, den = torch.vdot(grad_r.flatten(), batch_r.flatten()), torch.vdot(batch_r.flatten(), batch_r.flatten())
        norm = torch.vdot(grad_r.flatten(), grad_r.flatten())
        scale = num / den  # den == 0 makes it non-finite, which fails the test
        residual = grad_r - scale * batch_r
        misfit = torch.vdot(residual.flatten(), residual.flatten())
        ok = (den != 0) & torch.isfinite(scale) & (misfit <= _LOW_RANK_RTOL**2 * norm)
        right = x @ a_inv[:d]
        if bias_grad is not None:
            right = right + a_inv[-1:]
        left = (g_inv @ go.T).mul_(scale)
        # <P Q, s go^T [X, 1]> = s * sum((go P) * ([X, 1] Q^T)): B x B matrices only.
        x_q = x @ right[:, :d].T
        if bias_grad is not None:
            x_q = x_q + right[:, d]
        inner = scale * torch.vdot((go @ left).flatten(), x_q.flatten())
        return left, right, inner, ok

    @staticmethod
    def _dense(state: dict[str, Any], grad: Tensor, bias_grad: Tensor | None, damping: float) -> Tensor:
        """``G^-1 [gW, gb] A^-1`` from the stored inverses (``[gW, gb] / damping`` before any statistics)."""
        if "A_inv" in state:
            a_inv, g_inv = state["A_inv"], state["G_inv"]
            if bias_grad is not None:
                # [gW, gb] A^-1 by blocks, so the gradient is never concatenated (gb's part added in place)
                right = (grad @ a_inv[:-1]).addr_(bias_grad, a_inv[-1])
            else:
                right = grad @ a_inv
            # G^-1 is symmetric, so G^-1 R = (R^T G^-1)^T: the same product with the odd dimension (in + 1,
            # e.g. 65) as rows, which CPU BLAS runs ~10% faster than as columns. A transposed view.
            return (right.T @ g_inv).T
        # No statistics yet: both factors are zero, so only the damping is left.
        return torch.cat([grad, bias_grad[:, None]], 1) / damping if bias_grad is not None else grad / damping

    def _precondition(
        self, captured: dict[nn.Module, dict[str, Tensor]], groups: dict[Tensor, dict[str, Any]]
    ) -> tuple[dict[Tensor, Tensor], dict[nn.Module, tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """Preconditioned gradients: dense ones by parameter, low-rank ones as factors by layer."""
        dense: dict[nn.Module, Tensor] = {}
        factored: dict[nn.Module, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        grads: dict[nn.Module, tuple[Tensor, Tensor | None]] = {}
        for module in self._layers:
            weight, bias = module.weight, module.bias
            if weight.grad is None:
                continue
            grad = weight.grad.reshape(weight.shape[0], -1)
            bias_grad = None
            if bias is not None:
                bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
            grads[module] = (grad, bias_grad)
            state = self.state[weight]
            if "A_inv" in state and module in captured:
                rows = captured[module]
                probe = self._probe(state["A_inv"].shape[0], grad) if "x" in rows else None
                found = None if probe is None else self._low_rank(
                    grad, bias_grad, rows, state["A_inv"], state["G_inv"], probe)
                if found is not None:
                    factored[module] = found
                    continue
            dense[module] = self._dense(state, grad, bias_grad, groups[weight]["damping"])
        if factored:
            # The step's one host read: the low-rank checks of all layers together.
            passed = torch.stack([found[3] for found in factored.values()]).tolist()
            for module, ok in zip(list(factored), passed, strict=True):
                if not ok:
                    del factored[module]
                    grad, bias_grad = grads[module]
                    dense[module] = self._dense(self.state[module.weight], grad, bias_grad,
                                                groups[module.weight]["damping"])
        out: dict[Tensor, Tensor] = {}
        for module, v in dense.items():
            weight, bias = module.weight, module.bias
            if bias is not None:
                out[weight] = v[:, :-1].reshape(weight.shape)
                if bias.grad is not None:
                    out[bias] = v[:, -1].reshape(bias.shape)
            else:
                out[weight] = v.reshape(weight.shape)
        return out, factored

    def _product_step(self, p: Tensor, left: Tensor, right: Tensor, lr: float, momentum: float, wd: float) -> None:
        """The momentum step of a weight whose preconditioned gradient is the product ``V = left @ right``.

        Once the momentum buffer exists, ``V`` is accumulated straight into it (``b = mu b + V`` is one
        ``addmm``): ``V`` is never materialized, which saves an ``out x in`` temporary and two passes over
        it. Same arithmetic as the other parameters' ``d = V + wd W, b = mu b + d`` up to the order of
        the additions.
        """
        buf = self.state[p].get("momentum_buffer") if momentum else None
        if buf is None:  # first step or no momentum: as every other parameter
            d_p = left @ right
            if wd:
                d_p.add_(p, alpha=wd)
            p.add_(heavy_ball(self.state, p, d_p, momentum), alpha=-lr)
            return
        buf.addmm_(left, right, beta=momentum)
        if wd:
            buf.add_(p, alpha=wd)
        p.add_(buf, alpha=-lr)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One K-FAC step; the closure (if any) is evaluated once, with the statistics hooks active.

        Args:
            closure: Zeroes the gradients, recomputes the loss and calls ``backward``.

        Returns:
            The closure's loss, or ``None``.
        """
        self._check_groups()
        groups = self._map_groups()
        counter = self._step_state()
        step = counter["step"]
        loss = None
        if closure is not None:
            with self.capture(stats=step % self.defaults["stat_every"] == 0):
                loss = call_closure(closure)
        captured = self._update_factors(groups)
        self._update_inverses(step, groups)

        updates, factored = self._precondition(captured, groups)
        nu: float | Tensor = 1.0
        if (updates or factored) and self.defaults["kl_clip"] is not None:
            # Kept on the device (no host sync): nu = min(1, sqrt(kl_clip / vg)) when vg > 0, else 1.
            vg = sum(
                (float(groups[p]["lr"]) ** 2) * torch.vdot(v.flatten(), p.grad.flatten()).double()
                for p, v in updates.items()
            ) + sum(
                (float(groups[m.weight]["lr"]) ** 2) * found[2].double() for m, found in factored.items()
            )
            nu = torch.where(vg > 0, (self.defaults["kl_clip"] / vg).sqrt().clamp(max=1.0), 1.0)
            for v in updates.values():
                v.mul_(nu)
        products: dict[Tensor, tuple[Tensor, Tensor]] = {}
        for module, (left, right, _, _) in factored.items():
            if isinstance(nu, Tensor):
                left.mul_(nu)  # out x B: cheaper than scaling V
            weight, bias = module.weight, module.bias
            d = weight.shape[1]
            products[weight] = (left, right[:, :d])
            if bias is not None and bias.grad is not None:
                updates[bias] = left @ right[:, d]
        for group in self.param_groups:
            lr, momentum, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p in products:
                    self._product_step(p, *products[p], lr, momentum, wd)
                    continue
                d_p = updates[p] if p in updates else p.grad.clone()
                if wd:
                    d_p.add_(p, alpha=wd)
                d_p = heavy_ball(self.state, p, d_p, momentum)
                p.add_(d_p, alpha=-lr)
        counter["step"] = step + 1
        return loss


def _factory(params: Any, *, model: nn.Module, config: KFACConfig | Mapping[str, Any] | None = None,
             **options: Any) -> KFAC:
    """The registry's factory (module level, so that the spec pickles)."""
    return KFAC(model, config, params=params, **options)


def _register() -> None:
    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    # The registry checks hyperparameters against the factory's signature: name every config field.
    keyword = inspect.Parameter.KEYWORD_ONLY
    _factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter("model", keyword),
         inspect.Parameter("config", keyword, default=None)]
        + [inspect.Parameter(f.name, keyword, default=f.default) for f in dataclasses.fields(KFACConfig)]
    )
    register(OptimizerSpec(
        "kfac", _factory, "second_order", needs_model=True,
        defaults={"lr": 0.05, "momentum": 0.9, "damping": 0.1, "kl_clip": 1e-3},
        reference="Martens & Grosse 2015, arXiv:1503.05671; Grosse & Martens 2016, arXiv:1602.01407",
        summary="Kronecker-factored natural gradient (Linear and Conv2d layers)",
        deviations={"complex": "the Kronecker factors are real covariances"},
    ))


_register()
