r"""HessianSpectrum: top and bottom Hessian eigenvalues, trace and spectral density during training.

A thin Lightning adapter over :mod:`lightning_optsurvey.curvature`: at the chosen cadence it builds a
:class:`~lightning_optsurvey.curvature.HessianOperator` of the training loss on a fixed measurement
subset and runs :func:`~lightning_optsurvey.curvature.lanczos` (top-``k`` and bottom-``k``),
:func:`~lightning_optsurvey.curvature.hutchpp_trace` and
:func:`~lightning_optsurvey.curvature.spectral_density`. The measurement runs inside
:func:`~lightning_optsurvey.callbacks._measure.measuring`, so training is bitwise identical with and
without the callback.

The sharpness :math:`\lambda_{\max}(\nabla^2 L)` is the survey's main lens on landscape-aware methods
(SAM and its relatives seek minima where it is small; at the edge of stability it hovers at
:math:`2/\eta`).

Options come in typed groups, as Distributed Shampoo's configs do: ``trace=TraceConfig(...)`` and
``density=DensityConfig(...)`` (``None``: not measured; ``True``: the defaults), which LightningCLI and YAML
configs accept as nested mappings.

Cheap by default where it can be: the top eigenvectors of the previous measurement start Lanczos (warm
start), Lanczos stops at its tolerance, and ``TraceConfig(rtol=...)`` reuses every Ritz pair of the basis
Lanczos has just built (not only the ``top_k`` wanted ones): their Ritz values are the exact trace of
:math:`H` on their span, and Hutchinson probes only the deflated rest :math:`(I - VV^\top) H (I - VV^\top)`,
until the standard error is below ``rtol`` of the estimate.

Why our own: PyHessian, the usual tool, switches the model to eval mode, leaves graph-carrying ``.grad``
behind, uses power iteration (15 products for a top eigenvalue accurate to 2e-3 on the digits CNN, wrong
values beyond the 2nd for top-5), stops its trace after two samples when the running mean turns
negative, and its density fails on current torch.

References:
    Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian eigenvalue
    density", ICML 2019, arXiv:1901.10159.
    Yao, Gholami, Keutzer & Mahoney, "PyHessian: Neural networks through the lens of the Hessian",
    arXiv:1912.07145.
    Wang & Choromanska, "A Survey of Optimization Methods for Training DL Models", arXiv:2501.14458.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_optsurvey.callbacks._artifacts import save_figure, save_json
from lightning_optsurvey.callbacks._measure import MeasuringCallback, check_loss_fn, resolve_loss_fn
from lightning_optsurvey.curvature import (
    EigenResult,
    HessianOperator,
    SpectralDensity,
    TraceResult,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
)
from lightning_optsurvey.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional,
    check_type,
)

__all__ = ["DensityConfig", "HessianSpectrum", "TraceConfig"]

BN_MODES = ("eval", "batch")


@dataclass(frozen=True)
class TraceConfig:
    """How :class:`HessianSpectrum` estimates the trace.

    Args:
        matvecs: Most Hessian-vector products to spend (>= 3). With ``rtol=None``, exactly this many, by
            Hutch++ (a third sketches the dominant range, a third projects on it, a third probes the rest).
        rtol: Stop once the standard error is at most ``rtol`` times the estimate's magnitude (in (0, 1)):
            every Ritz pair of the same measurement's top-``k`` Lanczos basis deflates :math:`H` (their
            Ritz values are its exact trace on their span, no product spent), and Hutchinson probes the
            rest in rounds of ``block`` until the bound holds or ``matvecs`` products are spent. ``None``:
            the fixed Hutch++ budget.
        block: Probes per round with ``rtol`` (>= 2: a standard error needs two samples).

    Raises:
        TypeError: For a value of the wrong type.
        ValueError: For an out-of-range value.
    """

    matvecs: int = 60
    rtol: float | None = None
    block: int = 4

    def __post_init__(self) -> None:
        check_int("matvecs", self.matvecs, low=3)
        check_optional(check_float, "rtol", self.rtol, low=0.0, high=1.0, low_open=True, high_open=True)
        check_int("block", self.block, low=2)


@dataclass(frozen=True)
class DensityConfig:
    """How :class:`HessianSpectrum` estimates the spectral density (stochastic Lanczos quadrature).

    Args:
        probes: Random start vectors (>= 1); the density is their average.
        steps: Lanczos steps per probe (>= 1): the number of quadrature nodes.

    Raises:
        TypeError: For a value of the wrong type.
        ValueError: For an out-of-range value.
    """

    probes: int = 5
    steps: int = 60

    def __post_init__(self) -> None:
        check_int("probes", self.probes)
        check_int("steps", self.steps)


_DEFAULT_TRACE = TraceConfig()
_DEFAULT_DENSITY = DensityConfig()


@functools.lru_cache(maxsize=64)
def _config_key(config: Any, default: Any) -> Any:
    """A config's part of the state key (a default config as ``True``, ``None`` as ``False``, else its fields).

    A default keys as ``True`` as the flags did, so older checkpoints still match. Cached (the configs are
    frozen, hence hashable): building the default configs and an ``asdict`` on each key cost 17 us.
    """
    return config is not None if config in (None, default) else asdict(config)


def _config(name: str, value: Any, kind: type) -> Any:
    """``None`` (off), the defaults (``True``) or the given config; ``False`` means off."""
    if isinstance(value, bool):
        return kind() if value else None
    return check_optional(check_type, name, value, types=kind, what=f"a {kind.__name__}, a bool or None")


class _Deflated:
    r""":math:`(I - VV^\top) H (I - VV^\top)` for orthonormal columns ``V``: what Hutchinson probes after deflation."""

    def __init__(self, op: HessianOperator, basis: Tensor) -> None:
        self.op, self.basis = op, basis
        self.numel, self.dtype, self.device = op.numel, op.dtype, op.device

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    def _project(self, x: Tensor) -> Tensor:
        x = x.to(self.basis.dtype)
        return x - self.basis @ (self.basis.T @ x)

    def __matmul__(self, x: Tensor) -> Tensor:
        return self._project(self.op @ self._project(x))


def _pooled(parts: list[TraceResult]) -> tuple[float, float, int]:
    """Mean, standard error and count of the union of several Hutchinson samples, from their summaries."""
    n = sum(p.num_matvecs for p in parts)
    mean = sum(p.estimate * p.num_matvecs for p in parts) / n
    # each part: sample variance s^2 = stderr^2 * n_i; pooled sum of squares about the grand mean
    squares = sum((p.num_matvecs - 1) * p.stderr ** 2 * p.num_matvecs + p.num_matvecs * (p.estimate - mean) ** 2
                  for p in parts)
    return mean, math.sqrt(squares / (n - 1) / n), n


class HessianSpectrum(MeasuringCallback):
    r"""Log extreme Hessian eigenvalues (and optionally trace and spectral density) of the training loss.

    Metrics (one value per measurement, logged at the optimizer step it happened):

    - ``hessian/eig_1 .. hessian/eig_<top_k>``: largest eigenvalues, descending;
    - ``hessian/eig_min_1 .. hessian/eig_min_<bottom_k>``: smallest, ascending (when ``bottom_k > 0``);
    - ``hessian/trace``, ``hessian/trace_stderr`` and ``hessian/trace_matvecs`` (when ``trace``);
    - ``hessian/<module>/eig_1``: top eigenvalue of each parameterized module's block (when
      ``per_layer``);
    - ``hessian/num_matvecs`` (Hessian-vector products) and ``hessian/seconds`` (wall time).

    With ``density`` each measurement also writes ``hessian/density_epoch_<E>.png`` and ``.json``
    (nodes and weights of the quadrature; ``_step_<S>`` is appended for step-cadence and fit-end
    measurements) to the MLflow run when the logger is an ``MLFlowLogger``, else under ``trainer.log_dir``.

    Under a multi-process strategy each rank measures its own shard of the subset and the products are
    all-reduced, so all ranks compute the same eigenpairs of the global loss; rank 0 logs.

    Args:
        top_k: Number of largest eigenvalues (>= 1).
        bottom_k: Number of smallest eigenvalues (>= 0).
        trace: A :class:`TraceConfig` (``True``: its defaults) to also estimate the trace; ``None``: not.
        density: A :class:`DensityConfig` (``True``: its defaults) to also estimate the spectral density
            by SLQ and save it as artifacts; ``None``: not.
        every_n_epochs: Measure after every n-th training epoch (``None``: not at epoch ends).
        every_n_steps: Measure after every n-th optimizer step (``None``: not at steps).
        at_fit_end: Also measure once when training ends.
        num_batches: Size of the fixed measurement subset in train batches (per rank).
        bn_mode: ``"eval"`` (BatchNorm running statistics) or ``"batch"`` (batch statistics, not updated).
        tol: Relative residual tolerance of Lanczos (``||Hv - lambda v|| <= tol |lambda|``).
        warm_start: Seed Lanczos with the previous measurement's eigenvectors (kept in the checkpoint).
        per_layer: Also log the top eigenvalue of each parameterized module's diagonal block.
        loss_fn: ``loss_fn(outputs, targets)`` or a ``BatchLoss``; default: the module's ``compute_loss(batch)``
            if it defines one (any batch structure), else its ``loss_fn`` or cross-entropy (``resolve_loss_fn``).
        seed: Seed of the callback's own generators (subset, Lanczos start, probes).
        max_iter: Most products per Lanczos call (default: Lanczos's own).

    Raises:
        TypeError: For an argument of the wrong type.
        ValueError: For a non-positive ``top_k``, negative ``bottom_k``, unknown ``bn_mode``, a ``tol``
            outside (0, 1), bad cadence or sizes; at setup, if ``top_k`` or ``bottom_k`` exceeds the
            number of parameters that require grad, or none does.

    Example:
        >>> cb = HessianSpectrum(top_k=2, trace=TraceConfig(rtol=0.1))
        >>> cb.trace
        TraceConfig(matvecs=60, rtol=0.1, block=4)
    """

    def __init__(
        self,
        top_k: int = 1,
        *,
        bottom_k: int = 0,
        trace: TraceConfig | bool | None = None,
        density: DensityConfig | bool | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_fit_end: bool = False,
        num_batches: int = 1,
        bn_mode: str = "eval",
        tol: float = 1e-3,
        warm_start: bool = True,
        per_layer: bool = False,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        seed: int = 0,
        max_iter: int | None = None,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, num_batches=num_batches,
                         seed=seed, at_fit_end=at_fit_end)
        self.top_k = check_int("top_k", top_k)
        self.bottom_k = check_int("bottom_k", bottom_k, low=0)
        self.trace: TraceConfig | None = _config("trace", trace, TraceConfig)
        self.density: DensityConfig | None = _config("density", density, DensityConfig)
        self.bn_mode = check_choice("bn_mode", bn_mode, BN_MODES)
        self.tol = check_float("tol", tol, low=0.0, high=1.0, low_open=True, high_open=True)
        self.warm_start = check_bool("warm_start", warm_start)
        self.per_layer = check_bool("per_layer", per_layer)
        self.max_iter = check_optional(check_int, "max_iter", max_iter)
        self.loss_fn = check_loss_fn(loss_fn)
        self._generator = torch.Generator().manual_seed(seed + 1)
        self._vectors: dict[str, Tensor] = {}  # warm starts: "top", "bottom", "layer/<module>"
        self.last_density: SpectralDensity | None = None

    @override
    def state_key_config(self) -> dict[str, Any]:
        return {**super().state_key_config(), "top_k": self.top_k, "bottom_k": self.bottom_k,
                "trace": _config_key(self.trace, _DEFAULT_TRACE),
                "density": _config_key(self.density, _DEFAULT_DENSITY),
                "bn_mode": self.bn_mode, "tol": self.tol, "per_layer": self.per_layer}

    # -- Lightning hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        numel = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if numel == 0:
            raise ValueError("HessianSpectrum: the module has no parameter that requires grad")
        for name, k in (("top_k", self.top_k), ("bottom_k", self.bottom_k)):
            if k > numel:
                raise ValueError(f"HessianSpectrum: {name}={k} exceeds the number of trainable parameters {numel}")

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["vectors"] = {k: v.detach().cpu() for k, v in self._vectors.items()}
        state["generator"] = self._generator.get_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._vectors = {k: v.clone() for k, v in state_dict.get("vectors", {}).items()}
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"])

    # -- measurement -------------------------------------------------------------------------------------
    def _reduce(self, trainer: Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return None

        def all_reduce_sum(t: Tensor) -> Tensor:
            out = t.clone()
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            return out

        return all_reduce_sum

    def _eigs(self, op: HessianOperator, key: str, k: int, which: str, all_ritz: bool = False) -> EigenResult:
        v0 = self._vectors.get(key) if self.warm_start else None
        if v0 is not None and v0.shape[0] != op.numel:
            v0 = None  # the model changed shape; start cold
        result = lanczos(op, k=k, which=which, tol=self.tol, max_iter=self.max_iter, v0=v0,  # type: ignore[arg-type]
                         generator=self._generator, all_ritz=all_ritz)
        if not bool(result.converged.all()):
            rank_zero_warn(f"HessianSpectrum: Lanczos ({key}) stopped after {result.num_matvecs} products "
                           f"with relative residuals above tol={self.tol}")
        self._vectors[key] = result.eigenvectors.to(op.dtype)
        return result

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        start = time.perf_counter()
        loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
        reduce = self._reduce(trainer)
        op = HessianOperator(pl_module, loss_fn, batches, bn_mode=self.bn_mode, reduce=reduce)  # type: ignore[arg-type]
        metrics: dict[str, float] = {}
        # With a tolerance-driven trace, every Ritz pair of Lanczos' basis deflates it (no product spent).
        top = self._eigs(op, "top", self.top_k, "LA",
                         all_ritz=self.trace is not None and self.trace.rtol is not None)
        for i, value in enumerate(top.eigenvalues.tolist(), start=1):
            metrics[f"hessian/eig_{i}"] = value
        if self.bottom_k:
            bottom = self._eigs(op, "bottom", self.bottom_k, "SA")
            for i, value in enumerate(bottom.eigenvalues.tolist(), start=1):
                metrics[f"hessian/eig_min_{i}"] = value
        if self.trace is not None:
            estimate, stderr, used = self._trace(op, self.trace, top)
            metrics["hessian/trace"] = estimate
            metrics["hessian/trace_stderr"] = stderr
            metrics["hessian/trace_matvecs"] = float(used)
        if self.density is not None:
            self.last_density = spectral_density(op, self.density.probes, self.density.steps,
                                                 generator=self._generator)
        num_matvecs = op.num_matvecs
        op.clear_cache()
        if self.per_layer:
            for module_name, names in _parameter_blocks(pl_module):
                block = HessianOperator(pl_module, loss_fn, batches, params=names, bn_mode=self.bn_mode,
                                        reduce=reduce)
                metrics[f"hessian/{module_name}/eig_1"] = float(self._eigs(block, f"layer/{module_name}", 1,
                                                                           "LA").eigenvalues[0])
                num_matvecs += block.num_matvecs
        metrics["hessian/num_matvecs"] = float(num_matvecs)
        metrics["hessian/seconds"] = time.perf_counter() - start
        return metrics

    def _trace(self, op: HessianOperator, config: TraceConfig, top: EigenResult) -> tuple[float, float, int]:
        """``(estimate, stderr, products)`` of the trace as ``config`` says (see :class:`TraceConfig`)."""
        if config.rtol is None:
            est = hutchpp_trace(op, config.matvecs, generator=self._generator)
            return est.estimate, est.stderr, est.num_matvecs
        # Deflate by every Ritz pair of Lanczos' basis when it returned them (its whole Krylov space, not only
        # the top_k pairs): V^T H V = diag(Ritz values) is the exact trace of H on their span, and the probes
        # see only the rest. On the digits CNN after 5 epochs (12 Ritz pairs, batch of 64) that cut the
        # per-probe standard deviation from 11.4 to 10.8 and the probes needed for rtol=0.1 from 17 to 14.5.
        if top.ritz_vectors is not None and top.ritz_values is not None:
            basis, known = top.ritz_vectors, float(top.ritz_values.sum())
        else:
            basis, known = top.eigenvectors, float(top.eigenvalues.sum())
        gram = basis.T @ basis  # in the basis' dtype: float32 resolves the 1e-4 test below (no float64 copies)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        # The Ritz vectors are orthonormal and V^T H V = diag(Ritz values); if rounding broke that, no deflation.
        if gram.numel() and (not bool(torch.isfinite(gram).all()) or float((gram - eye).abs().max()) > 1e-4):
            basis, known = basis[:, :0], 0.0
        deflated = _Deflated(op, basis)
        parts: list[TraceResult] = []
        while True:
            block = min(config.block, config.matvecs - sum(p.num_matvecs for p in parts))
            # On CPU a batched product costs more per vector than single ones (measured on the digits CNN);
            # on an accelerator the round's probes go in one batched product.
            batched = 1 if op.device.type == "cpu" else block
            parts.append(hutchinson_trace(deflated, block, generator=self._generator, block_size=batched))
            mean, stderr, used = _pooled(parts)
            if config.matvecs - used < 2 or stderr <= config.rtol * abs(known + mean):
                return known + mean, stderr, used

    @override
    def run_measurement(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        metrics = super().run_measurement(trainer, pl_module)
        if metrics and self.density is not None and self.last_density is not None:  # {}: skipped (non-finite)
            suffix = "" if self.trigger == "epoch" else f"_step_{trainer.global_step}"
            self._save_density(trainer, self.last_density, f"density_epoch_{trainer.current_epoch}{suffix}")
        return metrics

    def _save_density(self, trainer: Trainer, density: SpectralDensity, stem: str) -> None:
        title = f"Hessian spectral density, epoch {trainer.current_epoch}, step {trainer.global_step}"
        data = {"epoch": trainer.current_epoch, "step": trainer.global_step, **density.to_dict()}
        save_json(trainer, data, "hessian", f"{stem}.json")
        save_figure(trainer, density.plot(title=title), "hessian", f"{stem}.png")


def _parameter_blocks(module: nn.Module) -> list[tuple[str, list[str]]]:
    """``(module name, names of its own trainable parameters)`` for every module that has some."""
    blocks = []
    known = dict(module.named_parameters())  # tied parameters appear once, under their first name
    for name, sub in module.named_modules():
        own = [f"{name}.{p}" if name else p for p, t in sub.named_parameters(recurse=False) if t.requires_grad]
        own = [n for n in own if n in known]
        if own:
            blocks.append((name or "root", own))
    return blocks
