"""One rank of the gossip test scenarios; run by ``tests/_dist/launch.py``, results saved per rank.

Usage: ``python gossip_scenarios.py OUT_DIR SCENARIO [SCENARIO ...]`` with the launcher's environment.
Each scenario runs one or more Trainers in this process group and saves
``OUT_DIR/<scenario>_rank<r>.pt``; the tests compare what the ranks saved with closed forms and
reference runs. Several Trainers share the process group, so the start-up cost is paid once.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.callbacks.consensus import ConsensusDistance
from lightning_optsurvey.strategies import GossipStrategy, Topology

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

OUT = Path(sys.argv[1])
WORLD = int(os.environ["WORLD_SIZE"])
LOCAL_WORLD = int(os.environ["LOCAL_WORLD_SIZE"])
NUM_NODES = WORLD // LOCAL_WORLD
RANK = int(os.environ["NODE_RANK"]) * LOCAL_WORLD + int(os.environ["LOCAL_RANK"])
BATCH = 4


def trainer(strategy: Any, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=LOCAL_WORLD,
        num_nodes=NUM_NODES,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(strategy=strategy, **defaults)


def save(name: str, payload: dict[str, Any]) -> None:
    torch.save(payload, OUT / f"{name}_rank{RANK}.pt")


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def regression_data(samples: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=generator)
    y = x @ torch.randn(6, 3, generator=generator) + 0.1 * torch.randn(samples, 3, generator=generator)
    return TensorDataset(x, y)


def loader(dataset: TensorDataset, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


class Regression(LightningModule):
    """A small MLP on a linear-regression task; BatchNorm optional (float buffers to gossip)."""

    def __init__(self, batch_norm: bool = False, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(6, 16)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Linear(16, 3)]
        self.net = nn.Sequential(*layers)
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/own_loss", loss)
        self.log("val/rank", float(self.global_rank), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class PureGossip(LightningModule):
    """Zero gradient, so only gossip moves the parameters; rank-dependent start set at train start."""

    def __init__(self, init: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros_like(init["w"]))
        self.register_buffer("stat", torch.zeros_like(init["stat"]))
        self._init = init

    def on_train_start(self) -> None:
        with torch.no_grad():
            self.w.copy_(self._init["w"])
            self.stat.copy_(self._init["stat"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.w * 0.0).sum() + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(Callback):
    """Records the parameters, logged metrics and an independent consensus distance after each step."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.bytes: list[float] = []
        self.logged_xi: list[float] = []
        self.gathered_xi: list[float] = []

    @staticmethod
    def _xi(module: LightningModule) -> float:
        local = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).to(torch.float64)
        everyone = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(everyone, local)
        stacked = torch.stack(everyone)
        return float((stacked - stacked.mean(0)).square().sum(1).mean())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.on_train_start()  # the module's own start values first (idempotent)
        self.gathered_xi.append(self._xi(pl_module))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.params.append(torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone())
        metrics = trainer.callback_metrics
        self.bytes.append(float(metrics["comm/bytes_sent"]))
        if "gossip/consensus_distance" in metrics:
            self.logged_xi.append(float(metrics["gossip/consensus_distance"]))
        self.gathered_xi.append(self._xi(pl_module))


# --------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------
def ddp_equivalence() -> None:
    """Lightning's "ddp" and gossip on the complete graph, same init and data order, 20 SGD steps."""
    data = regression_data(20 * BATCH * WORLD)
    results: dict[str, Any] = {}
    for name, strategy in (("ddp", "ddp"), ("gossip", GossipStrategy("complete"))):
        torch.manual_seed(0)
        model = Regression()
        recorder = Recorder() if name == "gossip" else None
        fit = trainer(strategy, max_steps=20, callbacks=[recorder] if recorder else None)
        fit.fit(model, loader(data))
        results[name] = state(model)
        if recorder is not None:
            results["bytes"] = recorder.bytes
            results["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    save("ddp_equivalence", results)


def pure_gossip_init(rank: int) -> dict[str, torch.Tensor]:
    # Small integers: every average along the way is a dyadic rational, exact in float32.
    return {
        "w": torch.arange(5, dtype=torch.float32) * (rank + 1) ** 2 + 7 * rank,
        "stat": torch.tensor([1.0, -2.0, 4.0]) * (3 * rank + 1),
    }


def one_peer() -> None:
    """Pure gossip on one_peer_exponential: the exact average after log2(N) rounds."""
    data = TensorDataset(torch.zeros(WORLD * 4, 1))
    results: dict[str, Any] = {}
    variants = {
        "dpsgd": GossipStrategy("one_peer_exponential"),
        "overlap": GossipStrategy("one_peer_exponential", overlap=True),
        "push_sum": GossipStrategy("one_peer_exponential", algorithm="push_sum"),
        "every2": GossipStrategy("one_peer_exponential", gossip_every=2),
    }
    for name, strategy in variants.items():
        model = PureGossip(pure_gossip_init(RANK))
        recorder = Recorder()
        fit = trainer(strategy, max_steps=4, callbacks=[recorder])
        fit.fit(model, DataLoader(data, batch_size=1))
        results[name] = {"params": recorder.params, "stat": model.stat.clone(), "bytes": recorder.bytes}
    save("one_peer", results)


def float64_gossip() -> None:
    """Pure gossip in float64 from random starts: consensus distance per round, and push-sum's limit."""
    results: dict[str, Any] = {}
    for name, strategy, steps in (
        ("ring", GossipStrategy("ring"), 5),
        ("exponential", GossipStrategy("exponential", overlap=True), 5),
        ("push_sum", GossipStrategy(Topology("erdos_renyi", WORLD, seed=0), algorithm="push_sum"), 80),
    ):
        generator = torch.Generator().manual_seed(100 + RANK)
        init = {"w": torch.randn(10, generator=generator, dtype=torch.float64), "stat": torch.zeros(1)}
        model = PureGossip(init)
        recorder = Recorder()
        callbacks = [ConsensusDistance(every_n_steps=1), recorder] if name != "push_sum" else [recorder]
        fit = trainer(strategy, max_steps=steps, precision="64-true", callbacks=callbacks)
        fit.fit(model, DataLoader(TensorDataset(torch.zeros(WORLD * steps, 1)), batch_size=1))
        results[name] = {"logged": recorder.logged_xi, "gathered": recorder.gathered_xi, "init": init["w"],
                         "final": model.w.detach().clone(), "weight": fit.strategy._weight.clone()}
    save("float64_gossip", results)


class LinearRegression(LightningModule):
    """Least squares ``0.5 mean((X w - y)^2)`` with plain SGD; records the batch of each step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.batches.append((x.clone(), y.clone()))
        return 0.5 * (x @ self.w - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


USER_DIRECTED = [[1, 2], [2], [3], [0]]  # a directed graph of one's own, irregular: push-sum weights it


def user_circulant(n: int) -> torch.Tensor:
    """A user's mixing matrix: ``0.5 I + 0.3 S + 0.2 S^2`` (directed, doubly stochastic, not Metropolis)."""
    shift = torch.roll(torch.eye(n, dtype=torch.float64), 1, dims=1)
    return 0.5 * torch.eye(n, dtype=torch.float64) + 0.3 * shift + 0.2 * shift @ shift


def linear_reference() -> None:
    """Full-batch least squares in float64 under each gossip update rule, for a dense reference."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8 * WORLD, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) + torch.randn(8 * WORLD, generator=generator,
                                                                               dtype=torch.float64)
    er = Topology("erdos_renyi", WORLD, seed=0)
    variants = {
        "dpsgd": GossipStrategy("ring"),
        "dpsgd_overlap": GossipStrategy("ring", overlap=True),
        "push_sum": GossipStrategy(er, algorithm="push_sum"),
        "push_sum_overlap": GossipStrategy(er, algorithm="push_sum", overlap=True),
        # A user's topologies (Topology.from_matrix / from_neighbours), as tests/test_gossip.py rebuilds them.
        "user_matrix": GossipStrategy(Topology.from_matrix(user_circulant(WORLD))),
        "user_time_varying": GossipStrategy(Topology.from_neighbours(WORLD, lambda rank, step: [rank ^ (1 << step)],
                                                                     period=2)),
        "user_push_sum": GossipStrategy(Topology.from_neighbours(WORLD, USER_DIRECTED), algorithm="push_sum"),
    }
    results: dict[str, Any] = {}
    for name, strategy in variants.items():
        model = LinearRegression()
        recorder = Recorder()
        fit = trainer(strategy, max_steps=6, precision="64-true", callbacks=[recorder])
        fit.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
        results[name] = {"params": recorder.params, "batches": model.batches}
    save("linear_reference", results)


def straight_and_resumed(name: str, make: Callable[[], Any], data: TensorDataset) -> tuple[dict[str, Any], Any, Any]:
    """Train 2 epochs straight, and 1 epoch + checkpoint ``OUT/<name>.ckpt`` + resume for 1 more.

    Returns the models' states (``"straight"``, ``"first"``: at the checkpoint, ``"resumed"``) and the
    strategies of the checkpointed and the resumed run.
    """
    runs: dict[str, Any] = {}
    torch.manual_seed(1)
    model = Regression(batch_norm=True)
    trainer(make(), max_epochs=2).fit(model, loader(data))
    runs["straight"] = state(model)
    torch.manual_seed(1)
    model = Regression(batch_norm=True)
    first = trainer(make(), max_epochs=1)
    first.fit(model, loader(data))
    path = OUT / f"{name}.ckpt"
    first.save_checkpoint(path)
    runs["first"] = state(model)
    torch.manual_seed(2)  # a different init: everything must come from the checkpoint
    model = Regression(batch_norm=True)
    resumed = trainer(make(), max_epochs=2)
    resumed.fit(model, loader(data), ckpt_path=path)
    runs["resumed"] = state(model)
    return runs, first.strategy, resumed.strategy


def checkpoint_resume() -> None:
    """Train 2 epochs straight, and 1 epoch + checkpoint + resume for 1 more; compare exactly."""
    data = regression_data(6 * BATCH * WORLD, seed=1)
    variants = {
        "ring": lambda: GossipStrategy("ring"),
        "push_sum": lambda: GossipStrategy(Topology("erdos_renyi", WORLD, seed=0), algorithm="push_sum",
                                           overlap=True),
    }
    results: dict[str, Any] = {}
    for name, make in variants.items():
        runs, first, _ = straight_and_resumed(name, make, data)
        runs["weight"] = None if first._weight is None else first._weight.clone()
        results[name] = runs
    save("checkpoint_resume", results)


def validation_logging() -> None:
    """sync_dist validation logging, ModelCheckpoint and EarlyStopping under gossip; own-model evaluation."""
    data = regression_data(4 * BATCH * WORLD, seed=2)
    val = regression_data(2 * BATCH * WORLD, seed=3)
    torch.manual_seed(0)
    model = Regression()
    checkpoint = ModelCheckpoint(dirpath=OUT / "val_ckpt", monitor="val/loss", filename="best")
    fit = trainer(
        GossipStrategy("ring"), max_epochs=2, enable_checkpointing=True,
        callbacks=[checkpoint, EarlyStopping(monitor="val/loss", patience=5)],
    )
    fit.fit(model, loader(data), loader(val, shuffle=False))
    after_fit = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("val/")}
    validated = fit.validate(model, loader(val, shuffle=False), verbose=False)[0]
    save("validation_logging", {
        "topology": {"global_rank": fit.global_rank, "node_rank": fit.node_rank, "world_size": fit.world_size,
                     "num_nodes": fit.num_nodes},
        "after_fit": after_fit,
        "validated": {k: float(v) for k, v in validated.items()},
        "params": state(model),
        "best_path": str(checkpoint.best_model_path),
    })


SCENARIOS = {
    f.__name__: f
    for f in (ddp_equivalence, one_peer, float64_gossip, linear_reference, checkpoint_resume, validation_logging)
}

def run_scenarios(scenarios: dict[str, Callable[[], None]]) -> None:
    """Run the scenarios named on the command line in order, then leave the process group together."""
    for scenario in sys.argv[2:]:
        scenarios[scenario]()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_scenarios(SCENARIOS)
