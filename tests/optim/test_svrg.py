"""SVRG: the variance-reduced direction, snapshot-every-step = full-batch GD, the Lightning snapshot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _support import make_closure
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks import OptimizerLoopAdapter, SVRGSnapshot
from lightning_optsurvey.optim import SVRG
from lightning_optsurvey.tasks import ClassifierModule

DTYPE = torch.float64
TOL = 1e-12


def _data(n: int = 40, d: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    y = x @ torch.randn(d, generator=gen, dtype=DTYPE) + 0.1 * torch.randn(n, generator=gen, dtype=DTYPE)
    return x, y


def _loss(w, x, y):
    return 0.5 * (x @ w - y).pow(2).mean()


def _full_gradient(w, x, y):
    return x.T @ (x @ w - y) / len(x)


def _closure(opt, w, x, y):
    return make_closure(opt, lambda: _loss(w, x, y))


def _snapshot(opt, w, x, y):
    opt.zero_grad()
    _loss(w, x, y).backward()  # full gradient into .grad
    opt.snapshot()
    opt.zero_grad()


def test_direction_is_the_variance_reduced_gradient():
    x, y = _data()
    w_tilde = torch.randn(5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    w = nn.Parameter(w_tilde.clone())
    opt = SVRG([w], lr=0.1)
    _snapshot(opt, w, x, y)
    opt.step(_closure(opt, w, x, y))  # one full-batch step away from the snapshot
    w1 = w.detach().clone()
    batch = slice(3, 11)
    opt.step(_closure(opt, w, x[batch], y[batch]))
    mu = _full_gradient(w_tilde, x, y)
    v = _full_gradient(w1, x[batch], y[batch]) - _full_gradient(w_tilde, x[batch], y[batch]) + mu
    torch.testing.assert_close(w.detach(), w1 - 0.1 * v, rtol=0, atol=TOL)


def test_snapshot_every_step_is_full_batch_gradient_descent():
    x, y = _data(seed=2)
    w = nn.Parameter(torch.zeros(5, dtype=DTYPE))
    gd = torch.zeros(5, dtype=DTYPE)
    opt = SVRG([w], lr=0.2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        _snapshot(opt, w, x, y)
        idx = torch.randperm(len(x), generator=gen)[:8]  # any mini-batch: its two gradients cancel
        opt.step(_closure(opt, w, x[idx], y[idx]))
        gd = gd - 0.2 * _full_gradient(gd, x, y)
        torch.testing.assert_close(w.detach(), gd, rtol=0, atol=TOL)


def test_before_the_first_snapshot_the_step_is_sgd():
    x, y = _data()
    w1, w2 = nn.Parameter(torch.zeros(5, dtype=DTYPE)), nn.Parameter(torch.zeros(5, dtype=DTYPE))
    svrg, sgd = SVRG([w1], lr=0.1, momentum=0.5), torch.optim.SGD([w2], lr=0.1, momentum=0.5)
    for _ in range(3):
        svrg.step(_closure(svrg, w1, x, y))
        sgd.step(_closure(sgd, w2, x, y))
    assert torch.equal(w1, w2)


def test_second_evaluation_replays_the_dropout_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    x, y = _data()
    opt = SVRG(net.parameters(), lr=0.1)

    def loss_fn(xb, yb):
        return 0.5 * (net(xb).squeeze(1) - yb).pow(2).mean()

    opt.zero_grad()
    net.eval()
    loss_fn(x, y).backward()
    net.train()
    opt.snapshot()
    full = [opt.state[p]["full_grad"].clone() for p in net.parameters()]
    before = [p.detach().clone() for p in net.parameters()]

    # w == snapshot: with the same masks the mini-batch terms cancel exactly
    opt.step(make_closure(opt, lambda: loss_fn(x[:8], y[:8])))
    for p, b, g in zip(net.parameters(), before, full):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=0, atol=TOL)


def _digits_like(n: int = 96, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_classifier_module_adds_the_snapshot_callback_and_it_takes_the_full_gradient():
    torch.manual_seed(0)
    x, y = _digits_like()
    module = ClassifierModule("mlp", optimizer="svrg")
    initial = [p.detach().clone() for p in module.net.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert any(isinstance(cb, OptimizerLoopAdapter) for cb in trainer.callbacks)
    opt = trainer.optimizers[0]
    assert opt.snapshot_tag == 0
    reference = ClassifierModule("mlp", optimizer="svrg")
    reference.net.load_state_dict({k: v for k, v in zip(reference.net.state_dict(), initial)})
    F.cross_entropy(reference.net(x), y).backward()  # one batch over the whole training set
    for p, q, p0 in zip(module.net.parameters(), reference.net.parameters(), initial):
        torch.testing.assert_close(opt.state[p]["snapshot"], p0, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["full_grad"], q.grad, rtol=1e-5, atol=1e-7)


def test_snapshot_callback_needs_an_svrg_optimizer():
    x, y = _digits_like()
    module = ClassifierModule("mlp", optimizer="sgd")
    trainer = Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[SVRGSnapshot()])
    with pytest.raises(ValueError, match="SVRG"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    with pytest.raises(ValueError, match="every_n_epochs"):
        SVRGSnapshot(every_n_epochs=0)


class _RecordingClassifier(ClassifierModule):
    def __init__(self) -> None:
        super().__init__("mlp", optimizer="svrg")
        self.dataloader_indices: list[int] = []

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.dataloader_indices.append(dataloader_idx)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


def test_snapshot_pass_moves_batches_as_from_the_single_train_loader():
    # The third argument of transfer_batch_to_device is the dataloader index (0 for the one train
    # loader), not the batch index: a module that dispatches on it must see 0 for every snapshot batch.
    x, y = _digits_like()
    module = _RecordingClassifier()
    trainer = Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    assert len(module.dataloader_indices) == len(x) // 32 + 1  # snapshot batches + one training batch
    assert set(module.dataloader_indices) == {0}


def test_a_group_added_after_the_snapshot_takes_sgd_steps_until_the_next_one():
    # e.g. Lightning's BaseFinetuning unfreezes layers mid-epoch with add_param_group.
    x, y = _data()
    w_tilde = torch.randn(5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    w, u = nn.Parameter(w_tilde.clone()), nn.Parameter(torch.ones(3, dtype=DTYPE))
    target = torch.arange(3, dtype=DTYPE)
    opt = SVRG([w], lr=0.1)
    _snapshot(opt, w, x, y)
    opt.add_param_group({"params": [u], "lr": 0.5})
    batch = slice(3, 11)

    u0 = u.detach().clone()
    opt.step(make_closure(opt, lambda: _loss(w, x[batch], y[batch]) + 0.5 * (u - target).pow(2).sum()))
    # w: at the snapshot the variance-reduced direction is the full gradient; u: a plain SGD step.
    torch.testing.assert_close(w.detach(), w_tilde - 0.1 * _full_gradient(w_tilde, x, y), rtol=0, atol=TOL)
    torch.testing.assert_close(u.detach(), u0 - 0.5 * (u0 - target), rtol=0, atol=TOL)
