"""Hessian-vector products at scale: an 11M-parameter ResNet-18 on 32x32 inputs, ours against PyHessian's.

What a product costs, measured on CPU with synthetic CIFAR-shaped data (no download), a small batch and
the model in eval mode (BatchNorm on running statistics, as both tools differentiate it):

- time, in gradient-equivalents: the median over rounds of (one product / one loss gradient taken right
  before it), in process CPU time (one thread), so the ratio survives a loaded shared machine;
- peak memory relative to a gradient: each measurement runs in a fresh process, and its peak resident
  memory (``ru_maxrss``) above the resident memory just before it (model, batch and the vector to
  multiply already built) is divided by the same figure for one loss gradient.

Rows: our retained-graph product (``HessianOperator``'s default: the double-backward graph of the batch
is built on the first product and kept), its first product (building that graph included), our fresh
forward-over-reverse product (``linearize=False``, nothing kept between products), and PyHessian's
``hessian_vector_product`` on the graph its constructor builds (the first product's row includes the
constructor). Goals (issue 18): product <= 2 gradients, peak memory <= 3 gradients.

Usage:
    python benchmarks/scale.py [--batch 8] [--rounds 5] [--threads 1] [--write-readme]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import paired_ratio

warnings.filterwarnings("ignore")

GOAL_TIME, GOAL_MEMORY = 2.0, 3.0
PRODUCTS = 3  # products per memory measurement (the retained graph's cost shows on the first)


# ----------------------------------------------------------------------------------------------------
# The network: ResNet-18 as for CIFAR (3x3 stem, no max-pool), 11.2M parameters, written out here
# (torchvision is not a dependency).
# ----------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def setup(batch: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = resnet18()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics of a network that has seen data (not the init's 0/1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model.eval(), (x, y)


# ----------------------------------------------------------------------------------------------------
# The measured pieces: each returns a function doing one unit of work (after its own setup)
# ----------------------------------------------------------------------------------------------------
def _pyhessian():
    return importlib.import_module("pyhessian.hessian")  # pyhessian/__init__ rebinds `hessian`


def gradient_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    return lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params)


def direction(model: nn.Module) -> torch.Tensor:
    """The vector multiplied (made before any measurement: the input of a product, not its cost)."""
    n = sum(p.numel() for p in model.parameters())
    return torch.randn(n, generator=torch.Generator().manual_seed(2))


def ours_fn(model, batch, v, linearize: bool = True):
    from lightning_optsurvey.curvature import HessianOperator

    op = HessianOperator(model, F.cross_entropy, [batch], linearize=linearize)
    return lambda: op @ v


def pyhessian_fn(model, batch, v):
    pyh = _pyhessian()
    for p in model.parameters():
        p.grad = None
    hess = pyh.hessian(model, F.cross_entropy, data=batch, cuda=False)
    blocks = [b.view_as(p) for b, p in zip(v.split([p.numel() for p in hess.params]), hess.params)]
    return lambda: pyh.hessian_vector_product(hess.gradsH, hess.params, blocks)


PIECES = {
    "gradient": lambda m, b, v: gradient_fn(m, b),
    "ours": lambda m, b, v: ours_fn(m, b, v),
    "ours_fresh": lambda m, b, v: ours_fn(m, b, v, linearize=False),
    "pyhessian": lambda m, b, v: pyhessian_fn(m, b, v),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_memory(kind: str, batch: int) -> dict[str, float]:
    """Peak resident memory of one piece above what the process held before it (run in a fresh process)."""
    model, data = setup(batch)
    if kind == "pyhessian":
        _pyhessian()  # import outside the measured part
    else:
        import lightning_optsurvey.curvature  # noqa: F401
    v = direction(model)
    before = _rss_bytes()
    fn = PIECES[kind](model, data, v)
    for _ in range(1 if kind == "gradient" else PRODUCTS):
        out = fn()
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "peak_bytes": max(peak - before, 1)}


def timings(batch: int, rounds: int) -> dict[str, float]:
    """Gradient-equivalents of each product: median over rounds of product / gradient timed just before."""
    import lightning_optsurvey.curvature  # noqa: F401  (imported before any timing)

    _pyhessian()
    model, data = setup(batch)
    grad = gradient_fn(model, data)
    grad()
    v = direction(model)
    out: dict[str, float] = {}
    grad_times: list[float] = []
    makers = (("ours", lambda: ours_fn(model, data, v)), ("ours_fresh", lambda: ours_fn(model, data, v, False)),
              ("pyhessian", lambda: pyhessian_fn(model, data, v)))
    for name, make in makers:
        start = time.process_time()
        fn = make()
        fn()  # the first product: builds the retained graph (ours) / after the constructor's (PyHessian)
        first = time.process_time() - start
        ratio, anchors = paired_ratio(fn, grad, rounds)
        grad_times += anchors
        out[name] = ratio
        out[name + "_first"] = first / statistics.median(anchors)
        del fn
        for p in model.parameters():
            p.grad = None
    out["gradient_ms"] = statistics.median(grad_times) * 1e3
    return out


def _run_child(args: argparse.Namespace, kind: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, __file__, "--child", kind, "--batch", str(args.batch), "--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace) -> str:
    model, _ = setup(args.batch)
    n = sum(p.numel() for p in model.parameters())
    mem = {kind: _run_child(args, kind)["peak_bytes"] for kind in PIECES}
    t = _run_child(args, "timing")
    g = mem["gradient"]
    lines = [
        f"ResNet-18 (CIFAR-shaped, {n / 1e6:.1f}M parameters), batch {args.batch} of 3x32x32, eval mode, "
        f"{args.threads} thread(s); one gradient: {t['gradient_ms']:.0f} ms, peak +{g / 2**20:.0f} MiB.",
        "",
        "| product | time (gradients) | first product (gradients) | peak memory (gradients) | goal met |",
        "|---|---|---|---|---|",
    ]
    for kind, label in (("ours", "ours: retained graph (default)"),
                        ("ours_fresh", "ours: fresh forward-over-reverse (`linearize=False`)"),
                        ("pyhessian", "PyHessian `hessian_vector_product`")):
        ratio, first, memory = t[kind], t[kind + "_first"], mem[kind] / g
        met = "yes" if ratio <= GOAL_TIME and memory <= GOAL_MEMORY else "no"
        lines.append(f"| {label} | {ratio:.2f} | {first:.2f} | {memory:.2f} | {met} |")
    lines += ["", f"Goals: product <= {GOAL_TIME:g} gradients, peak memory <= {GOAL_MEMORY:g} gradients "
              f"({PRODUCTS} products per memory measurement; the first product's column includes building "
              "the retained graph, for PyHessian its constructor)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--child", choices=[*PIECES, "timing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child == "timing":
        print(json.dumps(timings(args.batch, args.rounds)))
        return
    if args.child:
        print(json.dumps(child_memory(args.child, args.batch)))
        return
    text = table(args)
    print(text)
    if args.write_readme:
        from _readme import write_block

        write_block("scale", text)


if __name__ == "__main__":
    main()
