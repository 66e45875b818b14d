"""Gossip against DDP on 4 CPU processes (gloo): step time, bytes per rank per step, accuracy; plus a model.

Measured: the digits CNN (~49k parameters) and ``mlp_wide`` (~1.2M parameters), trained for
``--epochs`` epochs with SGD (momentum 0.9) on 4 gloo processes, under Lightning's ``"ddp"`` (the
anchor, measured side by side in the same process group) and ``gossip_ring`` / ``gossip_one_peer``,
each with and without ``overlap``. Step time is the median wall time from ``on_train_batch_start`` to
``on_train_batch_end`` on rank 0 after the first epoch. Bytes are counted per rank per step: by the
strategy's ``CommCounter`` for gossip, and for DDP by a gradient-bucket comm hook that counts each
bucket as a ring all-reduce (``2 (N-1)/N`` times its size). DDP always overlaps its bucketed
all-reduce with the backward pass; it has no non-overlapped mode. Accuracy: ``val/acc`` as logged
(each rank's own model on its shard, summed over ranks) and of the consensus (average) model.

Modelled: the alpha-beta cost of one step's communication, ring all-reduce
``2 (N-1) alpha + 2 (N-1)/N * B * beta`` against one-peer gossip ``alpha + B * beta`` (one send and
one receive, full duplex), for B = 4 bytes x parameters.

    .venv/bin/python benchmarks/gossip_vs_ddp.py [--epochs 10] [--batch-size 32] [--alpha 5e-6]
        [--bandwidth-gbps 100]

The 4 ranks run as 4 processes on however many cores the machine has; on a 2-core machine they are
oversubscribed (2 processes per core), which the output states.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _launch import free_port, wait_for_ranks
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.strategies import CommCounter, GossipStrategy, LocalModelStrategy
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

WORLD = 4
STRATEGIES = (
    ("ddp", None),
    ("gossip_ring", False),
    ("gossip_ring", True),
    ("gossip_one_peer", False),
    ("gossip_one_peer", True),
)
MODELS = ("cnn", "mlp_wide")


# --------------------------------------------------------------------------------------------------
# Worker (one rank)
# --------------------------------------------------------------------------------------------------
class CountingDDP(DDPStrategy):
    """Lightning's DDP with a bucket hook that counts ring all-reduce bytes (also on gloo)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.comm = CommCounter()

    def _register_ddp_hooks(self) -> None:
        def hook(counter, bucket):  # DDP rejects non-GradBucket annotations; leave them off
            buffer = bucket.buffer()
            counter.add_all_reduce(buffer.numel() * buffer.element_size(), dist.get_world_size())
            return default_hooks.allreduce_hook(None, bucket)

        self.model.register_comm_hook(self.comm, hook)


class StepTimer(Callback):
    """Wall time of each training step after the first epoch, and the bytes each step sent."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.bytes: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if not isinstance(trainer.strategy, LocalModelStrategy):
            trainer.strategy.comm.start_step()  # ours restart their counter themselves
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.bytes.append(trainer.strategy.comm.step_bytes)  # every step: warm-ups cost bytes too
        if trainer.current_epoch > 0:
            self.times.append(time.perf_counter() - self._start)


def val_accuracy(model_name: str, state: dict[str, torch.Tensor], data: DigitsDataModule) -> float:
    """Validation accuracy of the ``ClassifierModule`` state ``state`` (e.g. a consensus model)."""
    net = ClassifierModule(model_name).net
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    net.eval()
    x, y = data.val_set.tensors
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def rotated_runs(configs: list[Any], repeats: int, warmup: Any) -> list[tuple[int, Any]]:
    """A warm-up fit (repeat -1), then ``repeats`` passes over ``configs``, each rotated by one more.

    The machine is shared: rotating spreads drift in its load over all configurations instead of
    biasing one.
    """
    runs: list[tuple[int, Any]] = [(-1, warmup)]
    for rep in range(repeats):
        shift = rep % len(configs)
        runs += [(rep, c) for c in configs[shift:] + configs[:shift]]
    return runs


def fit_timed(
    strategy: Any, model_name: str, batch_size: int, epochs: int
) -> tuple[Trainer, ClassifierModule, StepTimer]:
    """Fit ``model_name`` on digits with SGD (lr 0.05, momentum 0.9) from seed 0 under ``strategy``."""
    torch.manual_seed(0)
    module = ClassifierModule(model_name, optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
    timer = StepTimer()
    trainer = Trainer(
        accelerator="cpu", devices=int(os.environ["LOCAL_WORLD_SIZE"]), strategy=strategy, max_epochs=epochs,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], num_sanity_val_steps=0,
    )
    trainer.fit(module, DigitsDataModule(batch_size=batch_size))
    return trainer, module, timer


def checkpoint_accuracy(trainer: Trainer, model_name: str) -> float:
    """Validation accuracy of the model a checkpoint holds (the consensus; EASGD's center; DDP's model).

    A collective call under our strategies: every rank makes it.
    """
    return val_accuracy(model_name, trainer.strategy.lightning_module_state_dict(), trainer.datamodule)


def timing_summary(times: list[float], rep_medians: list[float]) -> dict[str, float]:
    """Median step time over all repeats, and the smallest and largest per-repeat median, in ms."""
    return {"step_ms": 1e3 * statistics.median(times), "step_ms_lo": 1e3 * min(rep_medians),
            "step_ms_hi": 1e3 * max(rep_medians)}


def _worker(out: Path, epochs: int, batch_size: int, repeats: int) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    configs = [(m, s, o) for m in MODELS for s, o in STRATEGIES]
    results: dict[tuple[str, str, bool | None], dict[str, Any]] = {}
    for rep, (model_name, strategy_name, overlap) in rotated_runs(configs, repeats, ("cnn", "ddp", None)):
        if strategy_name == "ddp":
            strategy: Any = CountingDDP()
        else:
            kind = {"gossip_ring": "ring", "gossip_one_peer": "one_peer_exponential"}[strategy_name]
            strategy = GossipStrategy(kind, overlap=bool(overlap))
        trainer, module, timer = fit_timed(strategy, model_name, batch_size, 2 if rep < 0 else epochs)
        val_acc = float(trainer.callback_metrics["val/acc"])
        consensus_acc = checkpoint_accuracy(trainer, model_name)
        if rep < 0:
            continue
        entry = results.setdefault((model_name, strategy_name, overlap), {
            "model": model_name,
            "params": sum(p.numel() for p in module.parameters()),
            "strategy": strategy_name,
            "overlap": overlap,
            "epochs": epochs,
            "steps": trainer.global_step,
            "times": [],
            "rep_medians": [],
            "bytes": [],
            "model_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
            "val_acc": [],
            "consensus_acc": [],
        })
        entry["times"] += timer.times
        entry["rep_medians"].append(statistics.median(timer.times))
        entry["bytes"] += timer.bytes
        entry["val_acc"].append(val_acc)
        entry["consensus_acc"].append(consensus_acc)
    summary = []
    for entry in results.values():
        times, nbytes = entry.pop("times"), entry.pop("bytes")
        entry.update(
            **timing_summary(times, entry["rep_medians"]),
            bytes_per_step=statistics.mean(nbytes),
            bytes_min=min(nbytes),
            bytes_max=max(nbytes),
            val_acc=entry["val_acc"][0],
            val_acc_repeatable=len(set(entry["val_acc"])) == 1,
            consensus_acc=entry["consensus_acc"][0],
        )
        summary.append(entry)
    if int(os.environ["LOCAL_RANK"]) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        (out / "results.json").write_text(json.dumps(summary))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Parent: launch, then print tables
# --------------------------------------------------------------------------------------------------
def _launch(script: str, out: Path, epochs: int, batch_size: int, repeats: int, timeout: float) -> list[dict[str, Any]]:
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0",
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                   OMP_NUM_THREADS="1")
        cmd = [sys.executable, script, "--worker", str(out), "--epochs", str(epochs),
               "--batch-size", str(batch_size), "--repeats", str(repeats)]
        log = open(out / f"rank{rank}.log", "w")  # closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return wait_for_ranks(procs, out, WORLD, timeout)


def _measured_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model (params) | strategy | overlap | steps | step ms (repeat medians) | step time / DDP "
        "| bytes/rank/step "
        "| bytes / model bytes | val acc (own models) | val acc (consensus) | acc - DDP (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        rows = [r for r in results if r["model"] == model]
        ddp = next(r for r in rows if r["strategy"] == "ddp")
        for r in rows:
            overlap = "bucketed (always)" if r["strategy"] == "ddp" else ("yes" if r["overlap"] else "no")
            spread = "" if r["bytes_min"] == r["bytes_max"] else f" ({r['bytes_min']}-{r['bytes_max']})"
            lines.append(
                f"| {model} ({r['params']:,}) | {r['strategy']} | {overlap} | {r['steps']} "
                f"| {r['step_ms']:.1f} ({r['step_ms_lo']:.1f}-{r['step_ms_hi']:.1f}) "
                f"| {r['step_ms'] / ddp['step_ms']:.2f} | {r['bytes_per_step']:,.0f}{spread} "
                f"| {r['bytes_per_step'] / r['model_bytes']:.3f} | {100 * r['val_acc']:.1f} "
                f"| {100 * r['consensus_acc']:.1f} | {100 * (r['val_acc'] - ddp['val_acc']):+.1f} |"
            )
    return "\n".join(lines)


def _model_table(alpha: float, beta: float) -> str:
    sizes = (8, 32, 128, 1024)
    params = (1_000_000, 10_000_000, 100_000_000, 1_000_000_000)
    lines = [
        "| params | N | ring all-reduce ms | one-peer gossip ms | gossip / all-reduce |",
        "|---|---|---|---|---|",
    ]
    for m in params:
        nbytes = 4 * m
        for n in sizes:
            ring = 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes * beta
            gossip = alpha + nbytes * beta
            lines.append(f"| {m:,} | {n} | {1e3 * ring:.3f} | {1e3 * gossip:.3f} | {gossip / ring:.3f} |")
    return "\n".join(lines)


def parse_args(description: str, *, epochs: int, repeats: int, timeout: float) -> argparse.Namespace:
    """The command line shared by the strategy benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=repeats, help="passes over all configurations")
    parser.add_argument("--alpha", type=float, default=5e-6, help="latency per message, seconds")
    parser.add_argument("--bandwidth-gbps", type=float, default=100.0, help="link bandwidth, Gbit/s")
    parser.add_argument("--timeout", type=float, default=timeout)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_ranks(script: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str, float]:
    """Launch ``script``'s workers on ``WORLD`` ranks; return their results, the hardware line and beta."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        results = _launch(script, Path(tmp), args.epochs, args.batch_size, args.repeats, args.timeout)
    note = " (oversubscribed: more processes than cores)" if WORLD > cores else ""
    return results, f"{WORLD} gloo processes on {cores} CPU cores{note}", 8.0 / (args.bandwidth_gbps * 1e9)


def modelled_heading(args: argparse.Namespace, beta: float) -> str:
    return (f"## Modelled: communication per step, alpha = {args.alpha * 1e6:g} us per message, "
            f"beta = {beta * 1e12:g} ps/byte ({args.bandwidth_gbps:g} Gbit/s), float32 parameters")


def report(
    doc: str, script: str, worker: Callable[[Path, int, int, int], None],
    measured_table: Callable[[list[dict[str, Any]]], str], modelled: Callable[[argparse.Namespace, float], str],
    *, setup: str, epochs: int, repeats: int, timeout: float, note: str = "",
) -> None:
    """A strategy benchmark's ``main``: in a worker rank (``--worker``) run ``worker``; in the parent launch
    ``script``'s ranks and print what they measured, then the alpha-beta model.

    Args:
        doc: The script's docstring (its first line describes the command line).
        script: The script's path, run again as each worker rank.
        worker: ``worker(out, epochs, batch_size, repeats)``: one rank's runs, results into ``out``.
        measured_table: The measured table from the ranks' results.
        modelled: What follows the modelled heading (its suffix, then the model tables).
        setup: What was trained, with ``{batch_size}`` and ``{epochs}`` fields.
        epochs, repeats, timeout: The command line's defaults.
        note: A sentence on how the table counts (after the step-time one).
    """
    args = parse_args(doc.split("\n")[0], epochs=epochs, repeats=repeats, timeout=timeout)
    if args.worker is not None:
        worker(args.worker, args.epochs, args.batch_size, args.repeats)
        return
    results, hardware, beta = run_ranks(script, args)
    repeatable = all(r["val_acc_repeatable"] for r in results)
    print(f"## Measured: {hardware}, {setup.format(batch_size=args.batch_size, epochs=args.epochs)}, "
          f"{args.repeats} repeats\n")
    print("Step time: median over all steps after the first epoch of all repeats (on rank 0); in brackets the "
          f"smallest and largest per-repeat median. {note}Accuracy is deterministic: "
          f"{'identical' if repeatable else 'NOT identical'} in every repeat.\n")
    print(measured_table(results))
    print(f"\n{modelled_heading(args, beta)}{modelled(args, beta)}")


def main() -> None:
    report(__doc__, __file__, _worker, _measured_table,
           lambda args, beta: f"\n\n{_model_table(args.alpha, beta)}",
           setup="batch {batch_size} per rank, {epochs} epochs, SGD lr 0.05 momentum 0.9, digits",
           epochs=10, repeats=3, timeout=1800.0)


if __name__ == "__main__":
    main()
