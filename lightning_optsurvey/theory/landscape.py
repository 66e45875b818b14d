"""Landscape-aware results: edge of stability (19), SAM's sharpness (20), smoothing (23).

The curvature comes from the package's engine (:class:`~lightning_optsurvey.curvature.HessianOperator`
and :func:`~lightning_optsurvey.curvature.lanczos`) and is checked against a dense float64 Hessian;
sharpness from :func:`~lightning_optsurvey.measures.worst_case_sharpness`; the smoothed losses' curvature
is read off the registry's ``entropy_sgd`` and ``lpf_sgd`` themselves, from the gradients they step with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from lightning_optsurvey.curvature import HessianOperator, lanczos
from lightning_optsurvey.measures import worst_case_sharpness
from lightning_optsurvey.optim import create_optimizer
from lightning_optsurvey.theory.decisions import MC_Z, mean_and_stderr
from lightning_optsurvey.theory.fields import flag, integer, positive, positives
from lightning_optsurvey.theory.problems import DTYPE, LogisticRegression, Quadratic, WavyFunction, generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = [
    "GDEdgeOfStability",
    "LPFSmoothingBound",
    "SAMNonConvex",
    "SAMSharpness",
    "SmoothingFlattens",
    "edge_of_stability_outcome",
]

#: Round-off allowed on top of the exact Taylor remainder M rho^3 / 6 in the SAM check.
SAM_ATOL = 1e-14
#: Agreement of Lanczos's lambda_max with the dense Hessian's.
LANCZOS_RTOL = 1e-8
#: Edge of stability: the median of lambda_max / (2/eta) over the second half of training must lie in
#: this band, and every value in the wider one: with MSE the sharpness saw-tooths around 2/eta, rising
#: above it until a catapult drops it (seen between 0.47 and 1.72 over seeds 0-5; medians 0.96-1.04).
EOS_MEDIAN_BAND = (0.85, 1.15)
EOS_RANGE_BAND = (0.4, 2.0)
#: Progressive sharpening: lambda_max starts below this fraction of 2/eta ...
EOS_START_FRACTION = 0.5
#: ... and reaches at least this fraction of 2/eta.
EOS_REACH_FRACTION = 0.95
#: The four numbers above, as :func:`edge_of_stability_outcome` takes them.
EOS_BANDS = (EOS_START_FRACTION, EOS_REACH_FRACTION, EOS_MEDIAN_BAND, EOS_RANGE_BAND)
#: Agreement of the Hessian of the local entropy read off Entropy-SGD with gamma A (A + gamma I)^(-1)
#: (the inner Langevin loop, run without noise, converges to ~1e-12).
ENTROPY_RTOL = 1e-6
#: Standard errors allowed between LPF-SGD's mean gradient and the closed form, per coordinate: a Bonferroni
#: band over the 64 comparisons (16 rows x 4 coordinates) with Student-t tails (31 degrees of freedom), so
#: that the family-wise false alarm stays near 1e-3.
LPF_Z = 5.0


def _mlp(widths: tuple[int, ...], gen: torch.Generator) -> nn.Module:
    """A tanh MLP initialized from ``gen`` (PyTorch's default uniform ranges), without touching the global RNG."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out, device="meta", dtype=DTYPE), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to_empty(device="cpu")
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                for tensor in (module.weight, module.bias):
                    tensor.copy_((2.0 * torch.rand(tensor.shape, generator=gen, dtype=DTYPE) - 1.0) * bound)
    return model


@register_result
class SAMSharpness(Result):
    """At a minimum, SAM's sharpness is rho^2 lambda_max / 2 to second order."""

    number = 20
    name = "sam_sharpness"
    statement = (
        "at a minimum w* of a loss whose Hessian is M-Lipschitz, max_(||e|| <= rho) L(w* + e) - L(w*) = "
        "rho^2 lambda_max(H)/2 + O(rho^3), the remainder at most M rho^3 / 6 in absolute value"
    )
    reference = "Foret, Kleiner, Mobahi & Neyshabur 2021, arXiv:2010.01412, Sec. 2 (and survey Sec. 4.1)"
    criterion = (
        "worst-case sharpness (Auto-PGD, measures.worst_case_sharpness) within M rho^3 / 6 (+ "
        f"{SAM_ATOL:g}) of rho^2 lambda_max / 2 for each rho, with M = mean ||a_i||^3 / (6 sqrt 3) the logistic "
        "loss's Hessian-Lipschitz constant; lambda_max from Lanczos on HessianOperator, equal to the dense "
        f"Hessian's within {LANCZOS_RTOL:g}; the minimum of an unregularized logistic regression on "
        "non-separable data, found by Newton's method to a zero gradient"
    )

    samples: int = integer(100, low=2)
    dim: int = integer(5)
    radii: tuple[float, ...] = positives((0.01, 0.03, 0.1))
    ascent_steps: int = integer(50)

    def problem(self, seed: int = 0) -> LogisticRegression:
        return LogisticRegression.build(self.samples, self.dim, 0.0, generator(seed))

    def predict(self, problem: LogisticRegression, k: int, rho: float | None = None) -> float:
        """``rho^2 lambda_max / 2`` for the radius of index ``k`` in ``radii`` (or ``rho``)."""
        rho = self.radii[k] if rho is None else rho
        lam = float(torch.linalg.eigvalsh(problem.hessian(problem.minimizer))[-1])
        return 0.5 * rho**2 * lam

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        w = p.minimizer
        model, loss_fn, batches = p.data_term_model(w)
        eig = lanczos(HessianOperator(model, loss_fn, batches), k=1, tol=1e-10)
        lam = float(eig.eigenvalues[0])
        dense = float(torch.linalg.eigvalsh(p.hessian(w))[-1])
        lanczos_ok = abs(lam - dense) <= LANCZOS_RTOL * dense
        measured = [
            worst_case_sharpness(model, loss_fn, batches, rho=rho, steps=self.ascent_steps, generator=generator(seed))
            for rho in self.radii
        ]
        predicted = [0.5 * rho**2 * lam for rho in self.radii]
        ratios = [m / q for m, q in zip(measured, predicted)]
        remainders = [p.hessian_lipschitz * rho**3 / 6.0 for rho in self.radii]
        holds = lanczos_ok and all(
            abs(m - q) <= r + SAM_ATOL for m, q, r in zip(measured, predicted, remainders, strict=True)
        )
        return CheckOutcome(
            predicted=predicted[-1], measured=measured[-1], holds=holds, name=self.name,
            quantity=f"worst-case sharpness at rho={self.radii[-1]:g}",
            details=f"||grad L(w*)|| = {float(torch.linalg.vector_norm(p.gradient(w))):.1e}, lambda_max = {lam:.6g} "
            f"(dense {dense:.6g}); sharpness / (rho^2 lambda_max/2): "
            + ", ".join(
                f"rho={rho:g}: {r:.5f} (1 +- {b / q:.3g})"
                for rho, r, b, q in zip(self.radii, ratios, remainders, predicted, strict=True)
            ),
            steps=list(self.radii), predicted_curve=predicted, measured_curve=measured, x_label="rho",
            y_label="max_(||e||<=rho) L(w*+e) - L(w*)", log_x=True,
        )


@dataclass(frozen=True)
class _SmoothingProblem:
    quadratic: Quadratic
    wavy: WavyFunction
    point: torch.Tensor
    radius: float


@register_result
class SmoothingFlattens(Result):
    """The losses that Entropy-SGD and LPF-SGD minimize have a smaller Hessian norm than the original."""

    number = 23
    name = "smoothing_flattens"
    statement = (
        "local entropy -F_gamma of f: Hessian gamma A (A + gamma I)^(-1) on a quadratic f = x^T A x/2, so "
        "||H|| = gamma lambda/(lambda + gamma) < lambda_max(A); Gaussian smoothing E f(x + s e): "
        "||Hessian|| <= sup ||Hessian of f|| (on f = sum x_j^2/2 + a cos(b x_j): curvature "
        "1 - a b^2 exp(-b^2 s^2/2) cos(b x_j) <= L = 1 + a b^2)"
    )
    reference = (
        "Chaudhari et al. 2017, arXiv:1611.01838 (local entropy smooths the Hessian); "
        "Bisla, Wang & Choromanska 2022, arXiv:2201.08025 (Gaussian smoothing lowers the Hessian norm)"
    )
    criterion = (
        f"Entropy-SGD (noise 0, alpha 1, 170 inner steps) read as the map x -> gamma (x - <x'>): its matrix's "
        f"eigenvalues within {ENTROPY_RTOL:g} (relative) of gamma lambda_j/(lambda_j + gamma) and all below "
        f"lambda_max(A); LPF-SGD's Monte-Carlo smoothed gradient differentiated along v orthogonal to x (so "
        f"its kernel radius sigma ||x|| stays fixed): curvature within {MC_Z:g} standard errors of the exact "
        "smoothed value and below L, at the point where f's curvature is L"
    )

    dim: int = integer(6, low=2)
    gamma: float = positive(1.0)
    largest_eigenvalue: float = positive(10.0)
    inner_steps: int = integer(170)
    radius: float = positive(0.5)
    lpf_seeds: int = integer(8, low=2)
    lpf_samples: int = integer(250)

    def problem(self, seed: int = 0) -> _SmoothingProblem:
        eigenvalues = torch.logspace(-2, math.log10(self.largest_eigenvalue), self.dim, dtype=DTYPE)
        quadratic = Quadratic.with_spectrum(eigenvalues, generator(seed))
        quadratic = Quadratic(quadratic.eigenvalues, quadratic.basis, torch.zeros(self.dim, dtype=DTYPE))
        wavy = WavyFunction(2, 1.0, 2.0)
        # cos(b x_j) = -1 on both coordinates: f's curvature is L = 1 + a b^2 in every direction there.
        point = torch.full((2,), math.pi / wavy.frequency, dtype=DTYPE)
        return _SmoothingProblem(quadratic, wavy, point, self.radius)

    def predict(self, problem: _SmoothingProblem, k: int) -> float:
        """Eigenvalue ``k`` (ascending) of the local entropy's Hessian, ``gamma lambda_k/(lambda_k + gamma)``."""
        lam = float(problem.quadratic.eigenvalues[k])
        return self.gamma * lam / (lam + self.gamma)

    def exact_smoothed_curvature(self, problem: _SmoothingProblem, direction: torch.Tensor) -> float:
        """``v^T E[Hess f(x + s e)] v`` in closed form: ``E cos(b(x + s e)) = exp(-b^2 s^2/2) cos(b x)``."""
        f = problem.wavy
        damping = math.exp(-0.5 * (f.frequency * problem.radius) ** 2)
        diagonal = 1.0 - f.amplitude * f.frequency**2 * damping * torch.cos(f.frequency * problem.point)
        return float((direction * direction * diagonal).sum())

    def _entropy_hessian(self, q: Quadratic) -> torch.Tensor:
        columns = []
        inner_lr = 2.0 / (q.L + q.mu + 2.0 * self.gamma)  # optimal step for the inner quadratic
        for i in range(q.dim):
            x = torch.nn.Parameter(torch.eye(q.dim, dtype=DTYPE)[i].clone())
            optimizer = create_optimizer(
                "entropy_sgd", [x], lr=1.0, momentum=0.0, gamma=self.gamma, gamma_scoping=0.0,
                inner_steps=self.inner_steps, inner_lr=inner_lr, noise=0.0, alpha=1.0,
            )

            def closure(x: torch.nn.Parameter = x) -> torch.Tensor:
                x.grad = q.gradient(x.detach())
                return q.value(x.detach())

            before = x.detach().clone()
            optimizer.step(closure)
            columns.append(before - x.detach())  # lr = 1: the step is gamma (x - <x'>)
        matrix = torch.stack(columns, dim=1)
        return 0.5 * (matrix + matrix.T)

    def _lpf_curvature(self, p: _SmoothingProblem, direction: torch.Tensor, seed: int, h: float = 1e-5) -> float:
        f = p.wavy
        sigma = p.radius / float(torch.linalg.vector_norm(p.point))
        gradients = []
        for sign in (1.0, -1.0):
            x = torch.nn.Parameter(p.point + sign * h * direction)
            optimizer = create_optimizer(
                "lpf_sgd", [x], lr=1.0, momentum=0.0, sigma=sigma, num_samples=self.lpf_samples, seed=seed
            )

            def closure(x: torch.nn.Parameter = x) -> torch.Tensor:
                x.grad = f.gradient(x.detach())
                return f.value(x.detach())

            optimizer.step(closure)
            gradients.append(x.grad.detach().clone())  # LPF-SGD leaves its smoothed gradient in .grad
        return float(direction @ (gradients[0] - gradients[1])) / (2.0 * h)

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        q = p.quadratic
        measured = torch.linalg.eigvalsh(self._entropy_hessian(q)).tolist()
        predicted = [self.predict(p, k) for k in range(q.dim)]
        entropy_ok = all(abs(m - e) <= ENTROPY_RTOL * e for m, e in zip(measured, predicted)) and max(measured) < q.L
        x = p.point
        direction = torch.stack([-x[1], x[0]]) / torch.linalg.vector_norm(x)
        samples = torch.tensor([self._lpf_curvature(p, direction, seed * 1000 + i) for i in range(self.lpf_seeds)])
        curvature, error = map(float, mean_and_stderr(samples))
        exact = self.exact_smoothed_curvature(p, direction)
        f = p.wavy
        curvature_of_f = 1.0 - f.amplitude * f.frequency**2 * torch.cos(f.frequency * x)
        original = float((direction * direction * curvature_of_f).sum())
        lpf_ok = abs(curvature - exact) <= MC_Z * error and curvature < p.wavy.L
        return CheckOutcome(
            predicted=predicted[-1], measured=measured[-1], holds=entropy_ok and lpf_ok, name=self.name,
            quantity="largest Hessian eigenvalue of the local entropy (lambda_max(A) = "
            f"{q.L:g}, gamma = {self.gamma:g})",
            details=f"Entropy-SGD: lambda_max {measured[-1]:.8g} vs gamma lambda/(lambda+gamma) {predicted[-1]:.8g} "
            f"(original {q.L:g}); LPF-SGD (radius {p.radius:g}) curvature at the sharpest point: {curvature:.4f} +- "
            f"{error:.2g} vs exact {exact:.4f}, original {original:g} = L",
            steps=q.eigenvalues.tolist(), predicted_curve=predicted, measured_curve=measured,
            extra_curves={"original (lambda_j)": tuple(q.eigenvalues.tolist())}, x_label="lambda_j of A",
            y_label="Hessian eigenvalue of -F_gamma", log_x=True,
        )


@dataclass(frozen=True)
class _RegressionTask:
    inputs: torch.Tensor
    targets: torch.Tensor
    model: nn.Module


def edge_of_stability_outcome(
    name: str, threshold: float, ratios: list[float], early_label: str, early: float,
    bands: tuple[float, float, tuple[float, float], tuple[float, float]], *, steps: list[int],
    measured_curve: list[float], quantity: str, details: tuple[str, str], y_label: str,
) -> CheckOutcome:
    """The verdict of an edge-of-stability run, from its sharpness over the threshold at each measurement.

    It holds when training starts away from the edge (``early`` below ``bands[0]``), the ratio reaches
    ``bands[1]``, and over the second half of the measurements the median lies in ``bands[2]`` and every
    value in ``bands[3]`` (it hovers at the edge, it does not diverge). ``details`` is the text before and
    after the measured figures.
    """
    start, reach, median_band, range_band = bands
    tail = ratios[len(ratios) // 2 :]
    median = sorted(tail)[len(tail) // 2]
    holds = (
        early < start
        and max(ratios) >= reach
        and median_band[0] <= median <= median_band[1]
        and all(range_band[0] <= r <= range_band[1] for r in tail)
    )
    before, after = details
    return CheckOutcome(
        predicted=threshold, measured=median * threshold, holds=holds, name=name, quantity=quantity,
        details=f"{before}{early_label} {early:.2f}, peak {max(ratios):.2f}, second half in [{min(tail):.2f}, "
        f"{max(tail):.2f}] (median {median:.2f}); {after}",
        steps=steps, predicted_curve=[threshold] * len(steps), measured_curve=measured_curve, x_label="GD step",
        y_label=y_label, log_y=False,
    )


@register_result
class GDEdgeOfStability(Result):
    """Full-batch GD drives the sharpness up to 2/eta and keeps it there."""

    number = 19
    name = "edge_of_stability"
    statement = (
        "full-batch GD with step eta on a neural network (MSE): lambda_max of the training-loss Hessian rises "
        "(progressive sharpening) until it reaches 2/eta, then hovers around 2/eta while the loss keeps "
        "decreasing non-monotonically"
    )
    reference = "Cohen, Kaur, Li, Kolter & Talwalkar 2021, arXiv:2103.00065, Sec. 3"
    criterion = (
        f"tolerance band: lambda_max (Lanczos on HessianOperator, warm-started) starts below "
        f"{EOS_START_FRACTION:g} x 2/eta and reaches {EOS_REACH_FRACTION:g} x 2/eta; over the second half of "
        f"training its median over 2/eta lies in {list(EOS_MEDIAN_BAND)} and every value in "
        f"{list(EOS_RANGE_BAND)}; tanh MLP 4-24-24-1, 20 random points, the registry's 'sgd' as GD"
    )

    samples: int = integer(20, low=2)
    width: int = integer(24)
    lr: float = positive(0.1)
    steps: int = integer(300, low=10)
    every: int = integer(15)

    def problem(self, seed: int = 0) -> _RegressionTask:
        gen = generator(seed)
        inputs = torch.randn(self.samples, 4, generator=gen, dtype=DTYPE)
        targets = torch.randn(self.samples, 1, generator=gen, dtype=DTYPE)
        return _RegressionTask(inputs, targets, _mlp((4, self.width, self.width, 1), gen))

    def predict(self, problem: _RegressionTask, k: int) -> float:
        """The stability threshold ``2/eta`` (the same at every step)."""
        return 2.0 / self.lr

    def check(self, seed: int = 0) -> CheckOutcome:
        task = self.problem(seed)
        model, loss_fn, batches = task.model, nn.MSELoss(), [(task.inputs, task.targets)]
        optimizer = create_optimizer("sgd", model.parameters(), lr=self.lr)
        threshold = self.predict(task, 0)
        ks, sharpness, losses, start = [], [], [], None
        for k in range(self.steps + 1):
            if k % self.every == 0:
                eig = lanczos(HessianOperator(model, loss_fn, batches), k=1, tol=1e-3, v0=start)
                start = eig.eigenvectors[:, 0]
                ks.append(k)
                sharpness.append(float(eig.eigenvalues[0]))
            optimizer.zero_grad()
            loss = loss_fn(model(task.inputs), task.targets)
            loss.backward()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):  # the step size is beyond any edge: GD has diverged
                return CheckOutcome(
                    predicted=threshold, measured=math.nan, holds=False, name=self.name,
                    quantity="median lambda_max over the second half of training",
                    details=f"eta={self.lr:g}: gradient descent diverged at step {k} (loss {losses[-1]}), so "
                            "there is no edge of stability to measure",
                    steps=ks, predicted_curve=[threshold] * len(ks), measured_curve=sharpness,
                    y_label="lambda_max of the training loss",
                )
            optimizer.step()
        ratios = [s / threshold for s in sharpness]
        return edge_of_stability_outcome(
            self.name, threshold, ratios, "start", ratios[0], EOS_BANDS, steps=ks, measured_curve=sharpness,
            quantity="median lambda_max over the second half of training",
            details=(f"eta={self.lr:g}, 2/eta={threshold:g}; lambda_max/(2/eta): ", f"loss {losses[0]:.3g} -> "
                     f"{losses[-1]:.3g}"),
            y_label="lambda_max of the training loss",
        )


@register_result
class SAMNonConvex(Result):
    """SAM with a constant radius converges on a smooth non-convex function to an O(L^2 rho^2) neighbourhood."""

    number = 29
    name = "sam_nonconvex"
    statement = (
        "f L-smooth (non-convex), bounded below; SAM x_(k+1) = x_k - eta grad f(x_k + rho g_k/||g_k||) with eta "
        "<= 1/L and radius rho: (1/K) sum_(k<K) ||grad f(x_k)||^2 <= 4 (f(x_0) - f*)/(eta K) + 18 L^2 rho^2 for every "
        "K (descent lemma with ||grad f(x + rho u) - grad f(x)|| <= L rho), so SAM converges at SGD's O(1/K) up to "
        "a floor O(L^2 rho^2) that vanishes as rho -> 0 (rho ~ 1/sqrt(K) gives O(1/sqrt(K)))"
    )
    reference = (
        "Andriushchenko & Flammarion 2022, arXiv:2206.06232, Sec. 4 (convergence of SAM for non-convex "
        "objectives); the constants are those of the descent-lemma argument for the deterministic normalized step"
    )
    criterion = (
        f"bound at every K = 1..steps for each radius (slack {SAM_ATOL:g}), with eta <= 1/L; f = sum_j x_j^2/2 + "
        "cos(2 x_j) (L = 5) from a random start, the registry's 'sam' (base 'sgd'), its closure writing the exact "
        "gradient"
    )

    dim: int = integer(5)
    steps: int = integer(300, low=2)
    radii: tuple[float, ...] = positives((0.01, 0.1))
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> tuple[WavyFunction, torch.Tensor]:
        return WavyFunction(self.dim, 1.0, 2.0), 3.0 * torch.randn(self.dim, generator=generator(seed), dtype=DTYPE)

    def predict(self, problem: tuple[WavyFunction, torch.Tensor], k: int, rho: float | None = None) -> float:
        """The bound on the average over ``K = k`` steps, for ``rho`` (default: the first radius)."""
        f, start = problem
        return self._bound(f, float(f.value(start)) - f.infimum, [k], self.radii[0] if rho is None else rho)[0]

    def _bound(self, f: WavyFunction, gap: float, ks: list[int], rho: float) -> list[float]:
        lr = self.lr_scale / f.L
        return [4.0 * gap / (lr * k) + 18.0 * f.L**2 * rho**2 for k in ks]

    def check(self, seed: int = 0) -> CheckOutcome:
        problem = self.problem(seed)
        f, start = problem
        ks = list(range(1, self.steps + 1))
        gap = float(f.value(start)) - f.infimum
        holds, lines, curves = self.lr_scale <= 1.0, [], {}
        for rho in self.radii:
            x = torch.nn.Parameter(start.clone())
            optimizer = create_optimizer("sam", [x], base="sgd", rho=rho, lr=self.lr_scale / f.L)

            def closure(x: torch.nn.Parameter = x) -> torch.Tensor:
                x.grad = f.gradient(x.detach())
                return f.value(x.detach())

            norms = []
            for _ in range(self.steps):
                norms.append(float(f.gradient(x.detach()).square().sum()))
                optimizer.step(closure)
            averages = (torch.tensor(norms, dtype=DTYPE).cumsum(0) / torch.arange(1, self.steps + 1)).tolist()
            bound = self._bound(f, gap, ks, rho)
            violations = sum(1 for a, b in zip(averages, bound, strict=True) if not a <= b + SAM_ATOL)
            holds = holds and violations == 0
            curves[rho] = (averages, bound)
            lines.append(f"rho={rho:g}: average at K {averages[-1]:.3g} <= {bound[-1]:.3g} (floor "
                         f"{18 * f.L**2 * rho**2:.3g}), last ||grad||^2 {norms[-1]:.2e}, violations {violations}")
        averages, bound = curves[self.radii[0]]
        return CheckOutcome(
            predicted=bound[-1], measured=averages[-1], holds=holds, name=self.name,
            quantity=f"(1/K) sum_k ||grad f(x_k)||^2 at K={self.steps}, rho={self.radii[0]:g}",
            details=f"L={f.L:g}, eta={self.lr_scale:g}/L, f(x_0) - f* = {gap:.4g}; "
            + "; ".join(lines),
            steps=ks, predicted_curve=bound, measured_curve=averages,
            extra_curves={f"rho={rho:g} measured": tuple(curves[rho][0]) for rho in self.radii[1:]},
            x_label="K", y_label="(1/K) sum_k ||grad f(x_k)||^2", log_x=True,
        )


@register_result
class LPFSmoothingBound(Result):
    """LPF-SGD steps with the gradient of the Gaussian-smoothed loss, within Nesterov & Spokoiny's bias bound."""

    number = 30
    name = "lpf_smoothing_bound"
    statement = (
        "f L-smooth, f_s(x) = E f(x + s u), u ~ N(0, I_d): |f_s(x) - f(x)| <= s^2 L d/2 and ||grad f_s(x) - "
        "grad f(x)|| <= (s/2) L (d + 3)^(3/2); LPF-SGD's step direction is an unbiased Monte-Carlo estimate of "
        "grad f_s with s = sigma ||w_k|| for each filter (row) w_k"
    )
    reference = (
        "Bisla, Wang & Choromanska 2022, arXiv:2201.08025 (LPF-SGD, the smoothed loss); Nesterov & Spokoiny "
        "2017, doi:10.1007/s10208-015-9296-2, Thm. 1 and Lemma 3 (smoothing bias for C^(1,1) functions)"
    )
    criterion = (
        "for every row, the registry's 'lpf_sgd' gradient (mean over 32 seeds of its Monte-Carlo estimate) within "
        f"{LPF_Z:g} standard errors of the closed-form grad f_s (E cos(b(x + s u)) = exp(-b^2 s^2/2) cos(b x)); the "
        "closed-form bias ||grad f_s - grad f|| and f_s - f below the bounds; f = sum_j x_j^2/2 + cos(2 x_j) "
        "(L = 5), one row per point, each its own filter of radius sigma ||w_k||"
    )

    points: int = integer(16, low=2)
    dim: int = integer(4)
    sigma: float = positive(0.1)
    samples: int = integer(50)
    seeds: int = integer(32, low=2)
    per_filter: bool = flag(True)

    def problem(self, seed: int = 0) -> tuple[WavyFunction, torch.Tensor]:
        points = 1.5 * torch.randn(self.points, self.dim, generator=generator(seed), dtype=DTYPE)
        return WavyFunction(self.dim, 1.0, 2.0), points

    def radii(self, points: torch.Tensor) -> torch.Tensor:
        """The kernel's standard deviation for each row: ``sigma ||w_k||`` (or the whole norm if not ``per_filter``)."""
        if self.per_filter:
            return self.sigma * torch.linalg.vector_norm(points, dim=1)
        return self.sigma * torch.linalg.vector_norm(points) * torch.ones(points.shape[0], dtype=DTYPE)

    def predict(self, problem: tuple[WavyFunction, torch.Tensor], k: int) -> float:
        """Nesterov & Spokoiny's gradient-bias bound ``(s/2) L (d + 3)^(3/2)`` at row ``k``."""
        f, points = problem
        return 0.5 * float(self.radii(points)[k]) * f.L * (self.dim + 3) ** 1.5

    def smoothed_gradient(self, f: WavyFunction, points: torch.Tensor) -> torch.Tensor:
        s = self.radii(points)[:, None]
        damping = torch.exp(-0.5 * (f.frequency * s) ** 2)
        return points - f.amplitude * f.frequency * damping * torch.sin(f.frequency * points)

    def check(self, seed: int = 0) -> CheckOutcome:
        problem = self.problem(seed)
        f, points = problem
        estimates = []
        for i in range(self.seeds):
            x = torch.nn.Parameter(points.clone())
            optimizer = create_optimizer(
                "lpf_sgd", [x], lr=1.0, momentum=0.0, sigma=self.sigma, num_samples=self.samples,
                seed=seed * 1000 + i,
            )

            def closure(x: torch.nn.Parameter = x) -> torch.Tensor:
                x.grad = f.gradient(x.detach())
                return f.value(x.detach()).sum()

            optimizer.step(closure)
            estimates.append(x.grad.detach().clone())  # LPF-SGD leaves its smoothed gradient in .grad
        mean, err = mean_and_stderr(torch.stack(estimates, dim=-1))
        s = self.radii(points)
        exact = self.smoothed_gradient(WavyFunction(self.dim, 1.0, 2.0), points)
        unbiased = bool(((mean - exact).abs() <= LPF_Z * err + 1e-12).all())
        bias = torch.linalg.vector_norm(exact - f.gradient(points), dim=1)
        measured_bias = torch.linalg.vector_norm(mean - f.gradient(points), dim=1)
        bounds = torch.tensor([self.predict(problem, k) for k in range(self.points)], dtype=DTYPE)
        damping = torch.exp(-0.5 * (f.frequency * s[:, None]) ** 2)
        value_gap = (0.5 * s * s * self.dim + (f.amplitude * (damping - 1) * torch.cos(f.frequency * points)).sum(1))
        value_ok = bool((value_gap.abs() <= 0.5 * s * s * f.L * self.dim + 1e-12).all())
        holds = unbiased and bool((bias <= bounds).all()) and value_ok
        worst = int((measured_bias / bounds).argmax())
        order = torch.argsort(s)
        return CheckOutcome(
            predicted=float(bounds[worst]), measured=float(measured_bias[worst]), holds=holds, name=self.name,
            quantity="||LPF-SGD gradient - grad f|| against (s/2) L (d+3)^(3/2) (row closest to its bound)",
            details=f"sigma={self.sigma:g}, d={self.dim}, {self.points} rows, {self.seeds} x {self.samples} samples; "
            f"LPF-SGD's gradient within the Monte-Carlo band of grad f_s on every row: {unbiased}; largest "
            f"bias / bound {float((bias / bounds).max()):.3g}; |f_s - f| / (s^2 L d / 2) at most "
            f"{float((value_gap.abs() / (0.5 * s * s * f.L * self.dim)).max()):.3g}"
            + ("" if self.per_filter else "; radius modelled as sigma ||w|| of the whole tensor"),
            steps=s[order].tolist(), predicted_curve=bounds[order].tolist(),
            measured_curve=measured_bias[order].tolist(),
            extra_curves={"||grad f_s - grad f|| (closed form)": tuple(bias[order].tolist())},
            x_label="kernel radius s = sigma ||w_k||", y_label="||gradient - grad f||", log_x=True,
        )
