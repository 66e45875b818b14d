"""The loss of a model as a function of a flat parameter vector, without touching the model.

Every measure in this package evaluates ``L(w + d)`` at perturbed weights. Writing the perturbation into
the model's parameters and undoing it afterwards is fragile (an exception half-way leaves the model
perturbed; optimizer state and DDP hold references to the tensors). Instead the loss is evaluated with
:func:`torch.func.functional_call` on *new* tensors: the model's parameters, buffers and ``.grad`` are
never written. Buffers are passed as clones, so a BatchNorm layer in train mode updates the clones, not
the model's running statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_optsurvey.curvature.kernels import derivative_kernels, explain_missing_derivative
from lightning_optsurvey.curvature.objective import BatchLoss, PairLoss, as_batch_loss, model_args
from lightning_optsurvey.validation import check_real_parameters

Batch = Any  # an (inputs, targets) pair for a loss_fn; any structure for a ModuleLoss
LossFn = Callable[[Any, Any], Tensor] | BatchLoss


class FlatObjective:
    """``L(v)``: the model's mean loss over ``batches`` with its trainable parameters set to the flat ``v``.

    The loss over several batches is the mean over all samples (each batch weighted by its size), with
    ``loss_fn(outputs, targets)`` the mean over one batch, or any
    :class:`~lightning_optsurvey.curvature.objective.BatchLoss` (``ModuleLoss()``: the model's own
    ``compute_loss(batch)``, any batch structure). The model is run in its current train/eval mode, with
    attention on SDPA's math backend.

    Args:
        model: The network; only read.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch, or a ``BatchLoss``.
        batches: Sequence of ``(inputs, targets)`` (of any batch for a ``ModuleLoss``).
        params: Names of the parameters to perturb (default: all that require grad).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        params: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.objective = as_batch_loss(loss_fn)
        self.model = model
        self.loss_fn = loss_fn
        self.batches = self.objective.check_batches(batches)
        named = dict(model.named_parameters())
        if params is None:
            self.names = [n for n, p in named.items() if p.requires_grad]
        else:
            unknown = [n for n in params if n not in named]
            if unknown:
                raise ValueError(f"unknown parameter names {unknown}; the model has {sorted(named)}")
            self.names = list(params)
        if not self.names:
            raise ValueError("the model has no parameter to measure (none requires grad)")
        tensors = [named[n].detach() for n in self.names]
        check_real_parameters("The measure", zip(self.names, tensors))
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.w = torch.cat([t.reshape(-1) for t in tensors]).clone()
        self.numel = self.w.numel()
        self.sizes = [self.objective.size(model, b) for b in self.batches]
        self.total = sum(self.sizes)
        self._buffers = {n: b.detach() for n, b in model.named_buffers()}
        # A model in train mode draws dropout masks: every evaluation starts from this RNG state, in a fork,
        # so L(w + e) and L(w) see the same masks (a sharpness is not the difference of two mask draws) and
        # the caller's global RNG is left where it was.
        self._cuda = [self.w.device] if self.w.device.type == "cuda" else []
        self._rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._cuda]
        self.num_evaluations = 0  # forward passes over all batches
        self.num_gradients = 0  # forward+backward passes over all batches

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into ``{name: tensor}`` shaped like the parameters (views of ``flat``)."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (in parameter order) into one flat vector."""
        seq = [tensors[n] for n in self.names] if isinstance(tensors, dict) else list(tensors)
        return torch.cat([t.reshape(-1) for t in seq])

    def forward(self, flat: Tensor, inputs: Any) -> Any:
        """Outputs of the model with parameters ``flat`` (buffers passed as clones, so never updated).

        A tuple or list of inputs is passed as several positional arguments, as in ``HessianOperator``.
        """
        state = {n: b.clone() for n, b in self._buffers.items()}
        state.update(self.unflatten(flat))
        with self._same_randomness(), \
                self._kernels(lambda: functional_call(self.model, self._plain_state(), model_args(inputs))):
            return functional_call(self.model, state, model_args(inputs))

    @contextmanager
    def _same_randomness(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._cuda):
            torch.set_rng_state(self._rng[0])
            for device, state in zip(self._cuda, self._rng[1]):
                torch.cuda.set_rng_state(state, device)
            yield

    @property
    def pairs(self) -> bool:
        """Whether the loss is ``loss_fn(outputs, targets)`` on ``(inputs, targets)`` pairs."""
        return isinstance(self.objective, PairLoss)

    def batch_loss(self, flat: Tensor, batch: Any) -> Tensor:
        """Mean loss of one ``batch`` with parameters ``flat`` (buffers passed as clones, never updated)."""
        state = {n: b.clone() for n, b in self._buffers.items()}
        state.update(self.unflatten(flat))
        with self._same_randomness(), self._kernels(lambda: self.objective(self.model, self._plain_state(), batch)):
            return self.objective(self.model, state, batch)

    def _plain_state(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {n: b.clone() for n, b in self._buffers.items()}
        state.update({n: t.detach() for n, t in self.unflatten(self.w).items()})
        return state

    @contextmanager
    def _kernels(self, forward: Callable[[], Any]) -> Iterator[None]:
        """Kernels with derivatives; an op without the one needed (forward mode) named with its layer."""
        try:
            with derivative_kernels(self.model):
                yield
        except (RuntimeError, NotImplementedError) as err:
            with torch.no_grad(), derivative_kernels(self.model):
                explained = explain_missing_derivative(err, self.model, forward)
            if explained is None:
                raise
            raise explained from err

    def _batch_loss(self, flat: Tensor, index: int) -> Tensor:
        return self.batch_loss(flat, self.batches[index]) * (self.sizes[index] / self.total)

    def loss(self, flat: Tensor | None = None, batches: Sequence[int] | None = None) -> Tensor:
        """Mean loss at ``flat`` (default: the model's weights) over all batches or the given indices."""
        flat = self.w if flat is None else flat
        indices = range(len(self.batches)) if batches is None else batches
        scale = self.total / sum(self.sizes[i] for i in indices)
        with torch.no_grad():
            total = sum(self._batch_loss(flat, i) for i in indices)
        self.num_evaluations += 1
        return total * scale  # type: ignore[return-value]

    def loss_and_grad(
        self, flat: Tensor | None = None, batches: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean loss and its gradient with respect to the flat parameters (one backward per batch)."""
        flat = (self.w if flat is None else flat).detach()
        indices = range(len(self.batches)) if batches is None else batches
        scale = self.total / sum(self.sizes[i] for i in indices)
        loss = torch.zeros((), dtype=flat.dtype, device=flat.device)
        grad = torch.zeros_like(flat)
        with torch.enable_grad():
            for i in indices:
                leaf = flat.clone().requires_grad_(True)
                value = self._batch_loss(leaf, i) * scale
                (g,) = torch.autograd.grad(value, leaf)
                loss += value.detach()
                grad += g
        self.num_gradients += 1
        return loss, grad


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (for callers that hold a seed, not a generator)."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal samples with ``like``'s dtype and device, from ``generator`` (global RNG if None)."""
    if generator is not None and generator.device.type != like.device.type:
        # A CPU generator with CUDA parameters: draw on the CPU, then move (still reproducible).
        return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
