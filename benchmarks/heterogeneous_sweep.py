r"""Settings sweep for the heterogeneous benchmark: its ring re-simulated in one process, all ranks at once.

``heterogeneous.py`` runs the strategies themselves, one gloo process a rank (about a minute a method and
seed for 8 ranks on 2 cores), which is too slow to sweep budgets, steps and consensus steps. This script
runs the same iterations for every rank of the ring in one process, as dense matrix products over the
stacked flat models (``X`` is ``world x d``, row ``i`` rank ``i``'s model; ``W @ X`` is one gossip round),
the way the strategies' tests check them, with the package's data split (``DigitsDataModule``'s Dirichlet
partition and per-rank order), mixing matrix and compressors. It reproduces ``heterogeneous.py`` to within
float rounding and the order of the compressors' random draws (for the defaults, seed 0: DDP 96.7, D-PSGD
95.8 % in both; CHOCO top-1 % 85.3 here, 85.6 there).

Methods, each with SGD and heavy-ball momentum on every rank (``M = mu M + g``, ``h = x - lr M``):

- ``ddp``: the gradient averaged over ranks (``x = h``, the same on every rank);
- ``dpsgd``: ``x = W h``;
- ``choco`` / ``choco_qsgd``: CHOCO-SGD (Koloskova et al. 2019, Alg. 2) with top-``--ratio`` or QSGD (16
  levels), replicas started at the initial model, as ``GossipStrategy(algorithm="choco")``;
- ``beer``: BEER (Zhao et al. 2022, Alg. 1), compressed gradient tracking: the model and the gradient tracker
  each gossiped through the same compressor into public replicas ``H``, ``G`` (two compressed messages a
  step, top-1 %: 1/25 of D-PSGD's bytes), ``x = h + gamma (W H - H)``, ``v = v + gamma (W G - G) + g^{t+1} - g^t``,
  with the momentum applied to the tracker ``v``. It is not one of the package's strategies; it is here as
  the compressed method built for heterogeneous data, to tell whether a top-1 % method can come within a
  few points of D-PSGD at a budget where D-PSGD itself is below DDP.

Reported, per method and consensus step ``gamma``: the accuracy of the average model (mean ± standard
deviation over ``--seeds``), its difference to D-PSGD and to DDP paired by seed, the consensus distance
``sqrt(mean_i ||x_i - x_bar||^2)`` at the end, and the bytes a rank sends per step against D-PSGD's (the
compressors' payloads, to both ring neighbours).

    .venv/bin/python benchmarks/heterogeneous_sweep.py [--epochs 10] [--batch 16] [--lr 0.1] \
        [--methods ddp,dpsgd,choco,beer] [--gammas 0.1,0.2] [--seeds 0,1,2]

References:
    Koloskova, Stich & Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with Compressed
    Communication", ICML 2019, arXiv:1902.00340. Zhao, Li, Richtárik & Chi, "BEER: Fast O(1/T) Rate for
    Decentralized Nonconvex Optimization with Communication Compression", NeurIPS 2022, arXiv:2201.13320.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch
from _launch import markdown_table
from torch import Tensor
from torch.func import functional_call
from torch.utils.data import DataLoader

from lightning_optsurvey.averaging import Topology
from lightning_optsurvey.averaging.compression import QSGD, Compressor, TopK
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

METHODS = ("ddp", "dpsgd", "choco", "choco_qsgd", "beer")
COMPRESSED = ("choco", "choco_qsgd", "beer")


@dataclass(frozen=True)
class Setting:
    world: int = 8
    alpha: float = 0.1
    model: str = "mlp"
    epochs: int = 10
    batch: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    ratio: float = 0.01


@dataclass(frozen=True)
class Outcome:
    models: Tensor  # world x d: every rank's flat model at the end
    accuracy: float
    consensus_distance: float
    bytes_per_step: float
    steps: int


def _compress(compressor: Compressor, rows: Tensor, generators: list[torch.Generator]) -> tuple[Tensor, int]:
    """``C(row)`` for every rank's row, and the bytes one rank's payload takes."""
    out, nbytes = torch.empty_like(rows), 0
    for r, (row, generator) in enumerate(zip(rows, generators)):
        payload = compressor.compress(row, generator)
        out[r] = compressor.decompress(payload, row.numel(), row.dtype)
        nbytes = sum(t.numel() * t.element_size() for t in payload)
    return out, nbytes


def simulate(method: str, seed: int, gamma: float, setting: Setting) -> Outcome:
    """One run of ``method`` on every rank of the ring; the accuracy of the average model at the end."""
    torch.manual_seed(seed)
    net = ClassifierModule(setting.model).net
    names, shapes = zip(*[(name, p.shape) for name, p in net.named_parameters()])
    sizes = [math.prod(shape) for shape in shapes]
    x0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflat(row: Tensor) -> dict[str, Tensor]:
        return {name: part.view(shape) for name, part, shape in zip(names, row.split(sizes), shapes)}

    n, d = setting.world, x0.numel()
    data = DigitsDataModule(batch_size=setting.batch, partition="dirichlet", alpha=setting.alpha, seed=seed)
    data.setup("fit")
    samplers = [data.partition_sampler(r, n) for r in range(n)]
    loaders = [DataLoader(data.train_set, batch_size=setting.batch, sampler=s) for s in samplers]
    mixing = Topology("ring", n).mixing_matrix().to(x0.dtype)
    compressor = QSGD(16) if method == "choco_qsgd" else TopK(setting.ratio)
    generators = [torch.Generator().manual_seed(seed + r) for r in range(n)]

    x = x0.repeat(n, 1)
    momentum = torch.zeros_like(x)
    x_hat = x.clone()  # public model replicas (CHOCO, BEER)
    s = mixing @ x_hat  # CHOCO's running W x_hat
    tracker = g_prev = None  # BEER's v and last local gradients
    g_hat = torch.zeros_like(x)  # BEER's public tracker replicas
    step_bytes, steps = 2 * d * x0.element_size(), 0
    for epoch in range(setting.epochs):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        for batches in zip(*loaders):
            steps += 1
            grads = torch.empty_like(x)
            for r, (inputs, targets) in enumerate(batches):
                row = x[r].clone().requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(functional_call(net, unflat(row), (inputs,)), targets)
                grads[r] = torch.autograd.grad(loss, row)[0]
            if method == "ddp":
                grads[:] = grads.mean(0)
            elif method == "beer":
                tracker = grads.clone() if tracker is None else (
                    tracker + gamma * (mixing @ g_hat - g_hat) + grads - g_prev)
                g_prev = grads
                q, nbytes_g = _compress(compressor, tracker - g_hat, generators)
                g_hat = g_hat + q
                grads = tracker
            momentum = setting.momentum * momentum + grads
            half = x - setting.lr * momentum
            if method == "ddp":
                x = half
            elif method == "dpsgd":
                x = mixing @ half
            elif method == "beer":
                x = half + gamma * (mixing @ x_hat - x_hat)
                q, nbytes_x = _compress(compressor, x - x_hat, generators)
                x_hat = x_hat + q
                step_bytes = 2 * (nbytes_x + nbytes_g)
            else:
                q, nbytes = _compress(compressor, half - x_hat, generators)
                x_hat, s = x_hat + q, s + mixing @ q
                x = half + gamma * (s - x_hat)
                step_bytes = 2 * nbytes
    average = x.mean(0)
    inputs, targets = data.val_set.tensors
    with torch.no_grad():
        accuracy = float((functional_call(net, unflat(average), (inputs,)).argmax(1) == targets).float().mean())
    distance = float((x - average).square().sum(1).mean().sqrt())
    dpsgd_bytes = 2 * d * x0.element_size()
    return Outcome(x, 100 * accuracy, distance, step_bytes / dpsgd_bytes if method != "ddp" else math.nan, steps)


def _paired(values: list[float], anchor: list[float] | None) -> str:
    if anchor is None:
        return "-"
    diffs = [v - a for v, a in zip(values, anchor)]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.1f} ± {spread:.1f} ({min(diffs):+.1f} to {max(diffs):+.1f})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Setting()
    for field in ("world", "epochs", "batch"):
        parser.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
    for field in ("alpha", "lr", "momentum", "ratio"):
        parser.add_argument(f"--{field}", type=float, default=getattr(defaults, field))
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--methods", default="ddp,dpsgd,choco,beer")
    parser.add_argument("--gammas", default="0.2")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    setting = Setting(args.world, args.alpha, args.model, args.epochs, args.batch, args.lr, args.momentum, args.ratio)
    seeds = [int(s) for s in args.seeds.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    torch.set_num_threads(1)

    results: dict[tuple[str, float], list[Outcome]] = {}
    for method in methods:
        for gamma in gammas if method in COMPRESSED else [0.0]:
            results[method, gamma] = [simulate(method, seed, gamma, setting) for seed in seeds]
            print(f"{method} gamma={gamma}: " + ", ".join(f"{o.accuracy:.1f}" for o in results[method, gamma]),
                  flush=True)
    anchors = {name: [o.accuracy for o in results[name, 0.0]] if (name, 0.0) in results else None
               for name in ("dpsgd", "ddp")}
    rows = []
    for (method, gamma), outcomes in results.items():
        accuracies = [o.accuracy for o in outcomes]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        rows.append([method, f"{gamma:g}" if method in COMPRESSED else "-",
                     f"{statistics.mean(accuracies):.1f} ± {spread:.1f}",
                     _paired(accuracies, anchors["dpsgd"]), _paired(accuracies, anchors["ddp"]),
                     f"{statistics.mean(o.consensus_distance for o in outcomes):.2f}",
                     "-" if method == "ddp" else f"{outcomes[0].bytes_per_step:.3f}"])
    table = markdown_table(["method", "gamma", "accuracy %", "vs D-PSGD (paired)", "vs DDP (paired)",
                            "consensus distance", "bytes / D-PSGD"], rows)
    steps = next(iter(results.values()))[0].steps
    print(f"\n{setting}, {steps} steps, seeds {seeds}\n\n{table}")
    return table


if __name__ == "__main__":
    main()
