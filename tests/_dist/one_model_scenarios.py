"""One rank of the one-model-per-run scenarios on digits (local SGD, EASGD, LSGD).

Usage: ``python one_model_scenarios.py OUT_DIR SCENARIO [SCENARIO ...]`` under ``tests/_dist/launch.py``:

- ``checkpoints:<strategy>``: the strategy trains the MLP for 2 epochs with ``ModelCheckpoint(monitor="val/acc")``;
  then a fresh Trainer with the same strategy runs ``test(ckpt_path=best)``. Saves the best path and
  score and the test metrics; ``tests/test_one_model.py`` evaluates the file in one process.
- ``easgd_center``: EASGD with its default moving rate for 3 epochs; each rank's own model and the center
  are evaluated on the whole validation set (no Lightning), and the workers' accuracies all-gathered.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.strategies import EASGDStrategy, LocalSGDStrategy, LSGDStrategy
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0")) * int(
    os.environ.get("LOCAL_WORLD_SIZE", "1"))
STRATEGIES = {
    "local_sgd": lambda: LocalSGDStrategy(sync_every=4),
    "easgd": lambda: EASGDStrategy(sync_every=4),
    "lsgd": lambda: LSGDStrategy(pull_strength=0.5, sync_every=4),
}


def module() -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule("mlp", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})


def trainer(strategy: Any, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=WORLD, logger=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False)
    defaults.update(kwargs)
    return Trainer(strategy=strategy, **defaults)


def checkpoints(name: str) -> None:
    results: dict[str, Any] = {}
    for make in (STRATEGIES[name],):
        checkpoint = ModelCheckpoint(dirpath=OUT / name, monitor="val/acc", mode="max", filename="best")
        fit = trainer(make(), max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint])
        fit.fit(module(), datamodule=DigitsDataModule(batch_size=32))
        best = fit.strategy.broadcast(checkpoint.best_model_path)
        tested = trainer(make()).test(module(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=best,
                                      verbose=False)[0]
        results[name] = {"best_path": best, "best_score": float(checkpoint.best_model_score),
                         "test": {k: float(v) for k, v in tested.items()}}
    torch.save(results, OUT / f"checkpoints_{name}_rank{RANK}.pt")


@torch.no_grad()
def _accuracy(net: torch.nn.Module, data: DigitsDataModule) -> float:
    assert data.val_set is not None
    x, y = data.val_set.tensors
    net.eval()
    return float((net(x).argmax(-1) == y).double().mean())


def easgd_center() -> None:
    data = DigitsDataModule(batch_size=32)
    model = module()
    fit = trainer(EASGDStrategy(), max_epochs=3)
    fit.fit(model, datamodule=data)
    own = torch.tensor([_accuracy(model.net, data)], dtype=torch.float64)
    workers = [torch.zeros_like(own) for _ in range(WORLD)]
    dist.all_gather(workers, own)
    center_model = module()
    center_model.load_state_dict(fit.strategy.lightning_module_state_dict())
    torch.save({"workers": [float(w) for w in workers], "center": _accuracy(center_model.net, data),
                "logged_val_acc": float(fit.callback_metrics["val/acc"]), "alpha_rule": fit.strategy.alpha_rule},
               OUT / f"easgd_center_rank{RANK}.pt")


if __name__ == "__main__":
    for scenario in sys.argv[2:]:
        if scenario.startswith("checkpoints:"):
            checkpoints(scenario.split(":", 1)[1])
        else:
            {"easgd_center": easgd_center}[scenario]()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
