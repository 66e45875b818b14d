"""Norm-based generalization measures (Jiang et al. 2020): parameter, spectral, Frobenius, path, Fisher-Rao.

The *weight layers* are the ``nn.Linear`` and ``nn.Conv1d/2d/3d`` modules, in registration order; other
parameters (biases, normalization scales) enter only the parameter norm, the distance from
initialization, the path norm and the Fisher-Rao norm, which are defined on all trainable parameters.

Why our own: a convolution's spectral norm is often reported as the norm of its reshaped kernel, which
is not the operator norm of the layer; here it is the norm of the linear map the layer computes (power
iteration on the convolution and its adjoint, at the layer's real input size), or, for circular
convolutions, the exact FFT formula of Sedghi et al. Nothing here changes the model: forward passes go
through :func:`torch.func.functional_call` with cloned buffers, and train/eval flags are restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from lightning_optsurvey.curvature.lanczos import lanczos
from lightning_optsurvey.curvature.objective import split_samples
from lightning_optsurvey.curvature.operator import model_args
from lightning_optsurvey.measures._functional import (
    Batch,
    FlatObjective,
    LossFn,
    randn,
)
from lightning_optsurvey.validation import check_choice, check_float, check_int

__all__ = [
    "distance_from_init",
    "fisher_rao_norm",
    "frobenius_norm_product",
    "operator_spectral_norm",
    "parameter_norm",
    "path_norm",
    "spectral_norm_product",
    "weight_layers",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_METHODS = ("power", "fft")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``nn.Linear`` and (non-transposed) convolution modules of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, *_CONV))]


def _weight_layers_or_raise(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = weight_layers(model)
    if not layers:
        raise ValueError("the model has no nn.Linear or convolution layer")
    return layers


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def parameter_norm(model: nn.Module) -> float:
    r"""Euclidean norm of all trainable parameters, :math:`\lVert w \rVert_2 = (\sum_i w_i^2)^{1/2}`.

    Jiang et al.'s "params.norm" is its square.

    References:
        Jiang, Neyshabur, Mobahi, Krishnan, Bengio. Fantastic Generalization Measures and Where to Find
        Them. ICLR 2020. https://arxiv.org/abs/1912.02178
    """
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameter")
    return float(torch.sqrt(sum(p.double().pow(2).sum() for p in params.values())))


def distance_from_init(model: nn.Module, initial: Mapping[str, Tensor]) -> float:
    r"""Euclidean distance of the trainable parameters from their initial values, :math:`|w - w_0|_2`.

    Args:
        model: The network.
        initial: ``{name: tensor}`` for every trainable parameter (e.g. a copy taken at fit start).

    Raises:
        ValueError: If a trainable parameter is missing from ``initial`` or has another shape.

    References:
        Nagarajan, Kolter. Generalization in Deep Networks: The Role of Distance from Initialization.
        2019. https://arxiv.org/abs/1901.01672 ; Jiang et al. ICLR 2020 ("dist.init").
    """
    params = _trainable(model)
    missing = [n for n in params if n not in initial]
    if missing:
        raise ValueError(f"initial values are missing for parameters {missing}")
    total = torch.zeros((), dtype=torch.float64)
    for name, p in params.items():
        w0 = initial[name].detach()
        if w0.shape != p.shape:
            raise ValueError(
                f"initial value of {name!r} has shape {tuple(w0.shape)}, expected {tuple(p.shape)}"
            )
        total += (p.double() - w0.to(p.device).double()).pow(2).sum().cpu()
    return float(total.sqrt())


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _first_sample(example_input: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The model's positional arguments for the first sample of a batch of inputs.

    A tuple or list of tensors is a model with several inputs (the curvature engine's convention).
    """
    args = model_args(example_input)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("example_input must be a tensor or a tuple/list of tensors, got "
                        f"{type(example_input).__name__}")
    return tuple(a[:1] for a in args)


def _layer_input_shapes(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of the inputs each weight layer receives."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, layer in weight_layers(model):
        def hook(module: nn.Module, args: tuple, _name: str = name) -> None:
            shapes.setdefault(_name, tuple(args[0].shape[1:]))

        hooks.append(layer.register_forward_pre_hook(hook))
    args = _first_sample(example_input)
    state = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with torch.no_grad(), _eval_mode(model):
            functional_call(model, state, args)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def operator_spectral_norm(
    layer: nn.Module,
    input_shape: Sequence[int] | None = None,
    method: str = "power",
    tol: float = 1e-6,
    max_iter: int = 500,
    generator: torch.Generator | None = None,
) -> float:
    r"""Largest singular value of the linear map a weight layer computes (without its bias).

    - ``nn.Linear``: :math:`\lVert W \rVert_2`, exactly (``torch.linalg.matrix_norm``).
    - Convolutions, ``method="power"``: Krylov (Lanczos) iteration on :math:`A^\top A`, where ``A`` is
      the convolution at ``input_shape`` (its real padding, stride, dilation and groups) and
      :math:`A^\top` its adjoint by a vector-Jacobian product; stops when the top Ritz pair's residual
      is at most ``tol`` times :math:`\sigma^2`.
    - ``nn.Conv2d``, ``method="fft"`` (stride 1, one group): the singular values of a circular
      convolution are those of the ``c_out x c_in`` matrices :math:`\hat K(u, v)` of the kernel's 2-D
      DFT at the input size (Sedghi et al. 2019); exact for ``padding_mode="circular"``, an
      approximation for zero padding.

    Args:
        layer: An ``nn.Linear`` or ``nn.Conv1d/2d/3d``.
        input_shape: The layer's input shape without the batch dimension (convolutions only).
        method: ``"power"`` or ``"fft"``.
        tol: Relative residual at which the iteration stops, > 0.
        max_iter: Products with :math:`A^\top A` at most, >= 1.
        generator: Start vector's randomness (global RNG if ``None``).

    Returns:
        The spectral norm.

    Raises:
        ValueError: For an unsupported layer or method, or a convolution without ``input_shape``.

    References:
        Sedghi, Gupta, Long. The Singular Values of Convolutional Layers. ICLR 2019.
        https://arxiv.org/abs/1805.10408
    """
    check_choice("method", method, _METHODS)
    tol = check_float("tol", tol, low=0.0, low_open=True)
    check_int("max_iter", max_iter)
    weight = layer.weight.detach() if isinstance(layer, (nn.Linear, *_CONV)) else None
    if weight is None:
        raise ValueError(f"layer must be nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}")
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(weight.double(), ord=2))
    if input_shape is None:
        raise ValueError("a convolution's spectral norm depends on its input size: pass input_shape")
    input_shape = tuple(int(s) for s in input_shape)
    if method == "fft":
        plain = isinstance(layer, nn.Conv2d) and layer.groups == 1
        if not plain or layer.stride != (1, 1) or layer.dilation != (1, 1):
            raise ValueError("method='fft' supports nn.Conv2d with stride 1, dilation 1 and one group")
        n1, n2 = input_shape[-2:]
        if weight.shape[-2] > n1 or weight.shape[-1] > n2:
            raise ValueError(f"kernel {tuple(weight.shape[-2:])} larger than the input {(n1, n2)}")
        transform = torch.fft.fft2(weight.double(), s=(n1, n2))  # (c_out, c_in, n1, n2)
        return float(torch.linalg.matrix_norm(transform.permute(2, 3, 0, 1), ord=2).max())

    def conv(x: Tensor) -> Tensor:
        return layer._conv_forward(x, weight, None)  # type: ignore[operator,union-attr]

    def gram(v: Tensor) -> Tensor:  # A^T A v, the adjoint by a vector-Jacobian product
        with torch.enable_grad():
            out, pullback = vjp(conv, v.view(1, *input_shape))
            return pullback(out)[0].reshape(-1).detach()

    v0 = randn(int(torch.Size(input_shape).numel()), weight, generator)
    # Lanczos, not plain power iteration: the top singular values of a convolution are usually close.
    top = lanczos(_Gram(gram, v0), k=1, which="LA", tol=tol, max_iter=max_iter, v0=v0).eigenvalues[0]
    return float(top.clamp_min(0).sqrt())


class _Gram:
    r"""A convolution's :math:`A^\top A` as a curvature ``LinearOperator`` (a vector or a block of columns)."""

    def __init__(self, matvec: Callable[[Tensor], Tensor], like: Tensor) -> None:
        self._matvec = matvec
        self.numel = like.numel()
        self.dtype = like.dtype
        self.device = like.device
        self.num_matvecs = 0

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() == 2:
            return torch.stack([self @ column for column in v.unbind(1)], dim=1)
        self.num_matvecs += 1
        return self._matvec(v.to(self.dtype)).to(v.dtype)


def spectral_norm_product(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor] | None = None,
    method: str = "power",
    tol: float = 1e-6,
    max_iter: int = 500,
    generator: torch.Generator | None = None,
) -> float:
    r"""Product of the spectral norms of the weight layers, :math:`\prod_i \lVert A_i \rVert_2`.

    Each convolution's norm is that of the linear map it computes at the input size it sees in a forward
    pass of ``example_input`` (see :func:`operator_spectral_norm`). Jiang et al.'s "prod.spec" is the
    square of this product (over layers, before their normalization by depth).

    Args:
        model: The network (not modified; its modes are restored after the shape-finding forward pass).
        example_input: A batch of inputs, or a tuple/list of them for a model with several inputs (only the
            first sample is used); needed if the model has
            convolutions.
        method: ``"power"`` (any convolution) or ``"fft"`` (circular formula for ``nn.Conv2d``).
        tol: Relative residual of the Krylov iteration.
        max_iter: Krylov iterations at most (per convolution).
        generator: Start vectors' randomness.

    Returns:
        The product over weight layers.

    Raises:
        ValueError: If the model has no weight layer, or convolutions but no ``example_input``.

    References:
        Bartlett, Foster, Telgarsky. Spectrally-normalized margin bounds for neural networks. NeurIPS 2017.
        https://arxiv.org/abs/1706.08498 ; Jiang et al. ICLR 2020. https://arxiv.org/abs/1912.02178
    """
    layers = _weight_layers_or_raise(model)
    shapes: dict[str, tuple[int, ...]] = {}
    if any(isinstance(m, _CONV) for _, m in layers):
        if example_input is None:
            raise ValueError("the model has convolutions: pass example_input to find their input sizes")
        shapes = _layer_input_shapes(model, example_input)
    product = 1.0
    for name, layer in layers:
        product *= operator_spectral_norm(layer, shapes.get(name), method, tol, max_iter, generator)
    return product


def frobenius_norm_product(model: nn.Module) -> float:
    r"""Product of the Frobenius norms of the weight layers' kernels, :math:`\prod_i \lVert W_i \rVert_F`.

    Jiang et al.'s "prod.fro" is the square of this product.

    Raises:
        ValueError: If the model has no weight layer.

    References:
        Neyshabur, Tomioka, Srebro. Norm-Based Capacity Control in Neural Networks. COLT 2015.
        https://arxiv.org/abs/1503.00036 ; Jiang et al. ICLR 2020. https://arxiv.org/abs/1912.02178
    """
    layers = _weight_layers_or_raise(model)
    product = 1.0
    for _, layer in layers:
        product *= float(layer.weight.detach().double().norm())
    return product


def path_norm(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> float:
    r"""The l2 path norm: the square root of the network's output at the all-ones input with squared weights.

    .. math::
        \phi(w) = \Big( \sum_{k} f_{w^2}(\mathbf{1})_k \Big)^{1/2},

    which for a bias-free ReLU network equals :math:`(\sum_{\text{paths}} \prod_{e} w_e^2)^{1/2}`. Every
    parameter is squared, frozen ones too, as the layer products count them (biases act as paths from a
    constant unit), the model runs in eval
    mode (restored afterwards) and its buffers are not changed. Jiang et al.'s "path.norm" is the square.

    Args:
        model: The network (ReLU-type activations for the path interpretation).
        example_input: A batch of inputs, or a tuple/list of them for a model with several inputs (all
            set to ones); only the shapes are used.

    Returns:
        The path norm.

    References:
        Neyshabur, Tomioka, Srebro. Norm-Based Capacity Control in Neural Networks. COLT 2015.
        https://arxiv.org/abs/1503.00036 ; Jiang et al. ICLR 2020. https://arxiv.org/abs/1912.02178
    """
    ones = tuple(torch.ones_like(a) for a in _first_sample(example_input))
    state: dict[str, Tensor] = {n: b.clone() for n, b in model.named_buffers()}
    # Every parameter, frozen ones too: a frozen weight left unsquared would enter the paths linearly.
    state.update({n: p.detach().pow(2) for n, p in model.named_parameters()})
    with torch.no_grad(), _eval_mode(model):
        out = functional_call(model, state, ones)
    return float(out.double().sum().clamp_min(0).sqrt())


def _sample_slopes(objective: FlatObjective, batch: Any, size: int) -> Tensor:
    """``<w, grad_w loss_i>`` for each one-sample batch ``i`` of ``batch`` (forward mode along ``w``).

    Vectorized over samples with ``vmap`` (each call sees its sample as a batch of one); models that
    ``vmap`` cannot batch (an LSTM, for one) take one forward-mode pass per sample.
    """
    w = objective.w

    def slope(sample: Any) -> Tensor:
        with torch.enable_grad():
            return jvp(lambda flat: objective.batch_loss(flat, sample), (w,), (w,))[1]

    def dims(item: Any) -> Any:
        if isinstance(item, Tensor):
            return 0 if item.ndim > 0 and item.shape[0] == size else None
        if isinstance(item, Mapping):
            return {k: dims(v) for k, v in item.items()}
        if isinstance(item, tuple | list):
            return type(item)(*[dims(v) for v in item]) if hasattr(item, "_fields") else type(item)(
                dims(v) for v in item)
        return None

    def keep_batch_dim(item: Any, dim: Any) -> Any:
        if isinstance(item, Tensor):
            return item.unsqueeze(1) if dim == 0 else item
        if isinstance(item, Mapping):
            return {k: keep_batch_dim(v, dim[k]) for k, v in item.items()}
        if isinstance(item, tuple | list):
            parts = [keep_batch_dim(v, d) for v, d in zip(item, dim)]
            return type(item)(*parts) if hasattr(item, "_fields") else type(item)(parts)
        return item

    in_dims = dims(batch)
    try:
        return vmap(slope, in_dims=(in_dims,))(keep_batch_dim(batch, in_dims))
    except Exception:  # vmap lacks a batching rule for some layer: one pass per sample instead
        return torch.stack([slope(sample) for sample in split_samples(batch, size)])


def fisher_rao_norm(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]) -> float:
    r"""The empirical Fisher-Rao norm (Liang et al.): the RMS over samples of <w, grad_w loss_i>.

    .. math::
        \lVert w \rVert_{fr} = \Big( \frac{1}{n} \sum_{i=1}^n
            \langle w, \nabla_w \ell(f_w(x_i), y_i) \rangle^2 \Big)^{1/2}.

    For a bias-free ReLU network with ``L+1`` layers, :math:`\langle w, \nabla_w \ell_i \rangle =
    (L+1) \langle \partial \ell_i / \partial f, f_w(x_i) \rangle` (Liang et al., Lemma 2.1). All products
    come from one forward-mode pass (a JVP along ``w``) and the loss's gradient in the outputs, so
    ``loss_fn`` must be the mean of per-sample losses, and the model must treat samples independently
    (call ``model.eval()`` first if it has BatchNorm). With a ``ModuleLoss`` (the model's own
    ``compute_loss(batch)``, any batch structure) each batch is split into one-sample batches (every tensor
    leaf with the batch's leading size is sliced) and each sample's term is one forward-mode derivative.

    Args:
        model: The network (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean of per-sample losses.
        batches: Sequence of ``(inputs, targets)``.

    Returns:
        The Fisher-Rao norm.

    References:
        Liang, Poggio, Rakhlin, Stokes. Fisher-Rao Metric, Geometry, and Complexity of Neural Networks.
        AISTATS 2019. https://arxiv.org/abs/1711.01530 ; Jiang et al. ICLR 2020.
        https://arxiv.org/abs/1912.02178
    """
    objective = FlatObjective(model, loss_fn, batches)
    w = objective.w
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    if not objective.pairs:
        # The loss is the model's own compute_loss(batch): one directional derivative per sample.
        for batch, size in zip(objective.batches, objective.sizes):
            total += _sample_slopes(objective, batch, size).double().pow(2).sum()
        return float((total / objective.total).sqrt())
    for (inputs, targets), size in zip(objective.batches, objective.sizes):
        with torch.enable_grad():
            out, tangent = jvp(lambda flat, x=inputs: objective.forward(flat, x), (w,), (w,))
            out = out.detach().requires_grad_(True)
            (dloss,) = torch.autograd.grad(loss_fn(out, targets) * size, out)
        per_sample = (dloss * tangent).reshape(size, -1).sum(dim=1)
        total += per_sample.double().pow(2).sum()
    return float((total / objective.total).sqrt())
