r"""What the curvature engine and the measures differentiate: the mean loss of one batch, at given weights.

Every Hessian product, sharpness, noise scale, landscape slice and norm needs the same thing: the
mean loss of one batch as a function of the parameters, evaluated *functionally* (new tensors plugged
in with :func:`torch.func.functional_call`, the model itself never written), and the batch's weight in
a mean over several batches. A :class:`BatchLoss` is that one piece; the rest of the package takes any
of them where it takes a ``loss_fn``:

- :class:`PairLoss` (what a plain callable ``loss_fn`` becomes): batches are ``(inputs, targets)``
  pairs, the loss is ``loss_fn(model(*inputs), targets)`` (a tuple or list of inputs is several
  positional arguments).
- :class:`ModuleLoss`: any batch structure (dicts, nested tuples, several inputs, token sequences):
  the loss is ``model.compute_loss(batch)``, a method of the model returning the mean loss of one batch
  (no logging). The measuring callbacks use it whenever the LightningModule defines ``compute_loss``.

Batch weights. The loss over several batches is the mean over all *samples*: batch ``b`` gets the
weight :math:`n_b / \sum n`. :func:`batch_size` finds :math:`n_b`: for a pair, the leading dimension of
the targets (else of the first input); for any other batch, the leading dimension of its first tensor
leaf with at least one dimension, in the batch's own order (a dict's insertion order). A model whose
``compute_loss`` averages over something else (tokens of unequal length, for instance) defines
``compute_batch_size(self, batch) -> int``, the count its mean is over, and that is used instead.

Why our own: PyHessian, hessian-eigenthings and curvlinops all hard-code ``loss_fn(model(x), y)`` on
pairs; a Lightning user's loss often lives in the module and reads a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

# The batch utilities moved to their own module; imported here for the old import paths.
from lightning_optsurvey.curvature.batches import (
    batch_size,
    check_batches,
    check_nonempty,
    first_tensor_leaf,
    model_args,
    split_samples,
)
from lightning_optsurvey.validation import check_callable

__all__ = ["BatchLoss", "ModuleLoss", "PairLoss", "as_batch_loss", "batch_size", "first_tensor_leaf", "model_args",
           "split_samples"]


class BatchLoss:
    """The mean loss of one batch as a function of the model's parameters (base class).

    Subclasses implement :meth:`__call__`; :meth:`check_batches` and :meth:`size` have general defaults.
    """

    def __call__(self, model: nn.Module, state: Mapping[str, Tensor], batch: Any) -> Tensor:
        """The mean loss of ``batch`` with the model's parameters/buffers named in ``state`` replaced."""
        raise NotImplementedError

    def check_batches(self, batches: Sequence[Any]) -> list[Any]:
        """``batches`` as a list, validated (non-empty; a single batch not passed for a list of them).

        Raises:
            TypeError: If ``batches`` is one dict batch, not a sequence of batches.
            ValueError: If it is empty.
        """
        return check_nonempty(batches)

    def check_model(self, model: nn.Module) -> None:
        """Raise early if ``model`` cannot be evaluated by this loss (nothing to check by default)."""

    def size(self, model: nn.Module, batch: Any) -> int:
        """The batch's weight: ``model.compute_batch_size(batch)`` if defined, else :func:`batch_size`."""
        hook = getattr(model, "compute_batch_size", None)
        if callable(hook):
            value = hook(batch)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"compute_batch_size must return a positive integer, got {value!r}")
            return value
        return batch_size(batch)


class PairLoss(BatchLoss):
    """``loss_fn(model(*inputs), targets)`` on ``(inputs, targets)`` batches.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the scalar mean loss of one batch.

    Raises:
        TypeError: If ``loss_fn`` is not callable.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor]) -> None:
        self.loss_fn = check_callable("loss_fn", loss_fn, "loss_fn(outputs, targets)")

    def __call__(self, model: nn.Module, state: Mapping[str, Tensor], batch: Any) -> Tensor:
        inputs, targets = batch
        return self.loss_fn(functional_call(model, dict(state), model_args(inputs)), targets)

    def check_batches(self, batches: Sequence[Any]) -> list[Any]:
        return self.check_pairs(batches)

    @staticmethod
    def check_pairs(batches: Sequence[Any]) -> list[Any]:
        """Validate a non-empty sequence of ``(inputs, targets)`` pairs.

        Raises:
            TypeError: If ``batches`` is a single pair (or dict) rather than a sequence of batches.
            ValueError: If it is empty, an element is not a pair (the message says how to use any batch), a batch
                has no samples, or its inputs and targets disagree on the number of samples.
        """
        return check_batches(batches)

    def size(self, model: nn.Module, batch: Any) -> int:
        return batch_size(batch)

    def __repr__(self) -> str:
        return f"PairLoss({getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


class _Bound(nn.Module):
    """Calls ``module.<method>(batch)`` as its forward, so ``functional_call`` can swap the weights."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, batch: Any) -> Tensor:
        return getattr(self.module, self.method)(batch)


class ModuleLoss(BatchLoss):
    """``model.compute_loss(batch)`` (the module's own mean loss of one batch), for any batch structure.

    The method runs with the weights swapped in by :func:`torch.func.functional_call` (tied weights stay
    tied), so it may call ``self(...)``, submodules, and its own loss; it must not log or change state.

    Args:
        method: Name of the method (``"compute_loss"``).

    Raises:
        TypeError: At evaluation, if the model has no such method.
    """

    def __init__(self, method: str = "compute_loss") -> None:
        if not isinstance(method, str) or not method.isidentifier():
            raise TypeError(f"method must be a method name, got {method!r}")
        self.method = method

    def check_model(self, model: nn.Module) -> None:
        """Raise a ``TypeError`` if the model has no such method."""
        if not callable(getattr(model, self.method, None)):
            raise TypeError(f"{type(model).__name__} has no method {self.method}(batch) to compute its loss")

    def __call__(self, model: nn.Module, state: Mapping[str, Tensor], batch: Any) -> Tensor:
        self.check_model(model)
        bound = _Bound(model, self.method)
        return functional_call(bound, {f"module.{k}": v for k, v in state.items()}, (batch,))

    def __repr__(self) -> str:
        return f"ModuleLoss({self.method!r})"


def as_batch_loss(loss: Callable[[Any, Any], Tensor] | BatchLoss) -> BatchLoss:
    """A :class:`BatchLoss` as is; a callable ``loss_fn(outputs, targets)`` as a :class:`PairLoss`.

    Raises:
        TypeError: For anything else.
    """
    if isinstance(loss, BatchLoss):
        return loss
    if callable(loss):
        return PairLoss(loss)
    raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets) or a BatchLoss, got {loss!r}")
