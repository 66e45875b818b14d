"""GradientNoiseScale under several processes: per-rank gradients against the all-reduced one (gloo)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _support import free_port
from lightning.pytorch import LightningModule

from lightning_optsurvey.callbacks.noise import noise_scale_across_ranks
from lightning_optsurvey.measures import gradient_noise_scale

WORLD = 3
LOCAL_COUNT = 16
DIM = 7


def _local_gradient(rank: int) -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64) + 1.0


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        def mean(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t / WORLD

        est = noise_scale_across_ranks(_local_gradient(rank), LOCAL_COUNT, WORLD, mean)
        out[rank] = tuple(est)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_noise_scale_across_ranks_matches_the_single_process_estimator():
    ctx = mp.get_context("fork")  # no re-import of torch and lightning in the children (seconds each)
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(50)
        for p in procs:
            if p.is_alive():
                p.kill()
        assert all(p.exitcode == 0 for p in procs)
        results = dict(out)
    grads = torch.stack([_local_gradient(r) for r in range(WORLD)])
    expected = gradient_noise_scale(grads.pow(2).sum(1).mean(), LOCAL_COUNT, grads.mean(0).pow(2).sum(),
                                    LOCAL_COUNT * WORLD)
    assert set(results) == set(range(WORLD))
    for rank in range(WORLD):  # every rank gets the same value, equal to the reference
        assert results[rank] == pytest.approx(tuple(expected), rel=1e-12)



class _SmallClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_callback_under_ddp_spawn_uses_per_rank_gradients(tmp_path):
    import torch.nn.functional as F
    from lightning.pytorch import Trainer

    from lightning_optsurvey.callbacks import GradientNoiseScale
    from lightning_optsurvey.callbacks._measure import draw_batches
    from lightning_optsurvey.measures import batch_gradients
    from lightning_optsurvey.tasks import DigitsDataModule

    world, num_batches, batch_size = 2, 2, 16
    torch.manual_seed(0)
    module = _SmallClassifier()  # ClassifierModule does not pickle (its OptimizerSpec holds a mappingproxy)
    dm = DigitsDataModule(batch_size=batch_size)
    cb = GradientNoiseScale(num_batches=num_batches)
    trainer = Trainer(accelerator="cpu", strategy="ddp_spawn", devices=world, max_epochs=1, limit_train_batches=2,
                      limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    dm.setup()
    rank_grads = []
    for rank in range(world):
        batches = draw_batches(dm.train_set, num_batches, batch_size, generator=torch.Generator().manual_seed(0),
                               rank=rank, world_size=world)
        grads, _ = batch_gradients(module, F.cross_entropy, batches)
        rank_grads.append(grads.double().mean(0))
    g = torch.stack(rank_grads)
    expected = gradient_noise_scale(g.pow(2).sum(1).mean(), num_batches * batch_size, g.mean(0).pow(2).sum(),
                                    world * num_batches * batch_size)
    assert float(trainer.callback_metrics["noise/b_simple"]) == pytest.approx(expected.b_simple, rel=1e-4)
