"""Decentralized and compressed training on label-skewed digits: consensus accuracy and bytes, ratios to DDP.

Every rank trains on its own Dirichlet(``--alpha``) part of the digits training set
(``DigitsDataModule(partition="dirichlet")``; the validation set stays global). In one process group of
``--world`` gloo processes, side by side, from the same seed and with the same optimizer (SGD, ``--lr``,
``--momentum``): DDP (the anchor; torch's plain all-reduce hook, counted), PowerSGD-DDP (rank 1),
local SGD (average every 8 steps), and on a ring: D-PSGD, D², gradient tracking (DIGing), CHOCO-SGD
with top-1 % and with QSGD (16 levels). Reported per method: the validation accuracy of the model a
checkpoint holds (the consensus, i.e. the average over ranks, for the decentralized methods), bytes sent
per rank per step (``comm/bytes_sent``, what the strategies count), and the median step time on rank 0
after the first epoch.

    .venv/bin/python benchmarks/heterogeneous.py [--world 8] [--epochs 30] [--alpha 0.1]

Accuracies and bytes are deterministic (same seeds, same data order). Step times depend on the machine's
load: on a shared 2-core machine with more processes than cores they are not comparable across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _launch import wait_for_ranks
from lightning.pytorch import Callback, Trainer

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.strategies import CompressedDDPStrategy, GossipStrategy, LocalModelStrategy, LocalSGDStrategy
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

METHODS = ("ddp", "ddp_powersgd", "local_sgd", "dpsgd", "d2", "gradient_tracking", "choco_top1", "choco_qsgd")


def make_strategy(method: str, consensus_lr: float) -> Any:
    """The strategy object of one benchmarked method."""
    if method == "ddp":
        return CompressedDDPStrategy("none")
    if method == "ddp_powersgd":
        return CompressedDDPStrategy("powersgd", matrix_approximation_rank=1, start_powersgd_iter=10)
    if method == "local_sgd":
        return LocalSGDStrategy(sync_every=8)
    if method == "dpsgd":
        return GossipStrategy("ring")
    if method in ("d2", "gradient_tracking"):
        return GossipStrategy("ring", algorithm=method)
    if method == "choco_top1":
        return GossipStrategy("ring", algorithm="choco", compressor="topk", ratio=0.01, consensus_lr=consensus_lr)
    if method == "choco_qsgd":
        return GossipStrategy("ring", algorithm="choco", compressor="qsgd", consensus_lr=consensus_lr)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


class StepRecorder(Callback):
    """Bytes of every step and wall time of every step after the first epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.bytes: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.bytes.append(trainer.strategy.comm.step_bytes)
        if trainer.current_epoch > 0:
            self.times.append(time.perf_counter() - self._start)


def consensus_accuracy(trainer: Trainer, module: ClassifierModule, data: DigitsDataModule) -> float:
    """Validation accuracy of the checkpoint's model: the consensus for per-rank strategies (collective)."""
    strategy = trainer.strategy
    state = strategy.lightning_module_state_dict() if isinstance(strategy, LocalModelStrategy) else module.state_dict()
    net = ClassifierModule(module.hparams.model).net
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    net.eval()
    x, y = data.val_set.tensors
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def _worker(out: Path, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = []
    for method in args.methods:
        torch.manual_seed(0)
        module = ClassifierModule(args.model, optimizer="sgd",
                                  optimizer_kwargs={"lr": args.lr, "momentum": args.momentum})
        data = DigitsDataModule(batch_size=args.batch_size, partition="dirichlet", alpha=args.alpha, seed=0)
        recorder = StepRecorder()
        trainer = Trainer(
            accelerator="cpu", devices=int(os.environ["LOCAL_WORLD_SIZE"]),
            strategy=make_strategy(method, args.consensus_lr), max_epochs=args.epochs, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[recorder], num_sanity_val_steps=0, check_val_every_n_epoch=args.epochs,
        )
        trainer.fit(module, datamodule=data)
        accuracy = consensus_accuracy(trainer, module, data)
        part = data.partition_sampler().part
        results.append({
            "method": method, "steps": trainer.global_step, "accuracy": accuracy,
            "bytes_per_step": statistics.mean(recorder.bytes),
            "step_ms": 1e3 * statistics.median(recorder.times) if recorder.times else float("nan"),
            "model_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
            "rank0_classes": int((torch.bincount(data.train_set.tensors[1][part], minlength=10) > 0).sum()),
        })
    if int(os.environ["LOCAL_RANK"]) == 0:
        (out / "results.json").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out: Path, argv: list[str], world: int, timeout: float) -> list[dict[str, Any]]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        log = open(out / f"rank{rank}.log", "w")  # closed below
        cmd = [sys.executable, __file__, *argv, "--worker", str(out)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return wait_for_ranks(procs, out, world, timeout)


def table(results: list[dict[str, Any]]) -> str:
    """One markdown table, every method against DDP measured in the same run."""
    ddp = next(r for r in results if r["method"] == "ddp")
    lines = [
        "| method | steps | consensus val acc | acc - DDP (points) | bytes/rank/step | bytes / DDP bytes "
        "| bytes / model bytes | step ms (under load) | step time / DDP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['steps']} | {100 * r['accuracy']:.1f} "
            f"| {100 * (r['accuracy'] - ddp['accuracy']):+.1f} "
            f"| {r['bytes_per_step']:,.0f} | {r['bytes_per_step'] / ddp['bytes_per_step']:.4f} "
            f"| {r['bytes_per_step'] / r['model_bytes']:.4f} | {r['step_ms']:.1f} "
            f"| {r['step_ms'] / ddp['step_ms']:.2f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=8, help="gloo processes (4 to 8 in the issue)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label skew")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--consensus-lr", type=float, default=0.1, help="CHOCO's gamma (0.5 diverges here)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        _worker(args.worker, args)
        return
    if args.world < 2:
        raise SystemExit("--world must be at least 2")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or "ddp" not in args.methods:
        raise SystemExit(
            f"--methods must include ddp and name only {', '.join(METHODS)}; got {unknown or args.methods}"
        )
    argv = [f"--epochs={args.epochs}", f"--batch-size={args.batch_size}", f"--alpha={args.alpha}",
            f"--model={args.model}", f"--lr={args.lr}", f"--momentum={args.momentum}",
            f"--consensus-lr={args.consensus_lr}", f"--methods={','.join(args.methods)}"]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results = _launch(Path(tmp), argv, args.world, args.timeout)
        seconds = time.perf_counter() - started
    cores = os.cpu_count() or 1
    print(f"## Dirichlet({args.alpha:g}) digits on a ring of {args.world} gloo processes ({cores} CPU cores"
          f"{', oversubscribed' if args.world > cores else ''}), {args.model}, batch {args.batch_size} per rank, "
          f"{args.epochs} epochs, SGD lr {args.lr:g} momentum {args.momentum:g}, CHOCO gamma {args.consensus_lr:g}; "
          f"{seconds:.0f} s in all\n")
    print(table(results))
    print("\nAccuracies and bytes are deterministic; step times are wall-clock medians on rank 0 and depend on the "
          "machine's load.")


if __name__ == "__main__":
    main()
