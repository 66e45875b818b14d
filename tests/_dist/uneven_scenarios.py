"""One rank of the uneven-data scenarios: every rank has its own number of batches per epoch, some none.

Usage: ``python uneven_scenarios.py OUT_DIR STRATEGY [STRATEGY ...]`` under ``tests/_dist/launch.py``.
Each named strategy trains a float64 least-squares model for ``len(COUNTS[WORLD])`` epochs on per-rank
batches whose numbers differ (an iterable loader, so a rank may have no batch at all in an epoch),
with per-step and per-epoch ``sync_dist`` logging and end-of-epoch validation. Each rank saves its
final model, EASGD's center, the batch counts the strategy reported and the logged metrics to
``OUT_DIR/<strategy>_rank<r>.pt``; ``tests/test_uneven_data.py`` replays the same schedule densely.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.strategies import EASGDStrategy, GossipStrategy, LocalSGDStrategy, LSGDStrategy

if os.environ.get("OPTSURVEY_JOIN_DEBUG"):
    faulthandler.dump_traceback_later(45, exit=True)
torch.set_num_threads(1)
warnings.filterwarnings("ignore")

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("LOCAL_RANK", "0"))
LR = 0.1
BATCH = 2
START = (0.5, -1.0, 2.0)
COUNTS = {  # world size -> per epoch, per rank: the number of training batches
    2: [[3, 1], [0, 2]],
    3: [[3, 1, 0], [2, 0, 1]],
}
STRATEGIES = {
    "local_sgd": lambda: LocalSGDStrategy(sync_every=2),
    "easgd": lambda: EASGDStrategy(sync_every=1),
    "gossip": lambda: GossipStrategy("ring"),
    "lsgd": lambda: LSGDStrategy(pull_strength=0.5, sync_every=1),
    "grawa": lambda: LSGDStrategy(pull_strength=0.5, sync_every=1, leader="grawa"),
}


def batch(rank: int, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th training batch of ``rank`` in ``epoch`` (the tests rebuild it identically)."""
    generator = torch.Generator().manual_seed(1000 * epoch + 100 * rank + index)
    x = torch.randn(BATCH, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(BATCH, generator=generator, dtype=torch.float64)
    return x, y


def val_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(6, 3, generator=generator, dtype=torch.float64),
                         torch.randn(6, generator=generator, dtype=torch.float64))


class UnevenBatches(IterableDataset):
    """This rank's batches; the n-th ``iter()`` is epoch n (Lightning starts one iterator per epoch)."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.epoch = -1

    def __iter__(self) -> Any:
        self.epoch += 1
        count = self.counts[self.epoch] if self.epoch < len(self.counts) else 0
        return iter([batch(RANK, self.epoch, k) for k in range(count)])


class LeastSquares(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(START, dtype=torch.float64))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return 0.5 * (x @ self.w - y).square().mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=BATCH)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class EpochRecorder(Callback):
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.batches.append(list(trainer.strategy.batches_per_rank))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def run(name: str) -> None:
    counts = [epoch[RANK] for epoch in COUNTS[WORLD]]
    model = LeastSquares()
    recorder = EpochRecorder()
    trainer = Trainer(
        accelerator="cpu", devices=WORLD, strategy=STRATEGIES[name](), max_epochs=len(counts),
        precision="64-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder],
    )
    train = DataLoader(UnevenBatches(counts), batch_size=None)
    trainer.fit(model, train, DataLoader(val_data(), batch_size=3))
    strategy = trainer.strategy
    center = strategy.center_tensors()["w"].clone() if name == "easgd" else None
    run_model = trainer.strategy.lightning_module_state_dict()["w"].clone()
    torch.save({"w": model.w.detach().clone(), "center": center, "run_model": run_model,
                "batches": recorder.batches, "metrics": recorder.metrics,
                "final": {k: float(v) for k, v in trainer.callback_metrics.items()}},
               OUT / f"{name}_rank{RANK}.pt")


if __name__ == "__main__":
    for strategy_name in sys.argv[2:]:
        run(strategy_name)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
