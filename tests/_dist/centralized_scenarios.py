"""One rank of the centralized-strategy scenarios (local SGD, EASGD, LSGD, GRAWA).

Usage: ``python centralized_scenarios.py OUT_DIR SCENARIO [SCENARIO ...]`` under
``tests/_dist/launch.py``. Each scenario runs one or more Trainers in this process group and saves
``OUT_DIR/<scenario>_rank<r>.pt``; ``tests/test_centralized_strategies.py`` checks them against closed
forms, the pure update functions and reference runs. The Trainer, data and regression model come from
the gossip scenarios, so both families are exercised on the same problems.
"""

from __future__ import annotations

from typing import Any

import gossip_scenarios as scenarios
import torch
from gossip_scenarios import BATCH, RANK, WORLD, Regression, loader, regression_data, save, state, trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks.consensus import ConsensusDistance
from lightning_optsurvey.strategies import EASGDStrategy, LocalSGDStrategy, LSGDStrategy


class StepRecorder(Callback):
    """Flat parameters, float buffers and logged bytes after every training batch."""

    def __init__(self, center: bool = False) -> None:
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.bytes: list[float] = []
        self.centers: list[dict[str, torch.Tensor]] = []
        self.leaders: list[int | None] = []
        self._center = center

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.params.append(torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone())
        floats = [b.detach().reshape(-1) for b in pl_module.buffers() if b.is_floating_point()]
        self.buffers.append(torch.cat(floats).clone() if floats else torch.zeros(0))
        metric = trainer.callback_metrics.get("comm/bytes_sent")
        self.bytes.append(float(metric) if metric is not None else float("nan"))
        if self._center:
            self.centers.append({k: v.clone() for k, v in trainer.strategy.center_tensors().items()})
        self.leaders.append(getattr(trainer.strategy, "last_leader", None))


def sgd_regression(lr: float = 0.05, momentum: float = 0.0, batch_norm: bool = False) -> Regression:
    torch.manual_seed(0)
    return Regression(batch_norm=batch_norm, lr=lr, momentum=momentum)


# --------------------------------------------------------------------------------------------------
# Local SGD
# --------------------------------------------------------------------------------------------------
def local_sgd_equivalence() -> None:
    """Degenerate cases equal to Lightning's "ddp": H=1 with plain SGD; an all-warm-up run with momentum."""
    data = regression_data(12 * BATCH * WORLD)
    results: dict[str, Any] = {}
    runs = {
        "ddp_sgd": ("ddp", dict()),
        "local_h1": (LocalSGDStrategy(sync_every=1), dict()),
        "ddp_momentum_bn": ("ddp", dict(momentum=0.9, batch_norm=True)),
        "warmup_momentum_bn": (LocalSGDStrategy(sync_every=5, warmup_steps=12), dict(momentum=0.9, batch_norm=True)),
    }
    for name, (strategy, kwargs) in runs.items():
        model = sgd_regression(**kwargs)
        trainer(strategy, max_steps=12).fit(model, loader(data))
        results[name] = state(model)
    save("local_sgd_equivalence", results)


class Routed(LightningModule):
    """Rank ``r`` routes its batches through expert ``r % 2``; expert 2 is used by no rank (an idle branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.ModuleList(nn.Linear(6, 3) for _ in range(3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.experts[RANK % 2](x) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)


def local_sgd_unused_parameters() -> None:
    """Post-local SGD's warm-up with parameters some ranks (or all) leave unused, against DDP's own handling."""
    data = regression_data(6 * BATCH * WORLD, seed=7)
    results: dict[str, Any] = {}
    for name, strategy in (("ddp", "ddp_find_unused_parameters_true"),
                           ("warmup", LocalSGDStrategy(sync_every=5, warmup_steps=6))):
        model = Routed()
        trainer(strategy, max_steps=6).fit(model, loader(data))
        results[name] = state(model)
    results["initial"] = state(Routed())
    save("local_sgd_unused_parameters", results)


def local_sgd_schedule() -> None:
    """Post-local SGD (T=4 warm-up steps, then H=3) with BatchNorm: who is equal when, and the bytes."""
    data = regression_data(12 * BATCH * WORLD, seed=4)
    model = sgd_regression(momentum=0.9, batch_norm=True)
    recorder = StepRecorder()
    trainer(LocalSGDStrategy(sync_every=3, warmup_steps=4), max_steps=12, callbacks=[recorder]).fit(
        model, loader(data))
    params = [p for p in model.parameters()]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    save("local_sgd_schedule", {
        "params": recorder.params, "buffers": recorder.buffers, "bytes": recorder.bytes,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "num_params": len(params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
    })


# --------------------------------------------------------------------------------------------------
# EASGD
# --------------------------------------------------------------------------------------------------
def quadratic_minimizer(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(3, generator=generator, dtype=torch.float64)


class Quadratic(LightningModule):
    """Worker ``r`` minimizes ``h/2 ||w - m_r||^2`` (no data): the setting of EASGD's analysis."""

    def __init__(self, minimizer: torch.Tensor, h: float, lr: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.minimizer = minimizer.clone()  # not a buffer: buffers are synchronized like parameters
        self.h, self.lr = h, lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return 0.5 * self.h * (self.w - self.minimizer.to(self.w)).square().sum() + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


EASGD_H, EASGD_LR, EASGD_RHO, EASGD_TAU, EASGD_STEPS = 2.0, 0.1, 1.5, 2, 10


def easgd_quadratic() -> None:
    """EASGD on per-rank quadratics in float64: parameters and center after every step."""
    model = Quadratic(quadratic_minimizer(RANK), EASGD_H, EASGD_LR).double()
    recorder = StepRecorder(center=True)
    fit = trainer(EASGDStrategy(rho=EASGD_RHO, sync_every=EASGD_TAU), max_steps=EASGD_STEPS,
                  precision="64-true", callbacks=[recorder])
    fit.fit(model, DataLoader(TensorDataset(torch.zeros(WORLD * EASGD_STEPS, 1)), batch_size=1))
    save("easgd_quadratic", {"params": recorder.params, "centers": recorder.centers, "bytes": recorder.bytes})


# --------------------------------------------------------------------------------------------------
# LSGD and GRAWA
# --------------------------------------------------------------------------------------------------
LSGD_LOSSES = {  # rank -> training loss at steps 1..4; the leader is chosen on the mean over 2 steps
    0: [0.5, 5.5, 3.0, 3.0],
    1: [3.5, 3.5, 2.0, 2.0],
    2: [2.0, 2.0, 0.25, 4.75],
    3: [2.5, 2.5, 2.5, 2.5],
}


def synthetic_start(rank: int) -> dict[str, torch.Tensor]:
    # Small dyadic numbers: pulls with lambda = 1/4 are exact in float64.
    return {"w": torch.arange(4, dtype=torch.float64) * (rank + 1) - 2.0 * rank,
            "stat": torch.tensor([1.0, -3.0], dtype=torch.float64) * (rank + 2)}


class Synthetic(LightningModule):
    """Parameters set per rank at train start; the loss value and the gradient are prescribed."""

    def __init__(self, losses: list[float] | None = None, grad: torch.Tensor | None = None) -> None:
        super().__init__()
        start = synthetic_start(RANK)
        self.w = nn.Parameter(torch.zeros_like(start["w"]))
        self.register_buffer("stat", torch.zeros_like(start["stat"]))
        self._losses, self._grad = losses, grad

    def on_train_start(self) -> None:
        start = synthetic_start(RANK)
        with torch.no_grad():
            self.w.copy_(start["w"])
            self.stat.copy_(start["stat"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        zero = 0.0 * batch[0].sum()
        if self._grad is not None:  # linear loss: the gradient is exactly ``grad``
            return (self._grad * self.w).sum() + zero
        return (0.0 * self.w).sum() + self._losses[self.trainer.global_step] + zero

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def grawa_grad(rank: int) -> torch.Tensor:
    return torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=torch.float64) / (rank + 1) + rank


def lsgd_synthetic() -> None:
    """LSGD's leader choice and pull, GRAWA's weighted pull, on prescribed losses and gradients."""
    data = DataLoader(TensorDataset(torch.zeros(WORLD * 4, 1, dtype=torch.float64)), batch_size=1)
    results: dict[str, Any] = {}
    variants = {
        "lsgd": (Synthetic(losses=LSGD_LOSSES[RANK]), LSGDStrategy(pull_strength=0.25, sync_every=2), 4),
        "grawa": (Synthetic(grad=grawa_grad(RANK)), LSGDStrategy(0.5, sync_every=1, leader="grawa"), 2),
    }
    for name, (model, strategy, steps) in variants.items():
        recorder = StepRecorder()
        trainer(strategy, max_steps=steps, precision="64-true", callbacks=[recorder]).fit(model, data)
        results[name] = {"params": recorder.params, "buffers": recorder.buffers, "bytes": recorder.bytes,
                         "leaders": recorder.leaders}
    save("lsgd_synthetic", results)


# --------------------------------------------------------------------------------------------------
# Digits, checkpoints
# --------------------------------------------------------------------------------------------------
def strategies_for_digits() -> dict[str, Any]:
    return {
        "local_sgd": lambda: LocalSGDStrategy(sync_every=4, warmup_steps=4),
        "easgd": lambda: EASGDStrategy(rho=0.5, sync_every=2),
        "lsgd": lambda: LSGDStrategy(pull_strength=0.5, sync_every=2),
        "grawa": lambda: LSGDStrategy(pull_strength=0.5, sync_every=2, leader="grawa"),
    }


def digits() -> None:
    """Every strategy trains the MLP on digits for 2 epochs; validation accuracy before and after."""
    from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

    def make_module() -> ClassifierModule:
        torch.manual_seed(0)
        return ClassifierModule("mlp", optimizer="sgd", optimizer_kwargs={"lr": 0.1, "momentum": 0.9})

    data = DigitsDataModule(batch_size=32)
    # Every run starts from the same model, so its accuracy before training is measured once.
    results: dict[str, Any] = {"before": float(trainer("ddp").validate(make_module(), datamodule=data,
                                                                         verbose=False)[0]["val/acc"])}
    for name, make in strategies_for_digits().items():
        module = make_module()
        fit = trainer(make(), max_epochs=2, callbacks=[ConsensusDistance(every_n_steps=4)])
        fit.fit(module, datamodule=data)
        metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
        results[name] = {"after": metrics["val/acc"], "consensus": metrics.get("gossip/consensus_distance"),
                         "bytes": metrics.get("comm/bytes_sent"), "world_size": fit.world_size}
    save("digits", results)


def checkpoint_resume() -> None:
    """Two epochs straight vs one epoch, checkpoint, resume for one more: bit for bit, for each strategy.

    Six steps per epoch and a period of 4 put a synchronization window across the checkpoint.
    """
    data = regression_data(6 * BATCH * WORLD, seed=1)
    variants = {
        "local_sgd": lambda: LocalSGDStrategy(sync_every=4, warmup_steps=1),
        "easgd": lambda: EASGDStrategy(rho=0.5, sync_every=4),
        "lsgd": lambda: LSGDStrategy(pull_strength=0.5, sync_every=4),
        "grawa": lambda: LSGDStrategy(pull_strength=0.5, sync_every=4, leader="grawa"),
    }
    results: dict[str, Any] = {}
    for name, make in variants.items():
        runs, first, resumed = scenarios.straight_and_resumed(name, make, data)
        runs["center"] = {k: v.clone() for k, v in first.center_tensors().items()} if name == "easgd" else None
        runs["steps"] = resumed.steps
        results[name] = runs
    save("checkpoint_resume", results)


SCENARIOS = {f.__name__: f for f in (local_sgd_equivalence, local_sgd_unused_parameters, local_sgd_schedule,
                                     easgd_quadratic, lsgd_synthetic, digits, checkpoint_resume)}

if __name__ == "__main__":
    scenarios.run_scenarios(SCENARIOS)
