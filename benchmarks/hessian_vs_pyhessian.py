"""Our curvature engine against PyHessian 0.1, side by side in one run, same model, batch and threads.

Cases (issue 3):
  * HVP cost in gradient-equivalents (time of one product / time of one loss gradient, same run);
  * top-1 eigenvalue to 1e-4 relative error against a converged float64 reference;
  * top-5, every eigenvalue within 1e-3 relative error;
  * trace at an equal budget of 60 products (RMS relative error over seeds);
  * spectral density;
  * warm start: Lanczos matvecs of a measurement seeded with the previous eigenvectors vs a cold one,
    along a training trajectory.

For the iterative cases each method gets, in hindsight, the loosest of its tolerances that reaches the
target (PyHessian: its relative-change ``tol``; ours: the residual ``tol``), so neither pays for an
over-tight setting. Times include building the operator (PyHessian's constructor runs the
double-backward pass; ours builds its graph on the first product).

Usage:
    .venv/bin/python benchmarks/hessian_vs_pyhessian.py [--threads 1] [--models cnn mlp_wide] [--seeds 10]
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_optsurvey.curvature import (
    HessianOperator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
)
from lightning_optsurvey.tasks import DigitsDataModule, build_model

# pyhessian/__init__ rebinds the name `pyhessian.hessian` to the class; get the module itself.
pyh = importlib.import_module("pyhessian.hessian")

BATCH = 256
TOP1_TARGET = 1e-4
TOP5_TARGET = 1e-3
TRACE_BUDGET = 60
# The same grid for both (factors of 2 to 2.5), swept from loose to tight until the target is met.
TOLS = tuple(m * 10.0**-e for e in range(1, 8) for m in (1.0, 0.5, 0.2))

warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------------------
# Counting PyHessian's products
# ----------------------------------------------------------------------------------------------------
class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self._original = pyh.hessian_vector_product

    def __call__(self, gradsH, params, v):
        self.count += 1
        return self._original(gradsH, params, v)


COUNTER = _Counter()
pyh.hessian_vector_product = COUNTER  # the name pyhessian.hessian looks up at call time


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None  # PyHessian leaves graph-carrying gradients behind


def pyhessian_run(model: nn.Module, batch, fn: Callable) -> tuple[object, float, int]:
    _clear_grads(model)
    COUNTER.count = 0
    torch.manual_seed(0)  # PyHessian draws its start vectors from the global RNG
    start = time.perf_counter()
    h = pyh.hessian(model, F.cross_entropy, data=batch, cuda=False)
    out = fn(h)
    seconds = time.perf_counter() - start
    count = COUNTER.count
    del h
    _clear_grads(model)
    return out, seconds, count


def ours_run(model: nn.Module, batch, fn: Callable, **op_kwargs) -> tuple[object, float, int]:
    start = time.perf_counter()
    op = HessianOperator(model, F.cross_entropy, [batch], **op_kwargs)
    out = fn(op)
    return out, time.perf_counter() - start, op.num_matvecs


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------
def trained_model(name: str, epochs: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A model after a short SGD run on digits (a realistic spectrum), and a fixed batch of 256."""
    torch.manual_seed(0)
    model = build_model(name)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x_all, y_all = dm.train_set.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(x_all), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
    _clear_grads(model)
    return model.eval(), (x_all[:BATCH], y_all[:BATCH])


def reference_eigenvalues(model: nn.Module, batch, k: int = 5) -> torch.Tensor:
    """Top-k of the float64 copy of the model, Lanczos to a 1e-10 relative residual."""
    import copy

    double = copy.deepcopy(model).double()
    res = lanczos(HessianOperator(double, F.cross_entropy, [(batch[0].double(), batch[1])]), k=k, tol=1e-10,
                  max_iter=3000)
    return res.eigenvalues


def gradient_seconds(model: nn.Module, batch, reps: int = 10) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _min_time(fn: Callable, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------
def hvp_costs(model, batch, rounds: int = 15) -> list[tuple[str, float]]:
    """Median over rounds of (product time / gradient time), each product timed right after a gradient.

    Pairing makes the ratio robust to the load of a shared machine, which moves both timings together.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch

    def grad() -> None:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    op = HessianOperator(model, F.cross_entropy, [batch])
    fresh = HessianOperator(model, F.cross_entropy, [batch], linearize=False)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(0))
    block = torch.randn(op.numel, 8, generator=torch.Generator().manual_seed(1))
    _clear_grads(model)
    hess = pyh.hessian(model, F.cross_entropy, data=batch, cuda=False)
    vs = [torch.randn_like(p) for p in hess.params]
    # torch.func.linearize: trace the JVP of the gradient once, then reuse it (the alternative we rejected).
    primals, constants = op._primals(), op._constants()
    start = time.perf_counter()
    _, linear = torch.func.linearize(torch.func.grad(op._loss_fn_of(batch, constants)), primals)
    build = time.perf_counter() - start
    tangent = op._split(v)
    methods = [
        ("torch.func.linearize, per product (after tracing)", lambda: linear(tangent), 1),
        ("ours: retained graph (default), per product", lambda: op @ v, 1),
        ("ours: fresh forward-over-reverse (jvp of grad)", lambda: fresh @ v, 1),
        ("ours: fresh forward-over-reverse, vmap of 8, per column", lambda: fresh @ block, 8),
        ("PyHessian hessian_vector_product", lambda: COUNTER._original(hess.gradsH, hess.params, vs), 1),
    ]
    rows = []
    grad_times = []
    for name, fn, columns in methods:
        fn()
        ratios = []
        for _ in range(rounds):
            start = time.perf_counter()
            grad()
            g = time.perf_counter() - start
            start = time.perf_counter()
            fn()
            ratios.append((time.perf_counter() - start) / columns / g)
            grad_times.append(g)
        rows.append((name, sorted(ratios)[len(ratios) // 2]))
    _clear_grads(model)
    grad_ms = sorted(grad_times)[len(grad_times) // 2] * 1e3
    return [*rows, ("torch.func.linearize, tracing once", build * 1e3 / grad_ms),
            ("(one loss gradient, median ms)", grad_ms)]


def _first_reaching(runs: list[tuple[float, object, float, int, float]], target: float):
    for tol, _, seconds, count, err in runs:
        if err <= target:
            return tol, seconds, count, err, True
    tol, _, seconds, count, err = min(runs, key=lambda r: r[4])
    return tol, seconds, count, err, False


def top_k_case(model, batch, ref: torch.Tensor, k: int, target: float) -> dict[str, tuple]:
    def err_of(values) -> float:
        got = torch.tensor(sorted(values, reverse=True)[:k], dtype=torch.float64)
        return float(((got - ref[:k]).abs() / ref[:k].abs()).max())

    pyh_runs = []
    for tol in TOLS[3:]:  # PyHessian's relative change: from 1e-2
        out, s, c = pyhessian_run(model, batch, lambda h, tol=tol: h.eigenvalues(maxIter=1000, tol=tol, top_n=k)[0])
        pyh_runs.append((tol, out, s, c, err_of(out)))
        if pyh_runs[-1][4] <= target:
            break
    our_runs = []
    for tol in TOLS:
        out, s, c = ours_run(model, batch, lambda op, tol=tol: lanczos(op, k=k, tol=tol).eigenvalues.tolist())
        our_runs.append((tol, out, s, c, err_of(out)))
        if our_runs[-1][4] <= target:
            break
    return {"PyHessian (power iteration)": _first_reaching(pyh_runs, target),
            "ours (Lanczos)": _first_reaching(our_runs, target)}


def trace_case(model, batch, truth: float, seeds: int) -> dict[str, tuple[float, float, int]]:
    results: dict[str, list[float]] = {"PyHessian trace()": [], "ours hutchinson_trace": [], "ours hutchpp_trace": []}
    seconds: dict[str, float] = dict.fromkeys(results, 0.0)
    counts: dict[str, int] = dict.fromkeys(results, 0)
    op = HessianOperator(model, F.cross_entropy, [batch])
    for seed in range(seeds):
        torch.manual_seed(seed)
        out, s, c = pyhessian_run(model, batch, lambda h: h.trace(maxIter=TRACE_BUDGET, tol=0.0))
        results["PyHessian trace()"].append(float(sum(out) / len(out)))
        seconds["PyHessian trace()"] += s
        counts["PyHessian trace()"] += c
        for name, fn in (("ours hutchinson_trace", hutchinson_trace), ("ours hutchpp_trace", hutchpp_trace)):
            start = time.perf_counter()
            res = fn(op, TRACE_BUDGET, generator=torch.Generator().manual_seed(seed))
            seconds[name] += time.perf_counter() - start
            counts[name] += res.num_matvecs
            results[name].append(res.estimate)
    return {
        name: (math.sqrt(sum((e - truth) ** 2 for e in vals) / len(vals)) / abs(truth), seconds[name] / seeds,
               counts[name] // seeds)
        for name, vals in results.items()
    }


def density_case(model, batch, truth: float, probes: int, steps: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        _, s, c = pyhessian_run(model, batch, lambda h: h.density(iter=steps, n_v=probes))
        out["PyHessian density()"] = f"ran: {s:.2f} s, {c} products"
    except Exception as err:  # the point of the case: it fails on current torch
        out["PyHessian density()"] = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:70]}"
    sd, s, c = ours_run(model, batch, lambda op: spectral_density(op, num_probes=probes, num_steps=steps))
    n = sum(p.numel() for p in model.parameters())
    per_probe = (sd.weights * sd.nodes).sum(dim=1) * n
    stderr = float(per_probe.std()) / math.sqrt(probes)
    out["ours spectral_density"] = (f"{s:.2f} s, {c} products; its trace estimate n * (first moment) = "
                                    f"{float(per_probe.mean()):.4g} +- {stderr:.2g} (reference {truth:.4g})")
    return out


def warm_start_case(name: str, k: int, tol: float, every: int, steps: int) -> tuple[list[int], list[int]]:
    """Matvecs of cold and warm-started Lanczos along an SGD trajectory, measured every `every` steps."""
    torch.manual_seed(0)
    model = build_model(name)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x_all, y_all = dm.train_set.tensors
    batch = (x_all[:BATCH], y_all[:BATCH])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    cold, warm, prev, step = [], [], None, 0
    while step < steps:
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(x_all) - 63, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
            step += 1
            if step % every == 0:
                op = HessianOperator(model, F.cross_entropy, [batch])
                c = lanczos(op, k=k, tol=tol)
                if prev is not None:
                    cold.append(c.num_matvecs)
                    warm.append(lanczos(op, k=k, tol=tol, v0=prev).num_matvecs)
                prev = c.eigenvectors
            if step >= steps:
                break
    return cold, warm


# ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["cnn@1", "cnn@5", "mlp_wide@1"],
                        help="model names from build_model, optionally @<epochs of SGD before measuring>")
    parser.add_argument("--seeds", type=int, default=10, help="seeds of the trace case")
    parser.add_argument("--skip-warm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {BATCH} digits\n")

    for spec in args.models:
        name, _, epochs = spec.partition("@")
        model, batch = trained_model(name, int(epochs or 1))
        n = sum(p.numel() for p in model.parameters())
        print(f"## {name} after {int(epochs or 1)} epoch(s) of SGD: {n:,} parameters\n")
        ref = reference_eigenvalues(model, batch)
        print("reference top-5 (float64, residual 1e-10): " + ", ".join(f"{v:.6f}" for v in ref.tolist()) + "\n")

        print("| HVP | gradient-equivalents |\n|---|---|")
        for row, value in hvp_costs(model, batch):
            print(f"| {row} | {value:.2f} |")
        print()

        print("| case | method | setting | time (s) | HVPs | rel. error | target met | speed-up (time) "
              "| speed-up (HVPs) |\n|---|---|---|---|---|---|---|---|---|")
        for label, k, target in (("top-1 to 1e-4", 1, TOP1_TARGET), ("top-5 to 1e-3", 5, TOP5_TARGET)):
            res = top_k_case(model, batch, ref, k, target)
            pyh_s, pyh_c = res["PyHessian (power iteration)"][1:3]
            for method, (tol, s, c, err, met) in res.items():
                speed = f"{pyh_s / s:.1f}x" if method.startswith("ours") else "1.0x"
                speed_c = f"{pyh_c / c:.1f}x" if method.startswith("ours") else "1.0x"
                print(f"| {label} | {method} | tol={tol:g} | {s:.2f} | {c} | {err:.1e} | {'yes' if met else 'NO'} "
                      f"| {speed} | {speed_c} |")

        truth_res = hutchpp_trace(HessianOperator(model, F.cross_entropy, [batch]), 1200,
                                  generator=torch.Generator().manual_seed(12345))
        truth = truth_res.estimate
        for method, (rms, s, c) in trace_case(model, batch, truth, args.seeds).items():
            print(f"| trace, {TRACE_BUDGET} HVPs, {args.seeds} seeds | {method} | - | {s:.2f} | {c} | {rms:.1e} (RMS) "
                  f"| - | - | - |")
        print(f"\ntrace reference: Hutch++ with 1200 HVPs = {truth:.5g} +- {truth_res.stderr:.2g}\n")
        for method, text in density_case(model, batch, truth, probes=3, steps=60).items():
            print(f"- density, {method}: {text}")
        print()

    if not args.skip_warm:
        print("## warm start (cnn, top-2, tol 1e-3, as HessianSpectrum's defaults)\n")
        print("| cadence | measurements | cold HVPs (mean) | warm HVPs (mean) | warm / cold |\n|---|---|---|---|---|")
        for every, steps in ((17, 102), (5, 60), (1, 20)):
            cold, warm = warm_start_case("cnn", 2, 1e-3, every, steps)
            mc, mw = sum(cold) / len(cold), sum(warm) / len(warm)
            print(f"| every {every} SGD steps | {len(cold)} | {mc:.1f} | {mw:.1f} | {mw / mc:.2f} |")


if __name__ == "__main__":
    main()
