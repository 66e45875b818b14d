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

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_optsurvey.optim._common import (
    FullStateMixin,
    StateGenerator,
    call_closure,
    check_bool,
    check_int,
    check_lr,
    check_number,
    heavy_ball,
)

_STEP_KEY = "kfac"
#: A gradient counts as the captured batch's (up to a scale, e.g. norm clipping) within this relative error.
_LOW_RANK_RTOL = 1e-5
_FISHERS = ("empirical", "mc")
#: Options that act on the whole step (one capture window, one Fisher, one trust region): optimizer-wide.
_WIDE = ("stat_every", "fisher", "kl_clip")
_LIKELIHOODS = ("categorical", "gaussian")


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
        x = inputs[0].detach()
        keep_rows = opt._keeps_rows(module, x)
        if not opt._stats and not keep_rows:
            return
        batch = x.shape[0]
        with torch.no_grad():
            pending = opt._pending.setdefault(module, {})
            if opt._stats:
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
        with torch.no_grad():
            pending = opt._pending.setdefault(self._module, {})
            if opt._stats:
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

    ``lr``, ``momentum``, ``damping``, ``stat_decay``, ``inv_every``, ``weight_decay``, ``pi_correction``
    and ``low_rank`` may differ per parameter group (a layer follows its weight's group); ``stat_every``,
    ``fisher`` and ``kl_clip`` act on the whole step and are optimizer-wide: a group that sets them to
    another value is refused with a ``ValueError``. Layers whose parameters arrive later through
    ``add_param_group`` (as Lightning's ``BaseFinetuning`` does when it unfreezes a block) are
    preconditioned from then on. ``copy.deepcopy`` and pickling keep the layers (the copy hooks the copied
    layers) and the trajectory continues identically.

    Statistics are collected by hooks that are active only during the closure evaluated by ``step``
    (first forward and first backward of each layer in it, train mode, grad enabled) and only every
    ``stat_every`` steps (on the other steps the hooks only keep what the low-rank path needs). In a
    hand-written loop, wrap the forward and backward in ``with optimizer.capture():`` and call ``step()``
    afterwards.

    Args:
        model: The network whose ``Linear``/``Conv2d`` layers are preconditioned (hooks are added).
        lr: Learning rate :math:`\eta > 0`.
        momentum: Momentum :math:`\mu \in [0, 1)`.
        damping: Tikhonov damping :math:`\lambda > 0`.
        stat_decay: Decay of the factor averages, in :math:`[0, 1)`.
        inv_every: Steps between recomputations of the inverses (>= 1).
        kl_clip: :math:`\kappa > 0`, or ``None`` to disable KL clipping.
        weight_decay: L2 coefficient added after preconditioning, ``>= 0``.
        pi_correction: Use the :math:`\pi` split of the damping between the factors.
        stat_every: Steps between statistics updates (>= 1).
        fisher: ``"empirical"`` (``G`` from the training loss's backward) or ``"mc"`` (``G`` from
            :meth:`sample_fisher`'s backward of a loss on targets sampled from the model).
        seed: Seed of the target sampler (``fisher="mc"``); its position is kept in ``self.state``.
        low_rank: For a ``Linear`` layer whose batch ``B`` is below half its width, precondition the
            gradient through its factorization :math:`\nabla W = \Delta^\top [X, 1]` from the captured
            batch: :math:`G^{-1}\Delta^\top\,([X, 1] A^{-1})` costs :math:`O(B d^2)` instead of
            :math:`O(d^3)`. Used only when ``.grad`` equals that product up to a scale (norm clipping)
            within relative error 1e-5; otherwise (accumulation, other edits) the dense path runs.
        params: Parameters or groups to optimize (default: all of ``model``'s that require grad).

    Raises:
        ValueError: For an out-of-range hyperparameter or a model that is not an ``nn.Module``.

    References:
        Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
        ICML 2015, arXiv:1503.05671.
        Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
        ICML 2016, arXiv:1602.01407.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.9,
        damping: float = 1e-3,
        stat_decay: float = 0.95,
        inv_every: int = 10,
        kl_clip: float | None = 1e-3,
        weight_decay: float = 0.0,
        *,
        pi_correction: bool = True,
        stat_every: int = 1,
        fisher: str = "empirical",
        seed: int = 0,
        low_rank: bool = True,
        params: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        check_lr(lr)
        check_number("momentum", momentum, high=1.0, high_open=True)
        check_number("damping", damping, low_open=True)
        check_number("stat_decay", stat_decay, high=1.0, high_open=True)
        check_int("inv_every", inv_every)
        check_int("stat_every", stat_every)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, low_open=True)
        check_number("weight_decay", weight_decay)
        if fisher not in _FISHERS:
            raise ValueError(f"fisher must be one of {_FISHERS}, got {fisher!r}")
        check_int("seed", seed, low=0)
        check_bool("low_rank", low_rank)
        check_bool("pi_correction", pi_correction)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {"lr": lr, "momentum": momentum, "damping": damping, "stat_decay": stat_decay,
                    "kl_clip": kl_clip, "weight_decay": weight_decay, "pi_correction": pi_correction,
                    "inv_every": inv_every, "stat_every": stat_every, "fisher": fisher,
                    "low_rank": low_rank}
        super().__init__(params, defaults)
        #: Every supported layer of the model, owned or not yet (add_param_group may bring it in).
        self._model_layers: list[nn.Module] = [m for m in model.modules() if _supported(m)]
        self._layers: list[nn.Module] = []
        self._hooked = True
        self._capturing = False
        self._stats = True
        self._sampling = False
        self._rng = StateGenerator(seed)
        self._init_transient()
        self._adopt_layers()

    _TRANSIENT = ("_handles", "_pending", "_seen_forward", "_seen_backward")

    def _init_transient(self) -> None:
        self._seen_forward: set[nn.Module] = set()
        self._seen_backward: set[nn.Module] = set()
        self._pending: dict[nn.Module, dict[str, Tensor]] = {}
        self._handles: list[Any] = []

    def _restore(self) -> None:
        if "_handles" in self.__dict__ or "_layers" not in self.__dict__:
            return  # load_state_dict on a live optimizer: nothing to rebuild
        self._init_transient()
        self._capturing = False
        if self._hooked:
            for module in self._layers:
                for key, hook in list(module._forward_hooks.items()):
                    if isinstance(hook, _Hooks):
                        del module._forward_hooks[key]
                self._handles.append(module.register_forward_hook(_Hooks(self, module)))

    def _adopt_layers(self) -> None:
        """Precondition (and hook) every supported layer whose parameters are all in this optimizer."""
        owned = {p for group in self.param_groups for p in group["params"]}
        for m in self._model_layers:
            if m in self._layers or m.weight not in owned or (m.bias is not None and m.bias not in owned):
                continue
            self._layers.append(m)
            if self._hooked:
                self._handles.append(m.register_forward_hook(_Hooks(self, m)))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a layer whose parameters are now all in the optimizer is preconditioned from now on.

        Raises:
            ValueError: If the group sets an optimizer-wide option (``stat_every``, ``fisher``,
                ``kl_clip``) to a value other than the optimizer's, or an out-of-range per-group option.
        """
        for key in _WIDE:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"K-FAC's {key} is optimizer-wide ({self.defaults[key]!r}); a parameter group cannot set "
                    f"{param_group[key]!r}"
                )
        if "lr" in param_group:
            check_lr(param_group["lr"])
        for key, kwargs in (("momentum", {"high": 1.0, "high_open": True}),
                            ("damping", {"low_open": True}), ("stat_decay", {"high": 1.0, "high_open": True}),
                            ("weight_decay", {})):
            if key in param_group:
                check_number(key, param_group[key], **kwargs)
        if "inv_every" in param_group:
            check_int("inv_every", param_group["inv_every"])
        super().add_param_group(param_group)
        if "_model_layers" in self.__dict__:
            self._adopt_layers()

    def _check_wide(self) -> None:
        for group in self.param_groups:
            for key in _WIDE:
                if group.get(key, self.defaults[key]) != self.defaults[key]:
                    raise ValueError(
                        f"K-FAC's {key} is optimizer-wide ({self.defaults[key]!r}) but a parameter group was set "
                        f"to {group[key]!r}; change optimizer.defaults[{key!r}] and every group together"
                    )

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

    def _keeps_rows(self, module: nn.Module, x: Tensor) -> bool:
        """Whether to keep the layer's input rows for the low-rank preconditioning path."""
        return (
            self._group_of(module.weight)["low_rank"] and self.defaults["fisher"] == "empirical"
            and isinstance(module, nn.Linear) and x.ndim == 2
            and 2 * x.shape[0] < min(module.in_features, module.out_features)
        )

    def _update_factors(self) -> dict[nn.Module, dict[str, Tensor]]:
        pending, self._pending = self._pending, {}
        for module in self._layers:
            stats = pending.get(module, {})
            if "A" not in stats or "G" not in stats:
                continue
            state = self.state[module.weight]
            decay = self._group_of(module.weight)["stat_decay"]
            for key in ("A", "G"):
                if key in state:
                    state[key].mul_(decay).add_(stats[key], alpha=1.0 - decay)
                else:
                    state[key] = stats[key].clone()
        return pending

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is q for q in group["params"]):
                return group
        raise KeyError("parameter not in this optimizer")

    @staticmethod
    def _damped_inverses(pairs: list[tuple[Tensor, Tensor | float]]) -> list[Tensor] | None:
        """``(M + shift I)^-1`` for each pair by Cholesky, with one host sync for all of them.

        Returns ``None`` if a factor is not finite. A factor that round-off made indefinite is inverted
        through its eigendecomposition with the spectrum clipped at the shift.
        """
        chols, works = [], []
        ok = None
        for matrix, shift in pairs:
            # Cholesky and eigh have no half-precision kernels: factorize half factors in float32.
            work = matrix.float() if matrix.dtype in (torch.float16, torch.bfloat16) else matrix
            damped = work + shift * torch.eye(work.shape[0], dtype=work.dtype, device=work.device)
            chol, info = torch.linalg.cholesky_ex(damped)
            good = torch.isfinite(matrix).all()
            ok = good if ok is None else ok & good
            chols.append((chol, info))
            works.append(damped)
        infos = torch.stack([info for _, info in chols]).cpu() if chols else None
        if ok is not None and not bool(ok):
            return None
        out = []
        for (matrix, shift), (chol, _), damped, info in zip(pairs, chols, works, infos, strict=True):
            if int(info) == 0:
                out.append(torch.cholesky_inverse(chol).to(matrix.dtype))
                continue
            values, vectors = torch.linalg.eigh(damped)  # round-off made it indefinite: clip the spectrum
            floor = shift if isinstance(shift, float) else float(shift)
            out.append(((vectors / values.clamp_min(floor)) @ vectors.T).to(matrix.dtype))
        return out

    def _update_inverses(self, step: int) -> None:
        """Refresh a layer's inverses every ``inv_every`` steps of its group; invert new statistics at once."""
        for module in self._layers:
            state = self.state[module.weight]
            group = self._group_of(module.weight)
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

    @staticmethod
    def _low_rank(weight_grad: Tensor, bias_grad: Tensor | None, rows: dict[str, Tensor], a_inv: Tensor,
                  g_inv: Tensor) -> Tensor | None:
        """``G^-1 [gW, gb] A^-1`` through the captured batch, or ``None`` if ``.grad`` is not its gradient."""
        x, go = rows.get("x"), rows.get("go")
        if x is None or go is None:
            return None
        gw = go.T @ x
        num, den = torch.vdot(weight_grad.flatten(), gw.flatten()), torch.vdot(gw.flatten(), gw.flatten())
        norm = torch.vdot(weight_grad.flatten(), weight_grad.flatten())
        gb = None
        if bias_grad is not None:
            gb = go.sum(0)
            num, den = num + torch.vdot(bias_grad, gb), den + torch.vdot(gb, gb)
            norm = norm + torch.vdot(bias_grad, bias_grad)
        # One host sync per layer: den == 0 makes scale non-finite, which fails the misfit test too.
        scale = num / den
        residual = gw.mul_(-scale).add_(weight_grad).flatten()  # gw is not needed any more
        misfit = torch.vdot(residual, residual)
        if gb is not None:
            rest = bias_grad - scale * gb
            misfit = misfit + torch.vdot(rest, rest)
        if not bool((den != 0) & torch.isfinite(scale) & (misfit <= _LOW_RANK_RTOL**2 * norm)):
            return None
        right = x @ a_inv[: x.shape[1]]
        if bias_grad is not None:
            right = right + a_inv[-1:]
        return (g_inv @ go.T).mul_(scale) @ right

    def _precondition(self, captured: dict[nn.Module, dict[str, Tensor]]) -> dict[Tensor, Tensor]:
        """Preconditioned gradients of the supported layers' parameters."""
        out: dict[Tensor, Tensor] = {}
        for module in self._layers:
            weight, bias = module.weight, module.bias
            if weight.grad is None:
                continue
            grad = weight.grad.reshape(weight.shape[0], -1)
            state = self.state[weight]
            has_bias = bias is not None
            bias_grad = None
            if has_bias:
                bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
            v = None
            if "A_inv" in state and module in captured:
                v = self._low_rank(grad, bias_grad, captured[module], state["A_inv"], state["G_inv"])
            if v is None and "A_inv" in state:
                a_inv, g_inv = state["A_inv"], state["G_inv"]
                if has_bias:
                    # [gW, gb] A^-1 by blocks, so the gradient is never concatenated
                    right = torch.addmm(bias_grad[:, None] @ a_inv[-1:], grad, a_inv[:-1])
                else:
                    right = grad @ a_inv
                v = g_inv @ right
            elif v is None:
                # No statistics yet: both factors are zero, so only the damping is left.
                damping = self._group_of(weight)["damping"]
                v = torch.cat([grad, bias_grad[:, None]], 1) / damping if has_bias else grad / damping
            if has_bias:
                out[weight] = v[:, :-1].reshape(weight.shape)
                if bias.grad is not None:
                    out[bias] = v[:, -1].reshape(bias.shape)
            else:
                out[weight] = v.reshape(weight.shape)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One K-FAC step; the closure (if any) is evaluated once, with the statistics hooks active.

        Args:
            closure: Zeroes the gradients, recomputes the loss and calls ``backward``.

        Returns:
            The closure's loss, or ``None``.
        """
        self._check_wide()
        counter = self._step_state()
        step = counter["step"]
        loss = None
        if closure is not None:
            with self.capture(stats=step % self.defaults["stat_every"] == 0):
                loss = call_closure(closure)
        captured = self._update_factors()
        self._update_inverses(step)

        updates = self._precondition(captured)
        nu: float | Tensor = 1.0
        if updates and self.defaults["kl_clip"] is not None:
            # Kept on the device (no host sync): nu = min(1, sqrt(kl_clip / vg)) when vg > 0, else 1.
            vg = sum(
                (float(self._group_of(p)["lr"]) ** 2) * torch.vdot(v.flatten(), p.grad.flatten()).double()
                for p, v in updates.items()
            )
            nu = torch.where(vg > 0, (self.defaults["kl_clip"] / vg).sqrt().clamp(max=1.0), 1.0)
        for group in self.param_groups:
            lr, momentum, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = updates[p].mul_(nu) if p in updates else p.grad.clone()
                if wd:
                    d_p.add_(p, alpha=wd)
                d_p = heavy_ball(self.state, p, d_p, momentum)
                p.add_(d_p, alpha=-lr)
        counter["step"] = step + 1
        return loss


def _factory(params: Any, *, model: nn.Module, **hparams: Any) -> KFAC:
    """The registry's factory (module level, so that the spec pickles)."""
    return KFAC(model, params=params, **hparams)


def _register() -> None:
    import inspect

    from lightning_optsurvey.optim.registry import OptimizerSpec, register

    _factory.__signature__ = inspect.signature(KFAC)  # type: ignore[attr-defined]
    register(OptimizerSpec(
        "kfac", _factory, "second_order", needs_model=True,
        defaults={"lr": 0.05, "momentum": 0.9, "damping": 0.1, "inv_every": 10, "stat_every": 10,
                  "kl_clip": 1e-3},
        reference="Martens & Grosse 2015, arXiv:1503.05671; Grosse & Martens 2016, arXiv:1602.01407",
        summary="Kronecker-factored natural gradient (Linear and Conv2d layers)",
        deviations={"complex": "the Kronecker factors are real covariances"},
    ))


_register()
