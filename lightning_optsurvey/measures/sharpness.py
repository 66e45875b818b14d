"""Sharpness of a minimum: SAM one-step, worst-case (Auto-PGD), average-case, Keskar, PAC-Bayes sigma.

All functions take ``(model, loss_fn, batches)`` and evaluate perturbed losses through
:func:`torch.func.functional_call` on new tensors, so the model (parameters, ``.grad``, buffers, modes) is
never changed. The model is evaluated in its current train/eval mode: call ``model.eval()`` first for a
deterministic loss when it has Dropout or BatchNorm (the measuring callbacks do).

Why our own: the reference code of each paper is tied to its training scripts (and the popular
PAC-Bayes implementation in "robust-generalization-measures" samples with a *variance* where a standard
deviation is meant); here each measure is one function with one convention, ``d = sigma * z`` with
``z ~ N(0, I)``, and closed-form tests.

Conventions. ``w`` are the trainable parameters as one flat vector, ``L`` the mean loss over all samples
of ``batches``. The *adaptive* variants measure in the coordinates of ASAM (Kwon et al. 2021): a
perturbation is ``d = |w| * e`` (elementwise) with ``e`` in the ball or drawn from the distribution, which
makes them invariant to the rescaling of ReLU layers by ``c`` and ``1/c``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_optsurvey.curvature.objective import batch_size, split_samples
from lightning_optsurvey.measures._functional import (
    Batch,
    FlatObjective,
    LossFn,
    randn,
)
from lightning_optsurvey.validation import check_bool, check_float, check_generator, check_int

__all__ = [
    "average_sharpness",
    "keskar_sharpness",
    "pac_bayes_sigma",
    "sam_sharpness",
    "worst_case_sharpness",
]

_NORMS = ("l2", "linf")
# Auto-PGD constants (Croce & Hein 2020, section 3.2): momentum weight and the success-rate threshold.
_APGD_ALPHA = 0.75
_APGD_SUCCESS = 0.75


def _check_randomness(generator: Any, adaptive: Any = False) -> None:
    check_generator(generator)
    check_bool("adaptive", adaptive)


def _concat_samples(batches: list[Batch]) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*batches)
    if not all(isinstance(t, Tensor) for t in (*xs, *ys)):
        raise TypeError("m-sharpness regroups samples and needs tensor inputs and targets")
    return torch.cat(xs), torch.cat(ys)


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    rho: float = 0.05,
    m: int | None = None,
) -> float:
    r"""SAM's one-step sharpness: the loss increase after one normalized gradient ascent step of radius rho.

    .. math::
        S_\rho = L\!\left(w + \rho \frac{\nabla L(w)}{\lVert \nabla L(w) \rVert_2}\right) - L(w),

    the first-order solution of SAM's inner maximization. With ``m``, the samples of ``batches`` are split
    (in order) into disjoint groups of ``m`` (the last may be smaller), each group takes its own step, and
    the result is the size-weighted mean over groups of the groups' sharpness (m-sharpness). A group with
    a zero gradient contributes 0. With a ``ModuleLoss`` (any batch structure) or several inputs the groups
    are formed within each batch (every tensor leaf with the batch's leading size sliced), so they match the
    groups across batches when the batch sizes are multiples of ``m``.

    Args:
        model: The network (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batches: Sequence of ``(inputs, targets)``.
        rho: Radius of the step, > 0.
        m: Group size for m-sharpness, or ``None`` for one step on all samples.

    Returns:
        The loss increase (0 at a zero gradient).

    Raises:
        ValueError: If ``rho`` is not positive or ``m`` is not a positive integer.

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for Efficiently Improving
        Generalization. ICLR 2021. https://arxiv.org/abs/2010.01412
    """
    rho = check_float("rho", rho, low=0.0, low_open=True)
    if m is not None:
        check_int("m", m)
        objective = FlatObjective(model, loss_fn, batches)
        tensors = objective.pairs and all(isinstance(t, Tensor) for b in objective.batches for t in b)
        if not tensors:
            # Any batch structure (compute_loss, several inputs): groups of m consecutive samples of each batch.
            parts = [g for b in objective.batches for g in split_samples(b, batch_size(b), m)]
            weights = [objective.objective.size(model, g) for g in parts]
            return sum(sam_sharpness(model, objective.objective, [g], rho) * (w / sum(weights))
                       for g, w in zip(parts, weights))
        x, y = _concat_samples(objective.batches)
        groups = [(x[i : i + m], y[i : i + m]) for i in range(0, x.shape[0], m)]
        total = x.shape[0]
        return sum(sam_sharpness(model, loss_fn, [g], rho) * (g[1].shape[0] / total) for g in groups)
    objective = FlatObjective(model, loss_fn, batches)
    loss, grad = objective.loss_and_grad()
    norm = grad.norm()
    if norm == 0:
        return 0.0
    return float(objective.loss(objective.w + (rho / norm) * grad) - loss)


def _project(d: Tensor, rho: float, norm: str) -> Tensor:
    if norm == "linf":
        return d.clamp(-rho, rho)
    length = d.norm()
    return d * (rho / length) if length > rho else d


def _ascent_direction(g: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return g.sign()
    length = g.norm()
    return g / length if length > 0 else g


def _apgd_checkpoints(steps: int) -> set[int]:
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)  (Croce & Hein 2020, eq. 6)
    fractions = [0.0, 0.22]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    return {math.ceil(p * steps) for p in fractions[1:] if p <= 1.0}


def _maximize(
    objective: FlatObjective,
    scale: Tensor,
    rho: float,
    norm: str,
    steps: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Auto-PGD ascent on ``f(e) = L(w + scale * e)`` over ``||e||_norm <= rho``; returns the best ``f``.

    Starts at ``e = 0`` (so the first step is SAM's, resp. the sign step for linf), or, when the gradient
    there is zero (a critical point), at a random point of the sphere (l2) or a random vertex (linf).
    """
    f0, grad = objective.loss_and_grad()
    g = scale * grad
    if torch.count_nonzero(g) == 0:
        z = randn(objective.numel, objective.w, generator)
        x = rho * (z / z.norm() if norm == "l2" else z.sign())
        f, grad = objective.loss_and_grad(objective.w + scale * x)
        g = scale * grad
    else:
        x, f = torch.zeros_like(objective.w), f0
    best_x, best_f, best_g = x, f, g
    eta = 2.0 * rho
    x_prev = x
    checkpoints = _apgd_checkpoints(steps)
    last_checkpoint, successes = 0, 0
    eta_at_checkpoint, best_at_checkpoint = eta, best_f
    for k in range(steps):
        z = _project(x + eta * _ascent_direction(g, norm), rho, norm)
        alpha = 1.0 if k == 0 else _APGD_ALPHA
        x_new = _project(x + alpha * (z - x) + (1.0 - alpha) * (x - x_prev), rho, norm)
        f_new, grad = objective.loss_and_grad(objective.w + scale * x_new)
        g_new = scale * grad
        successes += int(f_new > f)
        if f_new > best_f:
            best_x, best_f, best_g = x_new, f_new, g_new
        x_prev, x, f, g = x, x_new, f_new, g_new
        if k + 1 in checkpoints:
            few_successes = successes < _APGD_SUCCESS * (k + 1 - last_checkpoint)
            stalled = eta_at_checkpoint == eta and bool(best_at_checkpoint == best_f)
            eta_at_checkpoint, best_at_checkpoint = eta, best_f
            if few_successes or stalled:
                eta /= 2.0
                x_prev, x, f, g = best_x, best_x, best_f, best_g
            last_checkpoint, successes = k + 1, 0
    return best_f - f0


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    rho: float = 0.05,
    norm: str = "l2",
    adaptive: bool = False,
    steps: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    r"""Worst-case sharpness: the largest loss increase found in a weight-space ball, by Auto-PGD.

    .. math::
        S^{\max}_\rho = \max_{\lVert e \rVert_p \le \rho} L(w + T_w e) - L(w), \qquad
        T_w = I \text{ (plain) or } \operatorname{diag}(|w|) \text{ (adaptive)},

    with ``p`` = 2 or infinity. The maximization is projected gradient ascent with Auto-PGD's momentum
    and step-size halving (Croce & Hein 2020), as Andriushchenko et al. (2023) do in weight space. It
    starts at ``e = 0``, so its first iterate is SAM's step and the result is never below
    :func:`sam_sharpness` (l2, plain); at a critical point it starts at a random point of the sphere drawn
    from ``generator``. The value is a lower bound of the true maximum (attained at the best iterate).

    Args:
        model: The network (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batches: Sequence of ``(inputs, targets)``.
        rho: Radius of the ball, > 0.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: Measure in ASAM's ``|w|``-scaled coordinates.
        steps: Ascent steps (each one gradient over ``batches``), >= 1.
        generator: Randomness of the start at a critical point (global RNG if ``None``).

    Returns:
        The largest loss increase found.

    Raises:
        ValueError: For a non-positive ``rho``, an unknown ``norm`` or ``steps < 1``.

    References:
        Andriushchenko, Croce, Müller, Hein, Flammarion. A Modern Look at the Relationship between
        Sharpness and Generalization. ICML 2023. https://arxiv.org/abs/2302.07011
        Croce, Hein. Reliable evaluation of adversarial robustness with an ensemble of diverse
        parameter-free attacks (Auto-PGD). ICML 2020. https://arxiv.org/abs/2003.01690
        Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
        of Deep Neural Networks. ICML 2021. https://arxiv.org/abs/2102.11600
    """
    rho = check_float("rho", rho, low=0.0, low_open=True)
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    check_int("steps", steps)
    _check_randomness(generator, adaptive)
    objective = FlatObjective(model, loss_fn, batches)
    scale = objective.w.abs() if adaptive else torch.ones_like(objective.w)
    return float(_maximize(objective, scale, rho, norm, steps, generator))


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    sigma: float = 0.01,
    adaptive: bool = False,
    num_samples: int = 32,
    generator: torch.Generator | None = None,
) -> float:
    r"""Average-case sharpness: the expected loss increase under Gaussian weight noise.

    .. math::
        S^{\mathrm{avg}}_\sigma = \mathbb{E}_{z \sim N(0, I)}\, L(w + \sigma\, T_w z) - L(w),

    estimated with ``num_samples`` draws (``T_w`` as in :func:`worst_case_sharpness`; ``sigma`` is a
    standard deviation). Near a minimum with Hessian ``H`` it is about
    :math:`\sigma^2 \operatorname{tr}(H)/2`.

    Args:
        model: The network (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batches: Sequence of ``(inputs, targets)``.
        sigma: Standard deviation of the noise, > 0.
        adaptive: Scale the noise by ``|w|`` elementwise.
        num_samples: Monte-Carlo draws, >= 1.
        generator: Source of the noise (global RNG if ``None``).

    Returns:
        The Monte-Carlo estimate.

    Raises:
        ValueError: For a non-positive ``sigma`` or ``num_samples < 1``.

    References:
        Andriushchenko et al. A Modern Look at the Relationship between Sharpness and Generalization.
        ICML 2023. https://arxiv.org/abs/2302.07011
        Jiang, Neyshabur, Mobahi, Krishnan, Bengio. Fantastic Generalization Measures and Where to Find
        Them. ICLR 2020. https://arxiv.org/abs/1912.02178
    """
    sigma = check_float("sigma", sigma, low=0.0, low_open=True)
    check_int("num_samples", num_samples)
    _check_randomness(generator, adaptive)
    objective = FlatObjective(model, loss_fn, batches)
    scale = sigma * (objective.w.abs() if adaptive else torch.ones_like(objective.w))
    base = objective.loss()
    total = torch.zeros((), dtype=objective.dtype, device=objective.device)
    for _ in range(num_samples):
        total += objective.loss(objective.w + scale * randn(objective.numel, objective.w, generator))
    return float(total / num_samples - base)


def keskar_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    epsilon: float = 1e-3,
    steps: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    r"""Keskar et al.'s sharpness: the relative loss increase over a box scaled by the weights' sizes.

    .. math::
        \phi_\epsilon = 100 \cdot \frac{\max_{d \in C_\epsilon} L(w + d) - L(w)}{1 + L(w)}, \qquad
        C_\epsilon = \{ d : |d_i| \le \epsilon (|w_i| + 1) \},

    in the full parameter space (Keskar et al.'s ``A = I_n``). The box is an l-infinity ball in the
    coordinates ``d = (|w| + 1) e``; the maximum is searched with the same Auto-PGD ascent as
    :func:`worst_case_sharpness` (Keskar et al. used L-BFGS-B).

    Args:
        model: The network (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batches: Sequence of ``(inputs, targets)``.
        epsilon: Relative size of the box, > 0.
        steps: Ascent steps, >= 1.
        generator: Randomness of the start at a critical point (global RNG if ``None``).

    Returns:
        The sharpness, in percent of ``1 + L(w)``.

    Raises:
        ValueError: For a non-positive ``epsilon`` or ``steps < 1``.

    References:
        Keskar, Mudigere, Nocedal, Smelyanskiy, Tang. On Large-Batch Training for Deep Learning:
        Generalization Gap and Sharp Minima. ICLR 2017. https://arxiv.org/abs/1609.04836
    """
    epsilon = check_float("epsilon", epsilon, low=0.0, low_open=True)
    check_int("steps", steps)
    _check_randomness(generator)
    objective = FlatObjective(model, loss_fn, batches)
    base = objective.loss()
    increase = _maximize(objective, objective.w.abs() + 1.0, epsilon, "linf", steps, generator)
    return float(100.0 * increase / (1.0 + base))


def pac_bayes_sigma(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    max_deviation: float = 0.1,
    adaptive: bool = False,
    num_samples: int = 16,
    sigma_max: float = 1.0,
    rtol: float = 1e-3,
    max_iter: int = 60,
    generator: torch.Generator | None = None,
) -> float:
    r"""The PAC-Bayes flatness sigma: the largest noise level whose expected loss increase stays in bounds.

    .. math::
        \sigma^* = \max \{ \sigma \in (0, \sigma_{\max}] :
            \hat{\mathbb{E}}_{z}\, L(w + \sigma\, T_w z) - L(w) \le \text{max\_deviation} \},

    with ``z ~ N(0, I)`` so that ``sigma`` is a **standard deviation** (the noise is ``sigma * z``, not
    ``sqrt(sigma) * z``). The expectation is the mean over ``num_samples`` draws that stay fixed during the
    search (common random numbers), so the estimated deviation is a deterministic function of ``sigma``
    and the bisection on ``[0, sigma_max]`` stops when the bracket is within ``rtol`` of its upper end.
    Jiang et al. turn it into the measure ``1 / sigma^2`` ("pacbayes.flatness"; "pacbayes.mag.flatness"
    is the ``adaptive`` one). Near a minimum with Hessian ``H``, ``sigma^* ~ sqrt(2 max_deviation / tr H)``.

    Args:
        model: The network (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batches: Sequence of ``(inputs, targets)``.
        max_deviation: Allowed expected loss increase, > 0.
        adaptive: Scale the noise by ``|w|`` elementwise (magnitude-aware).
        num_samples: Monte-Carlo draws, >= 1.
        sigma_max: Upper end of the search, > 0. If even it keeps the deviation in bounds, it is
            returned with a warning.
        rtol: Relative width of the final bracket, in (0, 1).
        max_iter: Bisection steps at most, >= 1.
        generator: Source of the noise (global RNG if ``None``).

    Returns:
        The largest sigma found that keeps the estimated deviation within ``max_deviation``.

    Raises:
        ValueError: For an out-of-range argument.

    References:
        Jiang, Neyshabur, Mobahi, Krishnan, Bengio. Fantastic Generalization Measures and Where to Find
        Them. ICLR 2020. https://arxiv.org/abs/1912.02178
        Dziugaite, Roy. Computing Nonvacuous Generalization Bounds for Deep (Stochastic) Neural Networks
        with Many More Parameters than Training Data. UAI 2017. https://arxiv.org/abs/1703.11008
    """
    max_deviation = check_float("max_deviation", max_deviation, low=0.0, low_open=True)
    check_int("num_samples", num_samples)
    sigma_max = check_float("sigma_max", sigma_max, low=0.0, low_open=True)
    rtol = check_float("rtol", rtol, low=0.0, high=1.0, low_open=True, high_open=True)
    check_int("max_iter", max_iter)
    _check_randomness(generator, adaptive)
    objective = FlatObjective(model, loss_fn, batches)
    scale = objective.w.abs() if adaptive else torch.ones_like(objective.w)
    noise = [scale * randn(objective.numel, objective.w, generator) for _ in range(num_samples)]
    base = objective.loss()

    def deviation(sigma: float) -> float:
        return float(sum(objective.loss(objective.w + sigma * z) for z in noise) / num_samples - base)

    if deviation(sigma_max) <= max_deviation:
        warnings.warn(
            f"pac_bayes_sigma: the loss deviation at sigma_max={sigma_max} is still within {max_deviation}; "
            "returning sigma_max (raise it for the true value)",
            stacklevel=2,
        )
        return sigma_max
    lo, hi = 0.0, sigma_max
    for _ in range(max_iter):
        if hi - lo <= rtol * hi:
            break
        mid = 0.5 * (lo + hi)
        if deviation(mid) <= max_deviation:
            lo = mid
        else:
            hi = mid
    return lo
