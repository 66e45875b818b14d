"""One rank of the D² / gradient tracking / CHOCO / partition / compressed-DDP scenarios (see gossip_scenarios.py).

Usage: ``python heterogeneous_scenarios.py OUT_DIR SCENARIO [SCENARIO ...]`` with the launcher's environment.
"""

from __future__ import annotations

from typing import Any

import torch
from gossip_scenarios import (
    BATCH,
    OUT,
    RANK,
    WORLD,
    LinearRegression,
    Recorder,
    Regression,
    loader,
    regression_data,
    run_scenarios,
    save,
    state,
    straight_and_resumed,
    trainer,
)
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.averaging.compression import QSGD, RandomK
from lightning_optsurvey.strategies import GossipStrategy
from lightning_optsurvey.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule, PartitionSampler, partition_indices

STEPS = 6


def heterogeneous_least_squares() -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares whose ranks' shards have different minimizers (rank r's targets shifted by 3 r)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8 * WORLD, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) + torch.randn(8 * WORLD, generator=generator,
                                                                               dtype=torch.float64)
    # DistributedSampler(shuffle=False) gives rank r the samples r, r + N, ...: shift those.
    y = y + 3.0 * (torch.arange(8 * WORLD) % WORLD).to(torch.float64)
    return x, y


def algorithm_reference() -> None:
    """Full-batch least squares in float64 under D², DIGing and CHOCO, for a dense re-simulation."""
    x, y = heterogeneous_least_squares()
    variants = {
        "d2_ring": GossipStrategy("ring", algorithm="d2"),  # ring of 4: lambda_min = -1/3, lazy (I + W)/2
        "d2_complete": GossipStrategy("complete", algorithm="d2"),  # eigenvalues 1, 0, 0, 0: W itself
        "gt_ring": GossipStrategy("ring", algorithm="gradient_tracking"),
        "gt_exponential": GossipStrategy("exponential", algorithm="gradient_tracking"),
        "choco_topk": GossipStrategy("ring", algorithm="choco", compressor="topk", ratio=0.34, consensus_lr=0.8),
        "choco_randomk": GossipStrategy("ring", algorithm="choco", compressor=RandomK(0.67), consensus_lr=0.5,
                                        compression_seed=3),
        "choco_qsgd": GossipStrategy("ring", algorithm="choco", compressor=QSGD(levels=4), consensus_lr=0.6),
        "choco_sign": GossipStrategy("ring", algorithm="choco", compressor="sign", consensus_lr=0.4),
    }
    results: dict[str, Any] = {}
    for name, strategy in variants.items():
        model = LinearRegression()
        recorder = Recorder()
        fit = trainer(strategy, max_steps=STEPS, precision="64-true", callbacks=[recorder])
        fit.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
        results[name] = {"params": recorder.params, "batches": model.batches, "bytes": recorder.bytes,
                         "lazy": getattr(fit.strategy._algorithm, "lazy", None)}
    results["choco_from_dpsgd"] = choco_from_dpsgd(x, y)
    save("algorithm_reference", results)


class StartRecorder(Callback):
    """The parameters a fit starts from (after a checkpoint is restored)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.params = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone()


def choco_from_dpsgd(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """CHOCO resumed from a D-PSGD checkpoint: different models per rank and no replicas in the file."""
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    path = OUT / "dpsgd_for_choco.ckpt"
    model, recorder = LinearRegression(), Recorder()
    first = trainer(GossipStrategy("ring"), max_steps=3, precision="64-true", callbacks=[recorder])
    first.fit(model, data)
    first.save_checkpoint(path)
    model, recorder, start = LinearRegression(), Recorder(), StartRecorder()
    choco = GossipStrategy("ring", algorithm="choco", compressor="topk", ratio=0.34, consensus_lr=0.8)
    second = trainer(choco, max_steps=STEPS, precision="64-true", callbacks=[recorder, start])
    second.fit(model, data, ckpt_path=path)
    return {"start": start.params, "params": recorder.params, "batches": model.batches, "bytes": recorder.bytes,
            "total_bytes": second.strategy.comm.total_bytes}


def algorithm_resume() -> None:
    """D², DIGing and CHOCO (random compressor: its generator is state): checkpoint + resume == straight."""
    data = regression_data(6 * BATCH * WORLD, seed=1)
    variants = {
        "d2": lambda: GossipStrategy("ring", algorithm="d2"),
        "gt": lambda: GossipStrategy("ring", algorithm="gradient_tracking"),
        "choco": lambda: GossipStrategy("ring", algorithm="choco", compressor=RandomK(0.3)),
    }
    results = {}
    for name, make in variants.items():
        runs, _, _ = straight_and_resumed(f"hetero_{name}", make, data)
        results[name] = runs
    save("algorithm_resume", results)


class LabelRecorder(Callback):
    def __init__(self) -> None:
        self.labels: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.labels.append(batch[1].clone())


def partition_ddp() -> None:
    """DigitsDataModule(partition="dirichlet") under Lightning's DDP: each rank trains on its own part."""
    dm = DigitsDataModule(batch_size=16, partition="dirichlet", alpha=0.1, seed=0)
    recorder = LabelRecorder()
    torch.manual_seed(0)
    fit = trainer("ddp", max_epochs=1, limit_val_batches=0, callbacks=[recorder])
    fit.fit(ClassifierModule(model="mlp"), datamodule=dm)
    reference = DigitsDataModule(batch_size=16, partition="dirichlet", alpha=0.1, seed=0)
    part = reference.partition_sampler(RANK, WORLD).part
    save("partition_ddp", {"labels": torch.cat(recorder.labels), "part_labels": reference.train_set.tensors[1][part],
                           "steps": len(recorder.labels)})


class IndexedDigits(torch.utils.data.Dataset):
    """scikit-learn's digits as a user's data set might give them: dict samples that carry their index."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        self.x = torch.as_tensor(x, dtype=torch.float32) / 16.0
        self.y = torch.as_tensor(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixels": self.x[i], "label": self.y[i], "index": i}


class UserData(LightningDataModule):
    """A user's own DataModule: the README's two lines give each rank its Dirichlet(0.1) part."""

    def setup(self, stage: str) -> None:
        self.train_set = IndexedDigits()

    def train_dataloader(self) -> DataLoader:
        parts = partition_indices(self.train_set.y, self.trainer.world_size, "dirichlet", alpha=0.1, seed=0,
                                  min_size=16)
        sampler = PartitionSampler.for_rank(parts, self.trainer.global_rank, seed=0)
        return DataLoader(self.train_set, batch_size=16, sampler=sampler)


class UserClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, 10)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].clone())
        return torch.nn.functional.cross_entropy(self.net(batch["pixels"]), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def partition_user_datamodule() -> None:
    """A user's DataModule and module (dict batches) under gradient tracking: each rank trains on its part."""
    torch.manual_seed(0)
    module, data = UserClassifier(), UserData()
    fit = trainer(GossipStrategy("ring", algorithm="gradient_tracking"), max_epochs=1)
    fit.fit(module, datamodule=data)
    parts = partition_indices(data.train_set.y, WORLD, "dirichlet", alpha=0.1, seed=0, min_size=16)
    save("partition_user_datamodule", {"seen": torch.cat(module.seen), "part": parts[RANK],
                                       "labels": data.train_set.y, "steps": len(module.seen),
                                       "weight": module.net.weight.detach().clone()})


class FrozenBackbone(LightningModule):
    """A frozen first layer under an optimizer given every parameter, with weight decay (a fine-tuning idiom)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Linear(6, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.head(torch.tanh(self.backbone(x))) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=0.1)


def frozen_parameters() -> None:
    """Every algorithm leaves a frozen layer alone (gradient tracking used to give it a zero .grad)."""
    data = regression_data(4 * BATCH * WORLD, seed=3)
    results: dict[str, Any] = {"initial": state(FrozenBackbone())}
    for algorithm in ("dpsgd", "d2", "gradient_tracking", "choco"):
        model = FrozenBackbone()
        trainer(GossipStrategy("ring", algorithm=algorithm), max_steps=4).fit(model, DataLoader(data, batch_size=BATCH))
        results[algorithm] = state(model)
    save("frozen_parameters", results)


class WithTemperature(Regression):
    def __init__(self) -> None:
        super().__init__(momentum=0.0)
        self.temperature = torch.nn.Parameter(torch.tensor(1.0))  # a 0-dimensional parameter

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * self.temperature


def powersgd_scalar_parameter() -> None:
    """PowerSGD cannot take a 0-dimensional parameter (torch's hook raised an IndexError): refused at setup."""
    try:
        trainer(CompressedDDPStrategy("powersgd"), max_steps=1).fit(WithTemperature(),
                                                                   loader(regression_data(4 * BATCH * WORLD)))
        message = None
    except ValueError as error:
        message = str(error)
    save("powersgd_scalar_parameter", {"message": message})


def compressed_ddp() -> None:
    """fp16 / PowerSGD hooks against plain DDP on the same data; bytes as the hooks send them."""
    data = regression_data(10 * BATCH * WORLD)
    results: dict[str, Any] = {}
    for name, strategy in (
        ("none", CompressedDDPStrategy(compression="none")),
        ("fp16", CompressedDDPStrategy(compression="fp16")),
        ("powersgd", CompressedDDPStrategy(compression="powersgd", matrix_approximation_rank=1,
                                           start_powersgd_iter=2)),
    ):
        torch.manual_seed(0)
        model = Regression(momentum=0.0)
        recorder = Recorder()
        fit = trainer(strategy, max_steps=10, callbacks=[recorder])
        fit.fit(model, DataLoader(data, batch_size=BATCH, shuffle=False))
        results[name] = {"state": state(model), "bytes": recorder.bytes, "params": recorder.params,
                         "total": fit.strategy.comm.total_bytes}
    save("compressed_ddp", results)


def powersgd_resume() -> None:
    """PowerSGD-DDP (error feedback and warm-started Q carried across the checkpoint): resume == straight."""
    data = regression_data(6 * BATCH * WORLD, seed=1)
    make = lambda: CompressedDDPStrategy("powersgd", matrix_approximation_rank=1, start_powersgd_iter=2)  # noqa: E731
    runs, first, resumed = straight_and_resumed("powersgd", make, data)
    runs["iter_at_checkpoint"] = first.powersgd_state.iter
    runs["iter_at_end"] = resumed.powersgd_state.iter
    runs["plain"], _, _ = straight_and_resumed("plain_ddp", lambda: CompressedDDPStrategy("none"), data)
    save("powersgd_resume", runs)


SCENARIOS = {f.__name__: f for f in (algorithm_reference, algorithm_resume, partition_ddp, partition_user_datamodule,
                                     frozen_parameters, powersgd_scalar_parameter, compressed_ddp, powersgd_resume)}

if __name__ == "__main__":
    run_scenarios(SCENARIOS)
