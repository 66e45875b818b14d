"""Per-step cost of every registered optimizer, as a ratio to SGD, on the digits CNN and a ~1.2M MLP.

One "iteration" is what a training loop pays per optimizer step: ``opt.step(closure)`` where the closure
zeroes the gradients and runs forward + backward (with ``create_graph`` when the method needs it), so
methods that evaluate the closure several times are charged for every evaluation. For the closure-free
methods the optimizer's ``step`` alone (gradients already computed) is also timed, against
``torch.optim.Adam(foreach=True)``. K-FAC's inverse refreshes (``inv_every=100``) and Shampoo's roots
(``precondition_every=100``) are amortized exactly when ``--steps`` is a multiple of 100 (the summary
lines say when it is not). Where
pytorch-optimizer has a class we replaced, it is timed side by side (its SAM needs the first gradient
computed before ``step``: charged as one extra closure).

Batches cycle through the digits training set (a fixed batch would be fitted to zero loss, and the
subnormal gradients that follow slow CPU matrix products down by 10-100x); subnormals are flushed to
zero for the same reason. SVRG gets a full-gradient snapshot before timing, so its second evaluation
runs. The machine may be shared: every figure is the median over ``--repeats`` blocks of ``--steps``
steps, with all optimizers interleaved within each repeat so that load changes hit them alike.

Usage::

    python benchmarks/optimizer_step.py [--models cnn,mlp_wide] [--steps 20] [--repeats 5] [--batch 64]
        [--only sgd,kfac,shampoo] [--write-readme]

``--write-readme`` puts the tables into README.md's ``bench:optimizer-step`` block (``_readme.write_block``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import pytorch_optimizer as po
import torch
import torch.nn.functional as F
from torch import nn

from lightning_optsurvey.optim import SVRG, KFACConfig, available_optimizers, create_optimizer, get_spec
from lightning_optsurvey.tasks import DigitsDataModule, build_model

Builder = Callable[[nn.Module], torch.optim.Optimizer]


def _builders() -> dict[str, tuple[Builder, bool]]:
    """name -> (builder, create_graph)."""
    out: dict[str, tuple[Builder, bool]] = {}
    for name in available_optimizers():
        spec = get_spec(name)
        out[name] = (lambda m, name=name: create_optimizer(name, m.parameters(), model=m), spec.create_graph)
    out["adam_foreach"] = (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True), False)
    # K-FAC before issue 18's second round (inverses every 10 steps) and kfac-pytorch's CIFAR cadence.
    out["kfac_inv10"] = (lambda m: create_optimizer("kfac", m.parameters(), model=m, inv_every=10), False)
    out["kfac_stat1"] = (lambda m: create_optimizer("kfac", m.parameters(), model=m, stat_every=1,
                                                    inv_every=10), False)
    # Shampoo before issue 18's amortization (no blocks, roots every 10 steps, statistics every step).
    out["shampoo_unblocked"] = (lambda m: create_optimizer("shampoo", m.parameters(), block_size=1 << 30,
                                                           precondition_every=10, statistics_every=1), False)
    out["kfac_mc"] = (lambda m: create_optimizer("kfac", m.parameters(), model=m, fisher="mc"), False)
    out["po:sam"] = (lambda m: po.SAM(m.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9), False)
    out["po:shampoo"] = (lambda m: po.Shampoo(m.parameters(), lr=0.05, momentum=0.9,
                                              preconditioning_compute_steps=10), False)
    # The registry's pytorch-optimizer entries are torch-conforming subclasses (optim/_external.py); the raw
    # library classes with the same defaults show what the conformance (gradient copies) costs.
    for name, cls in (("adabelief", po.AdaBelief), ("adabound", po.AdaBound), ("yogi", po.Yogi),
                      ("lars", po.LARS), ("lamb", po.Lamb), ("adahessian", po.AdaHessian)):
        defaults = dict(get_spec(name).defaults)
        out[f"po:{name}"] = (lambda m, cls=cls, kw=defaults: cls(m.parameters(), **kw), get_spec(name).create_graph)
    out["po:lookahead"] = (lambda m: po.Lookahead(torch.optim.Adam(m.parameters(), lr=1e-2), k=5, alpha=0.5),
                           False)
    return out


class _Batches:
    """Endless digits training batches of a fixed size, the same sequence for every optimizer."""

    def __init__(self, batch: int) -> None:
        data = DigitsDataModule(batch_size=batch, seed=0)
        data.setup()
        x, y = data.train_set.tensors
        count = len(x) // batch
        self.batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(count)]
        self.full = (x, y)

    def cycle(self):
        while True:
            yield from self.batches


def _iteration(name: str, opt, model, x, y, create_graph: bool) -> None:
    sample_fisher = getattr(opt, "sample_fisher", None)

    def closure():
        opt.zero_grad()
        logits = model(x)
        if sample_fisher is not None:
            sample_fisher(logits, "categorical")
        loss = F.cross_entropy(logits, y)
        loss.backward(create_graph=create_graph)
        return loss

    if name == "po:sam":
        closure()  # its step expects the gradient at w to be there already
    opt.step(closure)


def _time_block(fn: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def run(model_name: str, steps: int, repeats: int, batch: int, names: list[str] | None) -> list[str]:
    data = _Batches(batch)
    builders = _builders()
    if names:
        builders = {k: v for k, v in builders.items() if k in names or k in ("sgd", "adam_foreach")}
    iteration: dict[str, list[float]] = {k: [] for k in builders}
    step_only: dict[str, list[float]] = {k: [] for k in builders}
    setups = {}
    for name, (build, create_graph) in builders.items():
        torch.manual_seed(0)
        model = build_model(model_name)
        opt = build(model)
        stream = data.cycle()
        if isinstance(opt, SVRG):
            opt.zero_grad()
            F.cross_entropy(model(data.full[0]), data.full[1]).backward()
            opt.snapshot()
        for _ in range(2):  # warm-up: lazy state, first factor inversions
            _iteration(name, opt, model, *next(stream), create_graph)
        setups[name] = (model, opt, create_graph, stream)
    x, y = data.batches[0]
    failed: dict[str, str] = {}
    for _ in range(repeats):
        for name, (model, opt, create_graph, stream) in setups.items():
            def one(name=name, opt=opt, model=model, create_graph=create_graph, stream=stream):
                _iteration(name, opt, model, *next(stream), create_graph)

            if name in failed:
                continue
            try:
                iteration[name].append(_time_block(one, steps))
            except (RuntimeError, ArithmeticError) as err:  # e.g. a diverged run whose SVD meets NaNs
                failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
                continue
            spec_closure = name.startswith("po:") or (name in available_optimizers()
                                                      and get_spec(name).needs_closure)
            if not spec_closure and not create_graph and not name.startswith("kfac"):
                # Stepping repeatedly on one stale gradient walks off in one direction: undo it after.
                saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                step_only[name].append(_time_block(opt.step, steps))
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
    med = {k: statistics.median(v) for k, v in iteration.items() if v and k not in failed}
    med_step = {k: statistics.median(v) for k, v in step_only.items() if v}
    sgd, adam = med["sgd"], med_step.get("adam_foreach")
    params = sum(p.numel() for p in build_model(model_name).parameters())
    lines = [
        f"\n### {model_name} ({params:,} parameters, batch {batch}; median of {repeats} x {steps} steps)\n",
        "| optimizer | source | evals/step | iteration ms | / SGD iteration | step-only ms | step / Adam(foreach) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(med, key=lambda k: med[k]):
        source = "pytorch-optimizer" if name.startswith("po:") else _source(name)
        evals = _evals(name)
        step_ms = f"{1e3 * med_step[name]:.3f}" if name in med_step else "-"
        ratio = f"{med_step[name] / adam:.2f}" if name in med_step and adam else "-"
        lines.append(f"| {name} | {source} | {evals} | {1e3 * med[name]:.2f} | {med[name] / sgd:.2f} "
                     f"| {step_ms} | {ratio} |")
    for name, why in failed.items():
        lines.append(f"| {name} | {'pytorch-optimizer' if name.startswith('po:') else _source(name)} | - "
                     f"| failed: {why} | - | - | - |")
    kfac = med.get("kfac")
    if kfac:
        cadence = KFACConfig()
        lines.append(f"\n- K-FAC (defaults: inv_every={cadence.inv_every}, stat_every={cadence.stat_every}) "
                     f"amortized iteration / (SGD step + forward + backward) = {kfac / sgd:.2f} (target <= 2)"
                     + ("" if steps % cadence.inv_every == 0 else f"; NOT amortized: --steps {steps} is not a "
                        f"multiple of {cadence.inv_every}"))
    floor = _kfac_floor(build_model(model_name), batch)
    if kfac and floor:
        sgd_mac, per_step, amortized = floor
        lines.append(f"- K-FAC's floor in multiply-adds: SGD's forward + backward {sgd_mac / 1e6:.0f}M; K-FAC adds "
                     f"{per_step / 1e6:.0f}M of preconditioning products every step ({per_step / sgd_mac:.2f}x SGD's) "
                     f"and {amortized / 1e6:.0f}M of amortized statistics and inverses, so at SGD's flop rate "
                     f"K-FAC >= {1 + per_step / sgd_mac:.2f}x without statistics and inverses and "
                     f"{1 + (per_step + amortized) / sgd_mac:.2f}x with them")
    if med.get("kfac_inv10"):
        lines.append(f"- K-FAC with inverses every 10 steps (inv_every=10, the previous default): "
                     f"{med['kfac_inv10'] / sgd:.2f}")
    if med.get("shampoo"):
        every = get_spec("shampoo").defaults["precondition_every"]
        lines.append(f"- Shampoo (registry defaults: block_size=128, precondition_every={every}, statistics_every=10) "
                     f"iteration / SGD iteration = {med['shampoo'] / sgd:.2f} (target <= 3)"
                     + ("" if steps % every == 0 else f"; NOT amortized: --steps {steps} is not a multiple of "
                        f"{every}, so some blocks miss the root refresh"))
    if med.get("shampoo_unblocked"):
        lines.append(f"- Shampoo unblocked, roots every 10 steps, statistics every step (the pre-issue-18 "
                     f"default): {med['shampoo_unblocked'] / sgd:.2f}")
    if med.get("kfac_stat1"):
        lines.append(f"- K-FAC with statistics every step and inverses every 10 (kfac-pytorch's CIFAR cadence): "
                     f"{med['kfac_stat1'] / sgd:.2f}")
    return lines


def _kfac_floor(model: nn.Module, batch: int) -> tuple[float, float, float] | None:
    """K-FAC's multiply-adds per step against SGD's forward + backward, for a model of ``Linear`` layers.

    Returns ``(sgd, per_step, amortized)`` in multiply-adds: SGD's forward and backward (no input
    gradient for the first layer), K-FAC's preconditioning products of every step (a layer with
    ``2 B < min(in, out)`` through its batch: ``G^-1 go^T``, ``[X, 1] A^-1`` and their product; otherwise
    ``G^-1 ([gW, gb] A^-1)``), and the default cadence's statistics and inverses (Cholesky and inverse of
    an ``n x n`` factor: ``n^3``) per step. Checks and elementwise passes are not counted. ``None`` if the
    model has layers other than ``Linear`` with weights.
    """
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if not layers or not all(isinstance(m, nn.Linear) for m in layers):
        return None
    cadence = KFACConfig()
    sgd = per_step = amortized = 0.0
    for i, m in enumerate(layers):
        d_in, d_out, d_a = m.in_features, m.out_features, m.in_features + (m.bias is not None)
        sgd += batch * d_in * d_out * (2 if i == 0 else 3)
        if 2 * batch < min(d_in, d_out):
            per_step += d_out * d_out * batch + batch * d_in * d_a + d_out * batch * d_in
        else:
            per_step += d_out * d_in * d_a + d_out * d_out * d_a
        amortized += batch * (d_a * d_a + d_out * d_out) / cadence.stat_every
        amortized += (d_a**3 + d_out**3) / cadence.inv_every
    return sgd, per_step, amortized


def _source(name: str) -> str:
    if name == "adam_foreach":
        return "torch"
    if name.startswith(("kfac", "shampoo_")):
        return "ours"
    factory = get_spec(name).factory
    factory = getattr(factory, "func", factory)  # functools.partial
    module = getattr(factory, "__module__", "") or ""
    if name in ("adahessian", "sophiah", "adabound", "adabelief", "yogi", "lars", "lamb"):
        return "pytorch-optimizer (conforming subclass)"
    return "ours" if "lightning_optsurvey.optim" in module and "_torch" not in module else "torch"


def _evals(name: str) -> str:
    if name.startswith("po:sam"):
        return "2"
    if name.startswith(("po:", "adam_foreach", "kfac", "shampoo_")):
        return "1"
    spec = get_spec(name)
    if not spec.needs_closure:
        return "1"
    return {"sam": "2", "asam": "2", "gsam": "2", "svrg": "2",
            "entropy_sgd": str(spec.defaults.get("inner_steps")),
            "lpf_sgd": str(spec.defaults.get("num_samples")), "lbfgs": "<= 5"}.get(name, "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp_wide")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated optimizer names (sgd and Adam always)")
    parser.add_argument("--write-readme", action="store_true", help="write the tables into README.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    names = [n for n in args.only.split(",") if n] or None
    tables = []
    for model_name in args.models.split(","):
        for line in run(model_name, args.steps, args.repeats, args.batch, names):
            print(line, flush=True)
            tables.append(line)
    if args.write_readme:
        from _readme import write_block  # benchmarks/ is the script's directory

        write_block("optimizer-step", "\n".join(tables).strip())


if __name__ == "__main__":
    main()
