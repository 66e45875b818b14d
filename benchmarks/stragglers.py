"""Stragglers: wall time to a target accuracy on digits with one rank 3x slower per step, 4 gloo processes.

The asynchronous methods exist for clusters whose workers run at different speeds. This benchmark makes
rank 3 three times slower per step with :class:`~lightning_optsurvey.callbacks.Straggler` (every rank
sleeps ``--base-delay`` seconds per step to stand in for compute, rank 3 three times that plus twice its
measured step time, so the ratio holds on a loaded machine) and trains the digits MLP with SGD (lr 0.05,
momentum 0.9, batch 32, ``--steps`` steps on every rank) under:

- ``ddp`` (Lightning's, the anchor), ``easgd`` (synchronous, alpha = 0.2, tau = 4), ``easgd_async``
  (same alpha and tau), ``eamsgd`` (asynchronous, Nesterov momentum 0.9), ``lsgd`` and ``lsgd_async``
  (lambda = 0.1, tau = 4), ``gossip_one_peer``;

each with the straggler and without it, all in one process group, one after another. Every rank draws
its own batches with replacement from the training set (one long epoch, so no epoch boundary
synchronizes the ranks). Rank 0 (a fast rank) evaluates the model the method outputs every
``--eval-every`` of its steps, without collectives: the center (EASGD, EAMSGD), the leader (asynchronous
LSGD), the model (DDP) or rank 0's own model (gossip, LSGD). Measured: the wall time from the start of
training until that accuracy first reaches the target (DDP's final accuracy without straggler minus
one point), and the final accuracy of the model a checkpoint holds (after every rank finished).

    .venv/bin/python benchmarks/stragglers.py [--steps 100] [--base-delay 0.05] [--eval-every 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _launch import wait_for_ranks

WORLD = 4
SLOW_RANK = 3
SLOWDOWN = 3.0
METHODS: tuple[tuple[str, str], ...] = (
    ("ddp", "Lightning DDP"),
    ("easgd", "alpha=0.2, tau=4"),
    ("easgd_async", "alpha=0.2, tau=4"),
    ("eamsgd", "alpha=0.2, tau=4, Nesterov 0.9"),
    ("lsgd", "lambda=0.1, tau=4"),
    ("lsgd_async", "lambda=0.1, tau=4"),
    ("gossip_one_peer", "one-peer exponential"),
)
SCENARIOS = ("straggler", "none")


# --------------------------------------------------------------------------------------------------
# Worker (one rank)
# --------------------------------------------------------------------------------------------------
def _strategy(name: str) -> Any:
    from lightning_optsurvey.strategies import (
        AsyncEASGDStrategy,
        AsyncLSGDStrategy,
        EASGDStrategy,
        GossipStrategy,
        LSGDStrategy,
    )

    return {
        "ddp": lambda: "ddp",
        "easgd": lambda: EASGDStrategy(moving_rate=0.2, sync_every=4),
        "easgd_async": lambda: AsyncEASGDStrategy(moving_rate=0.2, sync_every=4),
        "eamsgd": lambda: AsyncEASGDStrategy(moving_rate=0.2, sync_every=4, momentum=0.9),
        "lsgd": lambda: LSGDStrategy(pull_strength=0.1, sync_every=4),
        "lsgd_async": lambda: AsyncLSGDStrategy(pull_strength=0.1, sync_every=4),
        "gossip_one_peer": lambda: GossipStrategy("one_peer_exponential"),
    }[name]()


def _worker(out: Path, steps: int, base_delay: float, eval_every: int, methods: list[str]) -> None:
    import torch
    from lightning.pytorch import Callback, LightningModule, Trainer
    from torch.utils.data import DataLoader, RandomSampler

    from lightning_optsurvey.callbacks import Straggler
    from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rank = int(os.environ["LOCAL_RANK"])
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    x_val, y_val = data.val_set.tensors

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        net = ClassifierModule("mlp").net
        net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
        net.eval()
        with torch.no_grad():
            return float((net(x_val).argmax(1) == y_val).float().mean())

    def output_model(trainer: Trainer, module: LightningModule) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        center = getattr(trainer.strategy, "center_tensors", None)
        if center is not None:  # EASGD's center (replicated), or the asynchronous methods' center on rank 0
            state.update({k: v.clone() for k, v in center().items()})
        return state

    class Probe(Callback):
        def __init__(self) -> None:
            self.curve: list[tuple[float, float, int]] = []
            self.start = 0.0
            self.train_seconds = 0.0

        def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args: Any) -> None:
            step = trainer.global_step
            if rank == 0 and step % eval_every == 0:
                self.curve.append((time.perf_counter() - self.start, accuracy(output_model(trainer, module)), step))

        def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
            self.train_seconds = time.perf_counter() - self.start

    results = []
    runs = [("warm-up", "ddp")] + [(scenario, name) for scenario in SCENARIOS for name, _ in METHODS
                                   if name in methods]
    for scenario, name in runs:
        torch.manual_seed(0)
        module = ClassifierModule("mlp", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
        num_steps = 10 if scenario == "warm-up" else steps
        sampler = RandomSampler(data.train_set, replacement=True, num_samples=num_steps * 32,
                                generator=torch.Generator().manual_seed(1000 + rank))
        loader = DataLoader(data.train_set, batch_size=32, sampler=sampler)
        delays = {r: base_delay for r in range(WORLD)}
        slowdown = {}
        if scenario == "straggler":
            delays[SLOW_RANK], slowdown[SLOW_RANK] = SLOWDOWN * base_delay, SLOWDOWN
        probe = Probe()
        trainer = Trainer(
            accelerator="cpu", devices=WORLD, strategy=_strategy(name), max_epochs=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
            callbacks=[probe, Straggler(delays, slowdown=slowdown)],
        )
        start = time.perf_counter()
        trainer.fit(module, loader)
        fit_seconds = time.perf_counter() - start
        final = accuracy(trainer.strategy.lightning_module_state_dict())  # collective for gossip / LSGD
        if rank == 0 and scenario != "warm-up":
            results.append(dict(method=name, scenario=scenario, curve=probe.curve, final=final,
                                fit_seconds=fit_seconds, rank0_seconds=probe.train_seconds))
            print(f"{scenario:9s} {name:16s} final {final:.4f} fit {fit_seconds:6.1f}s", flush=True)
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------------
# Parent: launch, then print the table
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", str(out), "--steps", str(args.steps),
               "--base-delay", str(args.base_delay), "--eval-every", str(args.eval_every),
               "--methods", ",".join(args.methods)]
        log = open(out / f"rank{rank}.log", "w")  # closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return wait_for_ranks(procs, out, WORLD, args.timeout)


def time_to(curve: list[list[float]], target: float) -> float:
    """First time (seconds since train start) the evaluated accuracy reached ``target``; inf if never."""
    return next((t for t, acc, _ in curve if acc >= target), float("inf"))


def table(results: list[dict[str, Any]]) -> str:
    by = {(r["scenario"], r["method"]): r for r in results}
    target = by[("none", "ddp")]["final"] - 0.01
    lines = [f"Target: DDP's final validation accuracy without straggler minus 1 point = {target:.4f}.", "",
             "| scenario | method | config | to target (s) | / DDP | final acc | vs DDP (pts) | fit (s) | / DDP |",
             "|---|---|---|---|---|---|---|---|---|"]
    configs = dict(METHODS)
    for scenario in SCENARIOS:
        ddp = by[(scenario, "ddp")]
        ddp_time = time_to(ddp["curve"], target)
        for name, _ in METHODS:
            if (scenario, name) not in by:
                continue
            r = by[(scenario, name)]
            t = time_to(r["curve"], target)
            lines.append(
                f"| {scenario} | `{name}` | {configs[name]} | {t:.1f} | {t / ddp_time:.2f} | {r['final']:.4f} | "
                f"{100 * (r['final'] - ddp['final']):+.1f} | {r['fit_seconds']:.1f} | "
                f"{r['fit_seconds'] / ddp['fit_seconds']:.2f} |"
            )
    lines.append("")
    for scenario in SCENARIOS:
        sync = time_to(by[(scenario, "easgd")]["curve"], target)
        asyn = time_to(by[(scenario, "easgd_async")]["curve"], target)
        lines.append(f"- {scenario}: asynchronous / synchronous EASGD time to target = {asyn / sync:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps on every rank")
    parser.add_argument("--base-delay", type=float, default=0.05, help="seconds every rank sleeps per step")
    parser.add_argument("--eval-every", type=int, default=5, help="rank 0 evaluates every this many steps")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--methods", type=lambda v: v.split(","), default=[m for m, _ in METHODS],
                        help="comma-separated subset (ddp and easgd are needed for the ratios)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.steps, args.base_delay, args.eval_every, args.methods)
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        results = _launch(Path(tmp), args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    cores = os.cpu_count() or 1
    print(f"{WORLD} gloo processes on {cores} CPU cores; rank {SLOW_RANK} {SLOWDOWN:g}x slower per step in the "
          f"straggler scenario; {args.steps} steps per rank, base delay {args.base_delay:g} s; "
          f"total {time.perf_counter() - start:.0f} s\n")
    print(table(results))


if __name__ == "__main__":
    main()
