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

__all__ = ["BatchLoss", "ModuleLoss", "PairLoss", "as_batch_loss", "batch_size", "first_tensor_leaf"]


def model_args(inputs: Any) -> tuple[Any, ...]:
    """The model's positional arguments for a batch's inputs: a tuple or list is several, else one."""
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def first_tensor_leaf(batch: Any) -> Tensor | None:
    """The first tensor with at least one dimension in ``batch`` (depth first, a dict in its key order)."""
    if isinstance(batch, Tensor):
        return batch if batch.ndim > 0 else None
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, tuple | list):
        items = batch
    else:
        return None
    for item in items:
        found = first_tensor_leaf(item)
        if found is not None:
            return found
    return None


def batch_size(batch: Any) -> int:
    """Number of samples of a batch (its weight in a mean over batches); see the module docstring.

    Raises:
        ValueError: If the batch holds no tensor with a leading dimension.
    """
    if isinstance(batch, tuple | list) and len(batch) == 2:
        inputs, targets = batch
        for item in (targets, *model_args(inputs)):
            if isinstance(item, Tensor) and item.ndim > 0:
                return int(item.shape[0])
    leaf = first_tensor_leaf(batch)
    if leaf is not None:
        return int(leaf.shape[0])
    if isinstance(batch, tuple | list) and len(batch) == 2:
        try:
            return len(batch[1])
        except TypeError:
            pass
    raise ValueError(f"cannot tell the size of a batch of type {type(batch).__name__}: it holds no tensor with a "
                     "leading (batch) dimension; define compute_batch_size(self, batch) on the module")


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
        if isinstance(batches, Mapping | Tensor):
            raise TypeError(f"batches must be a sequence of batches, got a single {type(batches).__name__}; "
                            "wrap it in a list")
        out = list(batches)
        if not out:
            raise ValueError("batches is empty; pass at least one batch")
        for i, b in enumerate(out):
            # Every batch, not only the first: a later empty batch would fail deep inside a product.
            leaf = first_tensor_leaf(b)
            if leaf is not None and leaf.ndim > 0 and leaf.shape[0] == 0:
                raise ValueError(f"batch {i} has no samples; every batch needs at least one")
        return out

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
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
        self.loss_fn = loss_fn

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
        if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
            raise TypeError("batches must be a sequence of (inputs, targets) pairs; wrap a single batch in a list")
        out = BatchLoss().check_batches(batches)
        for i, b in enumerate(out):
            if not isinstance(b, tuple | list) or len(b) != 2:
                raise ValueError(f"batch {i} must be an (inputs, targets) pair, got {type(b).__name__}; for other "
                                 "batch structures define compute_loss(self, batch) on the module (ModuleLoss)")
            tensors = [t for t in (b[1], *model_args(b[0])) if isinstance(t, Tensor) and t.ndim > 0]
            sizes = {int(t.shape[0]) for t in tensors}
            if len(sizes) > 1:
                raise ValueError(f"batch {i}: its inputs and targets disagree on the number of samples "
                                 f"(leading dimensions {[tuple(t.shape) for t in tensors]})")
            if batch_size(b) == 0:
                raise ValueError(f"batch {i} has no samples; every batch needs at least one")
        return out

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

    def __call__(self, model: nn.Module, state: Mapping[str, Tensor], batch: Any) -> Tensor:
        if not callable(getattr(model, self.method, None)):
            raise TypeError(f"{type(model).__name__} has no method {self.method}(batch) to compute its loss")
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


def split_samples(batch: Any, size: int, chunk: int = 1) -> list[Any]:
    """Consecutive pieces of ``chunk`` samples (the last may be smaller), one sample each by default.

    Every tensor leaf with leading dimension ``size`` is sliced; leaves of another leading size (or not
    tensors) are kept whole in every piece.
    """

    def take(item: Any, i: int) -> Any:
        if isinstance(item, Tensor):
            return item[i : i + chunk] if item.ndim > 0 and item.shape[0] == size else item
        if isinstance(item, Mapping):
            return {k: take(v, i) for k, v in item.items()}
        if isinstance(item, tuple | list):
            parts = [take(v, i) for v in item]
            return type(item)(*parts) if hasattr(item, "_fields") else type(item)(parts)
        return item

    return [take(batch, i) for i in range(0, size, chunk)]
