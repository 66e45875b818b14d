"""Batches as the curvature engine, the measures and the callbacks see them: sizes, leaves, pieces, checks.

Every Hessian product, sharpness, noise scale and norm takes a sequence of batches of the user's own
structure: ``(inputs, targets)`` pairs (inputs may be a tuple of positional arguments), dicts, nested
tuples. These few functions are what all of them need to know about a batch:

- :func:`model_args`: the model's positional arguments for a pair's inputs;
- :func:`first_tensor_leaf`: the first tensor with a leading dimension (depth first, dicts in key order);
- :func:`batch_size`: the number of samples, a batch's weight in a mean over batches;
- :func:`split_samples`: consecutive pieces of a batch (per-sample gradients, noise scales);
- :func:`check_batches`: a non-empty sequence of ``(inputs, targets)`` pairs, validated.

They live here, not in :mod:`~lightning_optsurvey.curvature.operator`, because the measures and the
callbacks use them without any Hessian. Pure torch; no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_size", "check_batches", "check_nonempty", "first_tensor_leaf", "model_args", "split_samples",
           "tensor_leaves"]


def model_args(inputs: Any) -> tuple[Any, ...]:
    """The model's positional arguments for a batch's inputs: a tuple or list is several, else one."""
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def tensor_leaves(batch: Any) -> Iterator[Tensor]:
    """The tensors of ``batch``, depth first (a dict in its key order, tuples and lists in order)."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for item in batch.values():
            yield from tensor_leaves(item)
    elif isinstance(batch, tuple | list):
        for item in batch:
            yield from tensor_leaves(item)


def first_tensor_leaf(batch: Any) -> Tensor | None:
    """The first tensor with at least one dimension in ``batch`` (depth first, a dict in its key order)."""
    return next((t for t in tensor_leaves(batch) if t.ndim > 0), None)


def batch_size(batch: Any) -> int:
    """Number of samples of a batch (its weight in a mean over batches).

    For a pair, the leading dimension of the targets (else of the first input); for any other batch,
    the leading dimension of its first tensor leaf with at least one dimension, in the batch's own order
    (a dict's insertion order).

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


def check_nonempty(batches: Sequence[Any]) -> list[Any]:
    """``batches`` as a list, validated (non-empty; a single batch not passed for a list of them).

    Raises:
        TypeError: If ``batches`` is one dict batch (or tensor), not a sequence of batches.
        ValueError: If it is empty, a batch has no samples, or a floating-point tensor of a batch holds NaN or
            infinity (every product and measurement on it would be NaN).
    """
    if isinstance(batches, Mapping | Tensor):
        raise TypeError(f"batches must be a sequence of batches, got a single {type(batches).__name__}; "
                        "wrap it in a list")
    if not isinstance(batches, Iterable) or isinstance(batches, str):
        raise TypeError(f"batches must be a sequence of batches, got {type(batches).__name__}")
    out = list(batches)
    if not out:
        raise ValueError("batches is empty; pass at least one batch")
    for i, b in enumerate(out):
        # Every batch, not only the first: a later empty batch would fail deep inside a product.
        leaf = first_tensor_leaf(b)
        if leaf is not None and leaf.ndim > 0 and leaf.shape[0] == 0:
            raise ValueError(f"batch {i} has no samples; every batch needs at least one")
        for tensor in tensor_leaves(b):
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"batch {i} holds NaN or infinite values (in a tensor of shape "
                                 f"{tuple(tensor.shape)}); every product and measurement on it would be NaN")
    return out


def check_batches(batches: Sequence[Any]) -> list[Any]:
    """Validate a non-empty sequence of ``(inputs, targets)`` pairs and return it as a list.

    Raises:
        TypeError: If ``batches`` is a single pair (or dict) rather than a sequence of batches.
        ValueError: If it is empty, an element is not a pair (the message says how to use any batch), a batch
            has no samples, or its inputs and targets disagree on the number of samples (sequence lengths may
            differ from batch to batch).
    """
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        raise TypeError("batches must be a sequence of (inputs, targets) pairs; wrap a single batch in a list")
    out = check_nonempty(batches)
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
