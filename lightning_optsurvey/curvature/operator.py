r"""The Hessian of a model's loss as a linear operator: ``op @ v`` and ``op.matmat(V)``.

.. math::

    L(\theta) = \sum_b \frac{n_b}{N} \ell\big(f(x_b; \theta), y_b\big), \qquad
    H v = \nabla^2_\theta L(\theta)\, v ,

where :math:`\ell` is the (batch-mean) loss, :math:`n_b` the size of batch :math:`b` and :math:`N =
\sum_b n_b`, so the loss is the mean over all samples even when batches differ in size.

Fresh products are forward-over-reverse (Pearlmutter's trick in forward mode): ``torch.func.jvp`` of
``torch.func.grad`` of the loss written with ``torch.func.functional_call``; several vectors go through
one pass with ``torch.func.vmap``. Repeated products at one point reuse a linearization (below).
Nothing about the model changes: parameters enter as detached copies, the modes are set for the product
and restored right after, the running statistics of BatchNorm are never updated and no ``.grad`` is
written.

Reusing a linearization at the point pays. Measured by the HVP table of
``benchmarks/hessian_vs_pyhessian.py`` (one CPU thread, one batch of 256 digits), in
gradient-equivalents (median over rounds of the time of one product / the time of one loss gradient
taken just before it, so the ratio survives a loaded machine):

=================================================  ================  ================
product                                            CNN (49k params)  MLP-wide (1.1M)
=================================================  ================  ================
forward-over-reverse, one vector                   2.6               3.6
forward-over-reverse, vmap of 8, per column        1.7               2.8
retained double-backward graph (default)           1.6               2.1
PyHessian's product (same retained graph)          1.6               2.0
``torch.func.linearize``, per product              1.4 (+65 trace)   2.1 (+21 trace)
=================================================  ================  ================

So by default (``linearize=True``) the double-backward graph of each batch is built once per point and
every product is one backward pass through it. ``torch.func.linearize`` saves at most 0.2 gradients per
product but costs 20 to 65 gradients to trace, more than a whole top-k measurement (5 to 21 products)
uses. ``linearize=False`` gives the memory-free forward-over-reverse path with vmapped columns.

Why our own: PyHessian (the usual tool) changes the model (eval mode, graph-carrying ``.grad``), builds
a double-backward graph per batch, and has no batched product; curvlinops is not a dependency and its
operators are SciPy-based (float64 NumPy round trips per product).

References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    Yao et al., "PyHessian: Neural networks through the lens of the Hessian", arXiv:1912.07145.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

# batch_size, check_batches and model_args are re-exported for their old import path (curvature.batches now).
from lightning_optsurvey.curvature.batches import batch_size, check_batches, model_args
from lightning_optsurvey.curvature.kernels import derivative_kernels, explain_missing_derivative
from lightning_optsurvey.curvature.objective import BatchLoss, ModuleLoss, as_batch_loss
from lightning_optsurvey.validation import (
    check_bool,
    check_choice,
    check_int,
    check_optional,
    check_real_parameters,
    check_type,
)

__all__ = ["HessianOperator", "batch_size", "check_batches", "model_args"]

BN_MODES = ("eval", "batch")


class HessianOperator:
    """Hessian-vector products of the mean loss over ``batches``.

    The loss of one batch is ``loss_fn(model(*inputs), targets)`` for ``(inputs, targets)`` pairs, or any
    :class:`~lightning_optsurvey.curvature.objective.BatchLoss`, e.g. ``ModuleLoss()`` for the model's own
    ``compute_loss(batch)`` on batches of any structure (dicts, nested tuples). Products run with
    attention on SDPA's math backend (:func:`~lightning_optsurvey.curvature.kernels.derivative_kernels`);
    an op that still lacks the derivative raises a
    :class:`~lightning_optsurvey.curvature.kernels.MissingDerivativeError` naming the op and its layer.

    What is differentiated with Dropout: the loss of the model with Dropout off (its eval-mode, expected
    network), so products are deterministic and the operator is symmetric; BatchNorm per ``bn_mode``.

    Args:
        model: The network. Read, never modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning the scalar mean loss of one batch, or a
            ``BatchLoss``.
        batches: A non-empty sequence of batches: ``(inputs, targets)`` pairs (inputs may be a tuple of
            arguments) for a ``loss_fn``, any structure for ``ModuleLoss``. The loss is the mean over all
            samples, each batch weighted by its size (:func:`~lightning_optsurvey.curvature.objective.batch_size`,
            or the model's ``compute_batch_size(batch)``).
        params: ``None`` for every parameter that requires grad, or a list of parameter names (as in
            ``model.named_parameters()``) selecting a diagonal block, e.g. one layer.
        bn_mode: ``"eval"``: BatchNorm uses its running statistics; ``"batch"``: it uses the statistics of
            each batch, without updating the running ones. Dropout is off in both.
        reduce: For data-parallel use: a function that *sums* a tensor over processes (an all-reduce).
            Each process passes its own shard of batches; products are then of the global mean loss and
            are identical on every process.
        linearize: Reuse the linearization at the current point: the double-backward graph of each batch
            is built on the first product and kept, so later products skip the forward and first
            backward pass (1.6 to 2.1 gradient-equivalents per product instead of 2.6 to 3.6 for a
            fresh forward-over-reverse product on CPU, see the module docstring). It is rebuilt
            automatically when a parameter or buffer changes in place; :meth:`clear_cache` frees it.
            ``False``: every product is a fresh forward-over-reverse product (no memory kept).
        chunk_size: Columns per vmapped pass in :meth:`matmat` without ``linearize`` (``None``: all at
            once); bounds memory.

    Attributes:
        numel: Dimension of the operator (number of selected scalar parameters).
        num_matvecs: Number of Hessian-vector products computed so far (a ``matmat`` of ``m`` columns
            counts ``m``).
        dtype, device: Those of the parameters; products are computed in this dtype.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, ``loss_fn`` is not callable, ``linearize`` not a
            bool or ``chunk_size`` not an integer.
        ValueError: For no batches, a batch that is not a pair, an unknown ``bn_mode``, a ``chunk_size``
            below 1, unknown parameter names, no parameter requiring grad, or parameters of mixed
            dtype/device; at the first product or gradient, for a loss that is not a scalar.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> op = HessianOperator(net, nn.functional.mse_loss, [(torch.randn(8, 3).double(),
        ...                                                     torch.randn(8, 1).double())])
        >>> op.numel, (op @ torch.ones(op.numel, dtype=torch.float64)).shape, op.num_matvecs
        (21, torch.Size([21]), 1)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor] | BatchLoss,
        batches: Sequence[Any],
        *,
        params: Sequence[str] | None = None,
        bn_mode: Literal["eval", "batch"] = "eval",
        reduce: Callable[[Tensor], Tensor] | None = None,
        linearize: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        check_type("model", model, nn.Module, "an nn.Module")
        objective = as_batch_loss(loss_fn)
        check_choice("bn_mode", bn_mode, BN_MODES)
        check_optional(check_int, "chunk_size", chunk_size)
        objective.check_model(model)
        batches = objective.check_batches(batches)
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
            if not names:
                raise ValueError("the model has no parameter that requires grad; nothing to differentiate")
        else:
            if isinstance(params, str):
                raise TypeError(f"params must be a list of parameter names, got the string {params!r}")
            names = list(params)
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ValueError(f"unknown parameter names {unknown}; the model has {sorted(named)}")
            if not names:
                raise ValueError("params is an empty list; pass None for all parameters or some names")
            if len(set(names)) != len(names):
                raise ValueError(f"params has repeated names: {names}")
        selected = [named[n] for n in names]
        check_real_parameters("HessianOperator", zip(names, selected))
        dtypes = {p.dtype for p in selected}
        devices = {p.device for p in selected}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"selected parameters mix dtypes {dtypes} or devices {devices}; select a block of one"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.objective = objective
        self.batches = batches
        self.bn_mode = bn_mode
        self.names = names
        self.shapes = [p.shape for p in selected]
        self.numels = [p.numel() for p in selected]
        self.numel = sum(self.numels)
        self.dtype = selected[0].dtype
        self.device = selected[0].device
        self.num_matvecs = 0
        self.chunk_size = chunk_size
        self.linearize = check_bool("linearize", linearize)
        self._reverse_over_reverse = False  # set by _hvp where jvp of the gradient is missing in torch
        self._graph: tuple[list[Tensor], list[tuple[list[Tensor], list[int]]]] | None = None
        self._graph_versions: list[int] = []
        # Walked once: model.modules() / parameters() dedupe modules through a set, and a LightningModule's
        # torchmetrics members hash their state, so a walk per product cost 0.3 ms (6 % of a product on a
        # batch of 64 digits). The model's structure is fixed while the operator lives; values are not.
        self._recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
        self._tracked = [*model.parameters(), *model.buffers()]
        self._reduce = reduce
        sizes = [objective.size(model, b) for b in batches]
        local = float(sum(sizes))
        self._weights = [s / local for s in sizes]
        self._local_count = local
        if reduce is not None:
            self._global_count = float(reduce(torch.tensor(local, dtype=torch.float64, device=self.device)))
        else:
            self._global_count = local
        # Whether the loss is a scalar is checked on the first evaluation (a product, a gradient), which
        # every use starts with: a forward pass here only for the check cost a third of a gradient.
        self._scalar_checked = False

    # -- model evaluation --------------------------------------------------------------------------------
    @contextmanager
    def _product_mode(self) -> Iterator[None]:
        """Dropout off; BatchNorm in eval mode, or on batch statistics without updates; restored after."""
        saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in self.model.modules()]
        try:
            for m in self.model.modules():
                m.training = False
                if self.bn_mode == "batch" and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.training = True
                    m.track_running_stats = False  # batch statistics, running ones neither used nor updated
            yield
        finally:
            for m, training, track in saved:
                m.training = training
                if track is not None:
                    m.track_running_stats = track

    def _primals(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def _constants(self) -> dict[str, Tensor]:
        selected = set(self.names)
        consts = {n: p.detach() for n, p in self.model.named_parameters() if n not in selected}
        consts.update({n: b.detach() for n, b in self.model.named_buffers()})
        return consts

    def _loss_fn_of(self, batch: Any, constants: dict[str, Tensor]) -> Callable[[dict], Tensor]:
        def loss(p: dict[str, Tensor]) -> Tensor:
            value = self.objective(self.model, {**constants, **p}, batch)
            if not self._scalar_checked:
                self._check_scalar(value)
            return value

        return loss

    @contextmanager
    def _explained(self) -> Iterator[None]:
        """Attention on SDPA's math backend; autograd's "derivative not implemented" made readable."""
        try:
            with derivative_kernels(self._kernels_model()):
                yield
        except (RuntimeError, NotImplementedError) as err:
            leaves = {n: t.detach().requires_grad_(True) for n, t in self._primals().items()}

            def forward() -> Any:
                with torch.enable_grad(), self._product_mode(), derivative_kernels(self._kernels_model()):
                    return self._loss_fn_of(self.batches[0], self._constants())(leaves)

            explained = explain_missing_derivative(err, self.model, forward)
            if explained is None:
                raise
            raise explained from err

    def _check_scalar(self, value: Any) -> None:
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            what = "compute_loss" if isinstance(self.objective, ModuleLoss) else "loss_fn"
            raise ValueError(f"{what} must return a scalar (a batch mean), got {shape}")
        self._scalar_checked = True

    # -- flat vectors <-> parameter dicts -----------------------------------------------------------------
    def _split(self, flat: Tensor) -> dict[str, Tensor]:
        """``flat`` of shape ``(..., numel)`` into ``{name: (..., *shape)}``."""
        lead = flat.shape[:-1]
        return {
            n: chunk.reshape(*lead, *shape)
            for n, chunk, shape in zip(self.names, flat.split(self.numels, dim=-1), self.shapes)
        }

    def _join(self, tree: dict[str, Tensor], lead: int) -> Tensor:
        return torch.cat([tree[n].reshape(*((lead,) if lead else ()), -1) for n in self.names], dim=-1)

    # -- products ------------------------------------------------------------------------------------------
    def _check_vector(self, v: Tensor, ndim: int) -> Tensor:
        if not isinstance(v, Tensor):
            raise TypeError(f"expected a tensor, got {type(v).__name__}")
        if v.ndim != ndim or v.shape[0] != self.numel:
            want = "(numel,)" if ndim == 1 else "(numel, m)"
            raise ValueError(f"expected shape {want} with numel={self.numel}, got {tuple(v.shape)}")
        return v.to(device=self.device, dtype=self.dtype)

    def _finish(self, total: Tensor) -> Tensor:
        if self._reduce is None:
            return total
        return self._reduce(total * self._local_count) / self._global_count

    # The retained-graph path ("linearize"): reverse-over-reverse on a graph kept between products.
    def _kernels_model(self) -> nn.Module | None:
        """The model for :func:`derivative_kernels` to scan for recurrent layers, ``None`` when it has none."""
        return self.model if self._recurrent else None

    def _versions(self) -> list[int]:
        return [t._version for t in self._tracked]

    def clear_cache(self) -> None:
        """Free the retained double-backward graphs (rebuilt on the next product)."""
        self._graph = None
        self._graph_versions = []

    def _retained_graph(self) -> tuple[list[Tensor], list[tuple[list[Tensor], list[int]]]]:
        versions = self._versions()
        if self._graph is not None and versions == self._graph_versions:
            return self._graph
        self._graph = None
        # Leaves share storage and version counter with the parameters: an in-place change of a
        # parameter is seen by _versions() and triggers a rebuild, never a stale product.
        leaves = {n: t.detach().requires_grad_(True) for n, t in self._primals().items()}
        leaf_list = list(leaves.values())
        constants = self._constants()
        per_batch = []
        with torch.enable_grad(), self._product_mode(), derivative_kernels(self._kernels_model()):
            for batch in self.batches:
                loss = self._loss_fn_of(batch, constants)(leaves)
                grads = torch.autograd.grad(loss, leaf_list, create_graph=True, allow_unused=True,
                                            materialize_grads=True)
                # Gradient blocks that do not depend on any parameter have zero Hessian rows.
                live = [i for i, g in enumerate(grads) if g.requires_grad]
                per_batch.append(([grads[i] for i in live], live))
        self._graph = (leaf_list, per_batch)
        self._graph_versions = versions
        return self._graph

    def _retained_product(self, tangent: dict[str, Tensor], out: Tensor | None = None) -> Tensor:
        leaves, per_batch = self._retained_graph()
        pieces = [tangent[n] for n in self.names]
        if out is None:
            total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        else:
            total = out.zero_()
        if len(per_batch) == 1 and self._weights[0] == 1.0:
            # One batch: autograd accumulates each block of H v straight into its slice of `total` (the
            # leaves' .grad are views of it), block by block as the backward pass frees them, so the
            # blocks never exist all at once beside `total` (a vector of numel less at the peak).
            grads, live = per_batch[0]
            if grads:
                for leaf, block, shape in zip(leaves, total.split(self.numels), self.shapes):
                    leaf.grad = block.view(shape)
                try:
                    with torch.enable_grad():
                        torch.autograd.backward(grads, [pieces[i] for i in live], retain_graph=True, inputs=leaves)
                finally:
                    for leaf in leaves:
                        leaf.grad = None
            return total
        with torch.enable_grad():
            for weight, (grads, live) in zip(self._weights, per_batch):
                if not grads:
                    continue
                hv = torch.autograd.grad(grads, leaves, [pieces[i] for i in live], retain_graph=True,
                                         allow_unused=True, materialize_grads=True)
                for out, h in zip(total.split(self.numels), hv):
                    out.add_(h.reshape(-1), alpha=weight)  # in place: no concatenated copy
        return total

    def _hvp(self, g: Callable, primals: Any, tangent: Any) -> Any:
        """``H t``: forward-over-reverse (``jvp`` of the gradient), else reverse-over-reverse.

        The second serves where torch lacks the forward derivative of a loss's backward: torch 2.13's
        ``F.mse_loss`` (so ``nn.MSELoss``) fails under ``jvp(grad(...))`` ("ZeroTensors are immutable"). The
        Hessian is symmetric, so the vector-Jacobian product of the gradient is the same ``H t``. The operator
        switches once, at the first such failure.
        """
        if not self._reverse_over_reverse:
            try:
                return jvp(g, (primals,), (tangent,))[1]
            except RuntimeError as err:
                if "ZeroTensors are immutable" not in str(err):
                    raise
                self._reverse_over_reverse = True
        return vjp(g, primals)[1](tangent)[0]

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of length ``numel`` (returned in the parameters' dtype)."""
        v = self._check_vector(v, 1)
        tangent = self._split(v)
        if self.linearize:
            with self._explained():
                total = self._retained_product(tangent)
        else:
            primals, constants = self._primals(), self._constants()
            total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            with torch.enable_grad(), self._product_mode(), self._explained():
                for weight, batch in zip(self._weights, self.batches):
                    g = grad(self._loss_fn_of(batch, constants))
                    hv = self._hvp(g, primals, tangent)
                    total.add_(self._join(hv, 0), alpha=weight)
        self.num_matvecs += 1
        return self._finish(total)

    def matmat(self, matrix: Tensor) -> Tensor:
        """``H V`` for ``V`` of shape ``(numel, m)``.

        With ``linearize`` the columns go one by one through the retained graph (cheaper on CPU than a
        batched backward, ``is_grads_batched``, by the module docstring's measurements); without it they
        share vmapped forward-over-reverse passes, ``chunk_size`` columns at a time.
        """
        matrix = self._check_vector(matrix, 2)
        m = matrix.shape[1]
        if m == 0:
            return matrix.clone()
        if self.linearize:
            # Rows of the transposed block are contiguous: one copy in, products written as rows.
            columns = matrix.T.contiguous()
            total = torch.empty(m, self.numel, dtype=self.dtype, device=self.device)
            with self._explained():
                for c, row in zip(columns, total):
                    self._retained_product(self._split(c), out=row)  # written in place: no stacked copy
            self.num_matvecs += m
            return self._finish(total).T
        tangents = self._split(matrix.T.contiguous())
        primals, constants = self._primals(), self._constants()
        total = torch.zeros(m, self.numel, dtype=self.dtype, device=self.device)
        with torch.enable_grad(), self._product_mode(), self._explained():
            for weight, batch in zip(self._weights, self.batches):
                g = grad(self._loss_fn_of(batch, constants))

                def hvp(t: dict[str, Tensor], g: Callable = g) -> dict[str, Tensor]:
                    return self._hvp(g, primals, t)

                hv = vmap(hvp, chunk_size=self.chunk_size)(tangents)
                total.add_(self._join(hv, m), alpha=weight)
        self.num_matvecs += m
        return self._finish(total).T

    def __matmul__(self, other: Tensor) -> Tensor:
        if isinstance(other, Tensor) and other.ndim == 2:
            return self.matmat(other)
        return self.matvec(other)

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The loss and its flat gradient at the current parameters (does not count as a matvec)."""
        primals, constants = self._primals(), self._constants()
        total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        loss_total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.enable_grad(), self._product_mode(), self._explained():
            for weight, batch in zip(self._weights, self.batches):
                g, loss = torch.func.grad_and_value(self._loss_fn_of(batch, constants))(primals)
                total.add_(self._join(g, 0), alpha=weight)
                loss_total.add_(loss.detach(), alpha=weight)
        return self._finish(loss_total), self._finish(total)

    def parameters_vector(self) -> Tensor:
        """The selected parameters, flattened in the operator's order (a copy)."""
        return torch.cat([p.reshape(-1) for p in self._primals().values()]).clone()

    def dense(self) -> Tensor:
        """The full ``numel x numel`` matrix, column block by column block (for small models and tests)."""
        eye = torch.eye(self.numel, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def __repr__(self) -> str:
        return (f"HessianOperator(numel={self.numel}, blocks={len(self.names)}, batches={len(self.batches)}, "
                f"bn_mode={self.bn_mode!r}, dtype={self.dtype}, num_matvecs={self.num_matvecs})")
