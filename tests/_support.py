"""Helpers shared by the test folders: free ports, dense float64 Hessians, plain user modules, closures,
quiet trainers and digits fits, argument-rejection checks.

Independent references live here once: :func:`dense_hessian` is reverse-over-reverse autograd, one double
backward per column (not ``jacrev(jacrev(f))``: its vmapped double backward is wrong on LayerNorm weights in
torch 2.13; rows of ``ln.weight`` off by up to 0.4 on the zoo's GPT, where finite differences of the gradient
agree with the unbatched double backward to 1e-11).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dense_hessian(loss: Callable[[Tensor], Tensor], flat: Tensor, directions: Tensor | None = None) -> Tensor:
    """``H = d^2 loss / d flat^2`` at ``flat`` (or ``H @ directions``), one double backward per column."""
    point = flat.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(point), point, create_graph=True)
    columns = torch.eye(flat.numel(), dtype=flat.dtype) if directions is None else directions
    out = []
    for j in range(columns.shape[1]):
        (hv,) = torch.autograd.grad(grad, point, grad_outputs=columns[:, j], retain_graph=True, allow_unused=True)
        out.append(torch.zeros_like(flat) if hv is None else hv.detach())
    return torch.stack(out, dim=1)


def flat_parameter_loss(
    module: nn.Module,
    batches: Sequence[Any],
    batch_loss: Callable[[Callable[..., Any], Any], Tensor],
    batch_size: Callable[[Any], int],
    names: Iterable[str] | None = None,
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``(loss, flat0)``: the sample-weighted mean of ``batch_loss(call, batch)`` over ``batches`` as a function
    of the flat vector of the named parameters (default: all), and that vector's current value.

    ``call(*inputs)`` runs ``module`` with the flat vector's parameters (``torch.func.functional_call``); the
    other parameters and buffers are the module's own.
    """
    unflatten, flat0 = flat_parameters(module, names)
    weights = [batch_size(b) for b in batches]
    total = sum(weights)

    def loss(flat: Tensor) -> Tensor:
        params = unflatten(flat)

        def call(*args: Any) -> Any:
            return functional_call(module, params, args)

        return sum(batch_loss(call, b) * (n / total) for b, n in zip(batches, weights, strict=True))

    return loss, flat0


def flat_parameters(
    module: nn.Module, names: Iterable[str] | None = None
) -> tuple[Callable[[Tensor], dict[str, Tensor]], Tensor]:
    """``(unflatten, flat0)``: the named parameters (default: all) as one flat vector ``flat0``, and the map
    from such a vector back to ``{name: view shaped like the parameter}``."""
    named = dict(module.named_parameters())
    keys = list(names) if names is not None else list(named)
    shapes = [named[k].shape for k in keys]
    sizes = [named[k].numel() for k in keys]

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        return {k: c.view(s) for k, c, s in zip(keys, flat.split(sizes), shapes, strict=True)}

    return unflatten, torch.cat([named[k].detach().reshape(-1) for k in keys])


def cross_entropy_pairs(call: Callable[..., Any], batch: Any) -> Tensor:
    """``batch_loss`` for ``(x, y)`` pairs and ``((x1, x2, ...), y)`` multi-input pairs: cross-entropy."""
    x, y = batch
    return F.cross_entropy(call(*x) if isinstance(x, (tuple, list)) else call(x), y)


def pair_size(batch: Any) -> int:
    """``batch_size`` for ``(inputs, y)`` pairs: the number of labels."""
    return len(batch[1])


class PlainModule(LightningModule):
    """A plain user LightningModule on ``(x, y)`` batches: ``self.net`` (set by the subclass) as its forward,
    ``criterion(self(x), y)`` (cross-entropy unless the subclass says otherwise) as its training step."""

    net: nn.Module
    criterion = staticmethod(F.cross_entropy)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.criterion(self(x), y)


class UserClassifier(PlainModule):
    """:class:`PlainModule` that also logs its epoch-mean training loss as ``train/loss``, as users do."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss


def make_closure(
    opt: torch.optim.Optimizer, loss_fn: Callable[[], Tensor], create_graph: bool = False
) -> Callable[[], Tensor]:
    """The closure ``opt.step(closure)`` expects: zero the gradients, evaluate ``loss_fn()``, back-propagate it
    (keeping the graph for optimizers that differentiate the gradient), return the loss."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def assert_rejected(make: Callable[..., Any], name: str, values: Iterable[Any], error: type = ValueError) -> None:
    """``make(name=value)`` raises ``error`` with ``name`` in its message, for every value."""
    for value in values:
        with pytest.raises(error, match=name):
            make(**{name: value})


QUIET_TRAINER = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                 "enable_model_summary": False}


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary; ``kwargs`` add or override."""
    return Trainer(**{**QUIET_TRAINER, **kwargs})


def fit_digits(
    module: LightningModule, batch_size: int, seed: int = 0, ckpt_path: str | None = None, **trainer_kwargs: Any
) -> Trainer:
    """Fit ``module`` on ``DigitsDataModule(batch_size, seed)`` with :func:`quiet_trainer` (``trainer_kwargs``
    add or override); return the trainer."""
    from lightning_optsurvey.tasks import DigitsDataModule

    trainer = quiet_trainer(**trainer_kwargs)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=batch_size, seed=seed), ckpt_path=ckpt_path)
    return trainer
