"""One-command GPU check (issue 18): the CUDA paths of the curvature engine, the callbacks and the optimizers.

On one CUDA device, in one run (a few minutes at most):

1. Hessian-vector products, ours against PyHessian 0.1: time in gradient-equivalents (product time / time of
   one loss gradient, same run) and the relative difference of the two products;
2. Lanczos top-1 and top-5, ours against PyHessian, at the same tolerance: seconds, products, ratio,
   and the relative difference of the eigenvalues;
3. bitwise non-perturbation: a short Lightning run of a dropout MLP with and without ``HessianSpectrum``
   attached (dropout draws from the CUDA generator), comparing every parameter and buffer and the
   CUDA RNG state afterwards;
4. K-FAC, SAM and LPF-SGD iterations (closure + step) against SGD's, in float32 and in bfloat16 (model
   and inputs cast), with the loss after the timed steps (finite = the path works);
5. bfloat16 Hessian-vector products against the float32 ones (relative error).

Without CUDA it prints why and exits 0 (nothing was checked). ``--device cpu`` runs the same checks on the
CPU, with ``--quick`` sizes, to exercise the script's logic where no GPU is lent.

Usage::

    python benchmarks/gpu_check.py                 # CUDA, or a clean skip
    python benchmarks/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def _trained(name: str, device: torch.device, batch: int, steps: int) -> tuple[nn.Module, tuple]:
    """A model after a few SGD steps on digits (a realistic spectrum) and a fixed batch, on ``device``."""
    from lightning_optsurvey.tasks import DigitsDataModule, build_model

    torch.manual_seed(0)
    model = build_model(name).to(device)
    data = DigitsDataModule(batch_size=64)
    data.setup()
    x_all, y_all = (t.to(device) for t in data.train_set.tensors)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(steps):
        idx = slice((64 * i) % (len(x_all) - 64), (64 * i) % (len(x_all) - 64) + 64)
        opt.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval(), (x_all[:batch], y_all[:batch])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30))


def hvp_and_lanczos(model: nn.Module, batch: tuple, device: torch.device, reps: int, tol: float) -> None:
    from lightning_optsurvey.curvature import HessianOperator, lanczos

    pyh = importlib.import_module("pyhessian.hessian")
    cuda = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    grad_s = _median_time(lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params), device, reps)
    op = HessianOperator(model, F.cross_entropy, [batch])
    gen = torch.Generator(device=device).manual_seed(0)
    v = torch.randn(op.numel, generator=gen, device=device)
    ours_hv = op @ v
    ours_s = _median_time(lambda: op @ v, device, reps)
    h = pyh.hessian(model, F.cross_entropy, data=batch, cuda=cuda)
    pieces = list(torch.split(v, [p.numel() for p in h.params]))
    vs = [piece.view_as(p) for piece, p in zip(pieces, h.params, strict=True)]
    theirs_hv = torch.cat([t.reshape(-1) for t in pyh.hessian_vector_product(h.gradsH, h.params, vs)])
    theirs_s = _median_time(lambda: pyh.hessian_vector_product(h.gradsH, h.params, vs), device, reps)
    _table(f"HVP on {device.type} ({op.numel:,} parameters, batch {len(x)}; median of {reps})",
           ["method", "ms", "gradient-equivalents", "/ PyHessian", "rel. diff vs PyHessian"],
           [["gradient", f"{1e3 * grad_s:.2f}", "1.00", "-", "-"],
            ["ours", f"{1e3 * ours_s:.2f}", f"{ours_s / grad_s:.2f}", f"{ours_s / theirs_s:.2f}",
             f"{_rel(ours_hv, theirs_hv):.1e}"],
            ["PyHessian", f"{1e3 * theirs_s:.2f}", f"{theirs_s / grad_s:.2f}", "1.00", "-"]])
    rows = []
    for k in (1, 5):
        _sync(device)
        start = time.perf_counter()
        res = lanczos(HessianOperator(model, F.cross_entropy, [batch]), k=k, tol=tol)
        _sync(device)
        ours_t = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(0)  # PyHessian draws its start vectors from the global RNG
        start = time.perf_counter()
        hh = pyh.hessian(model, F.cross_entropy, data=batch, cuda=cuda)
        theirs_vals, _ = hh.eigenvalues(maxIter=300, tol=tol, top_n=k)
        _sync(device)
        theirs_t = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        ours_vals = torch.as_tensor(res.eigenvalues[:k], dtype=torch.float64).cpu()
        theirs = torch.as_tensor(sorted(theirs_vals, reverse=True), dtype=torch.float64)
        rows.append([f"top-{k}", f"{ours_t:.3f}", str(res.num_matvecs), f"{theirs_t:.3f}",
                     f"{theirs_t / ours_t:.2f}", f"{float(((ours_vals - theirs).abs() / theirs.abs()).max()):.1e}"])
    _table(f"Lanczos on {device.type} (tol {tol:g})",
           ["case", "ours s", "ours products", "PyHessian s", "PyHessian / ours", "max rel. diff of eigenvalues"],
           rows)


def non_perturbation(device: torch.device, steps: int) -> bool:
    """Train with and without HessianSpectrum; True when every tensor and the RNG states are bitwise equal."""
    import lightning.pytorch as pl

    from lightning_optsurvey.callbacks import HessianSpectrum, TraceConfig
    from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

    def fit(callbacks: list) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        pl.seed_everything(0, verbose=False)
        module = ClassifierModule("mlp_dropout", "sgd")
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps,
            callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, deterministic=True, limit_val_batches=0,
        )
        trainer.fit(module, DigitsDataModule(batch_size=64))
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return ({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, torch.get_rng_state(),
                cuda_rng)

    spectrum = HessianSpectrum(top_k=2, trace=TraceConfig(matvecs=12), every_n_steps=max(1, steps // 3))
    with_cb = fit([spectrum])
    without = fit([])
    same_params = all(torch.equal(a, b) for a, b in zip(with_cb[0].values(), without[0].values(), strict=True))
    same_cpu_rng = torch.equal(with_cb[1], without[1])
    same_cuda_rng = with_cb[2] is None or torch.equal(with_cb[2], without[2])
    measured = len(spectrum.history)
    _table(f"Non-perturbation on {device.type} (mlp_dropout, {steps} SGD steps, HessianSpectrum "
           f"top-2 + trace measured {measured} times)",
           ["parameters and buffers bitwise equal", "CPU RNG equal", "CUDA RNG equal"],
           [[str(same_params), str(same_cpu_rng), "n/a" if with_cb[2] is None else str(same_cuda_rng)]])
    return same_params and same_cpu_rng and same_cuda_rng and measured > 0


def optimizer_steps(device: torch.device, model_name: str, steps: int, reps: int) -> bool:
    """Iteration time of K-FAC, SAM and LPF-SGD relative to SGD, in float32 and bfloat16."""
    from lightning_optsurvey.optim import create_optimizer, get_spec
    from lightning_optsurvey.tasks import DigitsDataModule, build_model

    data = DigitsDataModule(batch_size=64)
    data.setup()
    x_all, y_all = (t.to(device) for t in data.train_set.tensors)
    batches = [(x_all[i:i + 64], y_all[i:i + 64]) for i in range(0, len(x_all) - 64, 64)]
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        rows, base = [], None
        for name in ("sgd", "kfac", "sam", "lpf_sgd"):
            torch.manual_seed(0)
            model = build_model(model_name).to(device=device, dtype=dtype)
            spec = get_spec(name)
            kwargs = {"model": model} if spec.needs_model else {}
            opt = create_optimizer(name, model.parameters(), **kwargs)
            counter = {"i": 0}
            last = {}

            def iteration(opt=opt, model=model, counter=counter, last=last, dtype=dtype) -> None:
                x, y = batches[counter["i"] % len(batches)]
                counter["i"] += 1
                sample = getattr(opt, "sample_fisher", None)

                def closure():
                    opt.zero_grad()
                    logits = model(x.to(dtype))
                    if sample is not None:
                        sample(logits, "categorical")
                    loss = F.cross_entropy(logits.float(), y)
                    loss.backward()
                    return loss

                last["loss"] = opt.step(closure)

            def block(iteration=iteration) -> None:
                for _ in range(steps):
                    iteration()

            seconds = _median_time(block, device, reps) / steps
            loss = float(last["loss"])
            base = seconds if name == "sgd" else base
            finite = bool(torch.isfinite(torch.tensor(loss)))
            ok = ok and finite
            rows.append([name, f"{1e3 * seconds:.2f}", f"{seconds / base:.2f}", f"{loss:.4f}", str(finite)])
        _table(f"Optimizer iterations on {device.type}, {model_name}, {str(dtype).removeprefix('torch.')} "
               f"(median of {reps} x {steps} steps)",
               ["optimizer", "iteration ms", "/ SGD", "loss after", "finite"], rows)
    return ok


def bf16_hvp(model: nn.Module, batch: tuple, device: torch.device) -> None:
    from lightning_optsurvey.curvature import HessianOperator

    x, y = batch
    low = copy.deepcopy(model).to(torch.bfloat16)
    op32 = HessianOperator(model, F.cross_entropy, [batch])
    op16 = HessianOperator(low, lambda out, t: F.cross_entropy(out.float(), t), [(x.to(torch.bfloat16), y)])
    v = torch.randn(op32.numel, generator=torch.Generator(device=device).manual_seed(1), device=device)
    hv32 = op32 @ v
    hv16 = (op16 @ v.to(torch.bfloat16)).float()
    _table(f"bfloat16 HVP on {device.type}", ["relative error vs float32", "bf16 unit roundoff"],
           [[f"{_rel(hv16, hv32):.1e}", f"{torch.finfo(torch.bfloat16).eps:.1e}"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (skipped cleanly when unavailable) or cpu (the same checks, for testing)")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (for --device cpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; nothing was checked (skipped). "
              "Run with --device cpu --quick to exercise the same checks on the CPU.")
        return 0
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    name = "mlp" if args.quick else "cnn"
    reps, steps = (3, 3) if args.quick else (10, 20)
    print(f"gpu_check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch "
          f"{torch.__version__}, {'quick' if args.quick else 'full'} sizes")
    model, batch = _trained(name, device, batch=64 if args.quick else 256, steps=20 if args.quick else 200)
    hvp_and_lanczos(model, batch, device, reps, tol=1e-3 if args.quick else 1e-4)
    bf16_hvp(model, batch, device)
    same = non_perturbation(device, steps=6 if args.quick else 30)
    finite = optimizer_steps(device, "mlp" if args.quick else "mlp_wide", steps, reps)
    print(f"\ngpu_check: {time.perf_counter() - start:.1f} s; non-perturbation {'ok' if same else 'FAILED'}; "
          f"optimizer paths {'ok' if finite else 'FAILED'}")
    return 0 if same and finite else 1


if __name__ == "__main__":
    sys.exit(main())
