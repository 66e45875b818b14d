"""Every data-parallel strategy on 4 CPU processes (gloo): bytes per step, step time, accuracy.

Extends ``benchmarks/gossip_vs_ddp.py`` (whose helpers and alpha-beta model it imports) from gossip to
the centralized methods: Lightning's ``"ddp"`` (the anchor, measured side by side in the same process
group), gossip on a ring and on the one-peer exponential graph, local SGD (H = 8, and post-local SGD with
a one-epoch warm-up), EASGD, LSGD and GRAWA, each with its default hyperparameters. All train the
digits CNN with SGD (lr 0.05, momentum 0.9) for ``--epochs`` epochs from the same initialization.

Measured per configuration:

- bytes sent per rank per step, averaged over all steps *and ranks* (LSGD's leader sends more than the
  others): the strategy's ``CommCounter``; for DDP a gradient-bucket comm hook that counts each bucket as
  a ring all-reduce (``2 (N-1)/N`` times its size), as the gossip benchmark does;
- step time: the median wall time from ``on_train_batch_start`` to ``on_train_batch_end`` on rank 0
  after the first epoch, over ``--repeats`` passes in rotated order (the machine is shared);
- accuracy after the same epochs: ``val/acc`` as logged (each rank's own model on its shard) and of
  the model a checkpoint holds (the average; EASGD's center).

Modelled: the alpha-beta cost of communication per step, amortized over a period, for each method
(ring all-reduce ``2 (N-1) alpha + 2 (N-1)/N B beta``; LSGD's broadcast from the leader either one-to-all,
``(N-1)(alpha + B beta)``, or scatter + all-gather, plus an all-gather of a scalar).

    .venv/bin/python benchmarks/strategies.py [--epochs 8] [--batch-size 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gossip_vs_ddp import (  # the gossip benchmark
    WORLD,
    CountingDDP,
    _model_table,
    checkpoint_accuracy,
    fit_timed,
    report,
    rotated_runs,
    timing_summary,
)

CONFIGS: tuple[tuple[str, str], ...] = (
    ("ddp", "ddp"),
    ("gossip_ring", "ring, D-PSGD"),
    ("gossip_one_peer", "one-peer exponential"),
    ("local_sgd", "H=8"),
    ("post_local_sgd", "H=8, warm-up 1 epoch"),
    ("easgd", "beta=N*alpha=0.9, tau=4"),
    ("lsgd", "lambda=0.1, tau=4"),
    ("grawa", "lambda=0.1, tau=4"),
)


def _make_strategy(name: str, steps_per_epoch: int) -> Any:
    from lightning_optsurvey.strategies import (
        EASGDStrategy,
        GossipStrategy,
        LocalSGDStrategy,
        LSGDStrategy,
    )

    return {
        "gossip_ring": lambda: GossipStrategy("ring"),
        "gossip_one_peer": lambda: GossipStrategy("one_peer_exponential"),
        "local_sgd": lambda: LocalSGDStrategy(sync_every=8),
        "post_local_sgd": lambda: LocalSGDStrategy(sync_every=8, warmup_steps=steps_per_epoch),
        "easgd": lambda: EASGDStrategy(),
        "lsgd": lambda: LSGDStrategy(),
        "grawa": lambda: LSGDStrategy(leader="grawa"),
    }[name]()


# --------------------------------------------------------------------------------------------------
# Worker (one rank)
# --------------------------------------------------------------------------------------------------
def _worker(out: Path, epochs: int, batch_size: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from lightning_optsurvey.tasks import DigitsDataModule

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    probe = DigitsDataModule(batch_size=batch_size)
    probe.setup("fit")
    steps_per_epoch = -(-len(probe.train_dataloader().dataset) // (batch_size * WORLD))
    names = [name for name, _ in CONFIGS]
    results: dict[str, dict[str, Any]] = {}
    for rep, name in rotated_runs(names, repeats, "ddp"):
        strategy = CountingDDP() if name == "ddp" else _make_strategy(name, steps_per_epoch)
        trainer, module, timer = fit_timed(strategy, "cnn", batch_size, 2 if rep < 0 else epochs)
        val_acc = float(trainer.callback_metrics["val/acc"])
        checkpoint_acc = checkpoint_accuracy(trainer, "cnn")
        mean_bytes = torch.tensor(statistics.mean(timer.bytes), dtype=torch.float64)
        dist.all_reduce(mean_bytes)
        if rep < 0:
            continue
        entry = results.setdefault(name, {
            "strategy": name, "params": sum(p.numel() for p in module.parameters()),
            "model_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
            "steps": trainer.global_step, "times": [], "rep_medians": [], "bytes": [], "val_acc": [],
            "checkpoint_acc": [],
        })
        entry["times"] += timer.times
        entry["rep_medians"].append(statistics.median(timer.times))
        entry["bytes"].append(float(mean_bytes) / WORLD)
        entry["val_acc"].append(val_acc)
        entry["checkpoint_acc"].append(checkpoint_acc)
    summary = []
    for name in names:
        entry = results[name]
        entry.update(
            **timing_summary(entry.pop("times"), entry["rep_medians"]),
            bytes_per_step=statistics.mean(entry.pop("bytes")),
            val_acc_repeatable=len(set(entry["val_acc"])) == 1,
            val_acc=entry["val_acc"][0],
            checkpoint_acc=entry["checkpoint_acc"][0],
        )
        summary.append(entry)
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(summary))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Parent: launch, then print tables
# --------------------------------------------------------------------------------------------------
def _measured_table(results: list[dict[str, Any]]) -> str:
    configs = dict(CONFIGS)
    ddp = next(r for r in results if r["strategy"] == "ddp")
    lines = [
        "| strategy | configuration | steps | step ms (repeat medians) | step time / DDP | bytes/rank/step "
        "| bytes / DDP bytes | val acc (own models) | val acc (checkpoint model) | acc - DDP (points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['strategy']} | {configs[r['strategy']]} | {r['steps']} "
            f"| {r['step_ms']:.1f} ({r['step_ms_lo']:.1f}-{r['step_ms_hi']:.1f}) | {r['step_ms'] / ddp['step_ms']:.2f} "
            f"| {r['bytes_per_step']:,.0f} | {r['bytes_per_step'] / ddp['bytes_per_step']:.3f} "
            f"| {100 * r['val_acc']:.1f} | {100 * r['checkpoint_acc']:.1f} "
            f"| {100 * (r['val_acc'] - ddp['val_acc']):+.1f} |"
        )
    return "\n".join(lines)


def _centralized_model_table(alpha: float, beta: float, n: int = 32, period: int = 8) -> str:
    """Communication time per step, amortized over ``period`` steps, for B = 4 x params bytes.

    LSGD is shown with the one-to-all broadcast it is counted as (gloo's algorithm: the leader sends
    ``N - 1`` copies) and with a bandwidth-optimal scatter + ring all-gather broadcast
    (``(log2 N + N - 1) alpha + 2 (N-1)/N B beta``, what NCCL's pipelined ring approaches).
    """
    lines = [
        f"| params | DDP ms/step | local SGD, EASGD, GRAWA (period {period}) ms/step | LSGD one-to-all "
        f"(period {period}) ms/step | LSGD scatter+all-gather (period {period}) ms/step | LSGD one-to-all / DDP |",
        "|---|---|---|---|---|---|",
    ]
    for m in (1_000_000, 10_000_000, 100_000_000):
        nbytes = 4 * m
        ring = 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes * beta
        gather = (n - 1) * (alpha + 8 * beta)
        one_to_all = (n - 1) * (alpha + nbytes * beta) + gather
        pipelined = (math.log2(n) + n - 1) * alpha + 2 * (n - 1) / n * nbytes * beta + gather
        lines.append(f"| {m:,} | {1e3 * ring:.3f} | {1e3 * ring / period:.3f} | {1e3 * one_to_all / period:.3f} "
                     f"| {1e3 * pipelined / period:.3f} | {one_to_all / period / ring:.3f} |")
    return "\n".join(lines)


def _modelled(args: argparse.Namespace, beta: float) -> str:
    """After the modelled heading: the centralized methods' table on 32 nodes, then the gossip benchmark's."""
    return (f", N = 32\n\n{_centralized_model_table(args.alpha, beta)}\n\n"
            "Gossip against the ring all-reduce (from benchmarks/gossip_vs_ddp.py):\n\n"
            f"{_model_table(args.alpha, beta)}")


def main() -> None:
    report(__doc__, __file__, _worker, _measured_table, _modelled,
           setup="digits CNN, batch {batch_size} per rank, {epochs} epochs, SGD lr 0.05 momentum 0.9",
           note="Bytes: mean over all steps and ranks. ", epochs=8, repeats=2, timeout=3600.0)


if __name__ == "__main__":
    main()
