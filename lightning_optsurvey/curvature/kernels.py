"""Kernels that have the derivatives measurements need, and a readable error for ops that lack one.

Hessian-vector products differentiate a gradient once more (double backward, or forward-over-reverse).
Fused attention kernels have no such derivative: ``scaled_dot_product_attention`` (used by
``nn.MultiheadAttention`` with ``need_weights=False``, ``nn.TransformerEncoderLayer``, Hugging Face
models) dispatches to flash / memory-efficient kernels on CPU and CUDA whose backward is not itself
differentiable, and autograd fails deep inside with ``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``. SDPA's math backend
computes the same attention from matmuls and a softmax, so every derivative exists and products are exact.

- :func:`derivative_kernels`: the context every measurement runs in (the curvature engine's products
  and the measuring callbacks' context): SDPA restricted to its math backend, on CPU and CUDA, and the
  fused ``nn.MultiheadAttention`` fast path off.
- :func:`explain_missing_derivative`: turns autograd's message for an op without the needed derivative
  into one naming the op and the layer (module path) that ran it, found by re-running the forward pass
  under a dispatch mode with module hooks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MissingDerivativeError", "derivative_kernels", "explain_missing_derivative", "missing_derivative_op"]

_PATTERNS = (
    # reverse mode: the backward op of a fused kernel has no derivative of its own
    (re.compile(r"derivative for (?:aten::)?([\w.]+?) is not implemented"), "double-backward"),
    # forward mode (forward-over-reverse products)
    (re.compile(r"forward AD with (?:aten::)?([\w.]+) that does not support it"), "forward-mode"),
)


class MissingDerivativeError(RuntimeError):
    """An op in the model has no derivative of the order a measurement needs.

    Attributes:
        op: The aten op autograd named (e.g. ``_scaled_dot_product_flash_attention_for_cpu_backward``).
        layers: Module paths (``"blocks.0.attn"``) whose forward pass ran the op's forward.
    """

    def __init__(self, message: str, op: str, layers: list[str]) -> None:
        super().__init__(message)
        self.op = op
        self.layers = layers


@contextmanager
def derivative_kernels(model: nn.Module | None = None) -> Iterator[None]:
    """Run attention through SDPA's math backend (exact first and second derivatives, CPU and CUDA).

    Also turns off the "fast path" of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
    (``torch.backends.mha``): when no input requires grad, as in a forward-mode product on detached
    weights, they would call the fused ``_native_multi_head_attention``, which has no derivatives at all.
    When ``model`` has recurrent layers (``nn.RNNBase``: LSTM, GRU, RNN), the oneDNN (CPU) and cuDNN
    (CUDA) backends are turned off as well: their fused RNN kernels have no forward-mode derivative
    (oneDNN) or no double backward (cuDNN), the native implementation has both. Convolutions of models
    without recurrent layers keep their fast backends. Every setting is restored on exit.

    A model that picks a fused backend itself, inside its forward, overrides this; a product through it
    then fails with a :class:`MissingDerivativeError` that names the layer.
    """
    recurrent = model is not None and any(isinstance(m, nn.RNNBase) for m in model.modules())
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The flags themselves, not torch.backends.<x>.flags(): those also reset TF32 and determinism settings
    # (and warn about oneDNN TF32 on every call).
    onednn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mha.set_fastpath_enabled(False)
    if recurrent:
        torch.backends.mkldnn.enabled = False
        torch.backends.cudnn.enabled = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.mkldnn.enabled = onednn
        torch.backends.cudnn.enabled = cudnn


def missing_derivative_op(error: BaseException) -> tuple[str, str] | None:
    """``(op, kind)`` if ``error`` is autograd's "no derivative" error, else ``None``."""
    text = str(error)
    for pattern, kind in _PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1), kind
    return None


class _Recorder(TorchDispatchMode):
    def __init__(self, target: str, stack: list[str], hits: list[str]) -> None:
        super().__init__()
        self.target, self.stack, self.hits = target, stack, hits

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name.split("::")[-1]
        if name == self.target and self.stack and self.stack[-1] not in self.hits:
            self.hits.append(self.stack[-1])
        return func(*args, **(kwargs or {}))


def _locate(model: nn.Module, op: str, forward: Callable[[], Any]) -> list[str]:
    """Module paths whose own forward pass dispatched the forward op of ``op``."""
    base = op.split(".")[0]
    if base.endswith("_backward"):
        base = base[: -len("_backward")]
    stack: list[str] = []
    hits: list[str] = []
    handles = []

    def enter(label: str) -> None:
        stack.append(label)

    def leave() -> None:  # a forward hook must return None: a value would replace the module's output
        if stack:
            stack.pop()

    for name, module in model.named_modules():
        label = name or f"<root {type(module).__name__}>"
        handles.append(module.register_forward_pre_hook(lambda *_, label=label: enter(label)))
        handles.append(module.register_forward_hook(lambda *_: leave()))
    try:
        with _Recorder(base, stack, hits):
            forward()
    except Exception:  # a diagnosis must never hide the original error
        pass
    finally:
        for handle in handles:
            handle.remove()
    return hits


def explain_missing_derivative(error: BaseException, model: nn.Module,
                               forward: Callable[[], Any]) -> MissingDerivativeError | None:
    """A :class:`MissingDerivativeError` naming the op and the layer, or ``None`` for other errors.

    Args:
        error: What autograd raised.
        model: The model whose layers are searched (paths are relative to it).
        forward: Re-runs the forward pass that built the failing graph (with grad enabled, as it was).
    """
    found = missing_derivative_op(error)
    if found is None:
        return None
    op, kind = found
    layers = _locate(model, op, forward)
    types = {name: type(model.get_submodule(name)).__name__ for name in layers if not name.startswith("<root")}
    where = (", ".join(f"{n} ({types[n]})" if n in types else n for n in layers) if layers
             else "a layer that could not be identified")
    message = (f"{op} has no {kind} derivative, which Hessian-vector products need; it runs in {where}. "
               "Measurements select kernels with these derivatives (SDPA's math backend), but this layer chose "
               "its kernel itself: let it use the default (or the math backend) during measurement, or leave "
               "its parameters out of the measured block (params=[...]).")
    return MissingDerivativeError(message, op, layers)
