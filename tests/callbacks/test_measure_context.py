"""The side-effect-free measuring context, the fixed measurement subset and the cadence."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks._measure import Cadence, draw_batches, measuring, unwrap_module


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.3), nn.Linear(4, 2))


def _snapshot(net: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()},
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
        "modes": [m.training for m in net.modules()],
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["requires_grad"] == b["requires_grad"]
    assert a["modes"] == b["modes"]
    for key in ("params", "buffers"):
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)
    for n in a["grads"]:
        assert (a["grads"][n] is None) == (b["grads"][n] is None), n
        if a["grads"][n] is not None:
            assert torch.equal(a["grads"][n], b["grads"][n]), n


def _disturb(net: nn.Module) -> None:
    """Everything a careless measurement could do."""
    net.eval()
    net[1].train()
    net(torch.randn(5, 3)).sum().backward()  # accumulates into .grad, updates BN running stats
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[0].weight.requires_grad_(False)
    net[4].bias = nn.Parameter(torch.zeros(2))  # replaces a parameter object
    torch.rand(3)
    random.random()
    np.random.rand()


@pytest.mark.parametrize("had_grads", [False, True])
def test_everything_is_restored_in_place(had_grads):
    net = _net().train()
    if had_grads:
        net(torch.randn(6, 3)).sum().backward()
    net.eval()
    net[3].train()
    before = _snapshot(net)
    objects = [p for p in net.parameters()] + [b for b in net.buffers()]
    grad_objects = [p.grad for p in net.parameters()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with measuring(net) as measured:
        assert measured is net
        _disturb(measured)
    _assert_same(before, _snapshot(net))
    assert all(a is b for a, b in zip(objects, [p for p in net.parameters()] + [b for b in net.buffers()]))
    assert all(a is b for a, b in zip(grad_objects, [p.grad for p in net.parameters()]))
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


def test_restored_after_an_exception():
    net = _net()
    before = _snapshot(net)
    with pytest.raises(RuntimeError, match="boom"), measuring(net):
        _disturb(net)
        raise RuntimeError("boom")
    _assert_same(before, _snapshot(net))


def test_grad_enabled_inside_inference_mode_no_grad_and_autocast():
    net = _net()
    x = torch.randn(4, 3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with measuring(net):
            assert torch.is_grad_enabled()
            assert not torch.is_inference_mode_enabled()
            assert not torch.is_autocast_enabled("cpu")
            out = net(x.clone())
            assert out.dtype == torch.float32
            (g,) = torch.autograd.grad(out.sum(), [net[0].weight])
            assert g.shape == net[0].weight.shape
        assert torch.is_inference_mode_enabled()
        assert torch.is_autocast_enabled("cpu")


def test_unwrap_module_sees_through_wrappers():
    net = _net()
    assert unwrap_module(nn.DataParallel(net)) is net
    assert unwrap_module(net) is net


def _dataset(n: int = 50) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def test_draw_batches_never_touches_the_train_loader_and_is_reproducible():
    dataset = _dataset()
    loader_gen = torch.Generator().manual_seed(123)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=loader_gen)
    state = loader_gen.get_state()
    a, b = (
        draw_batches(loader.dataset, 3, 8, generator=torch.Generator().manual_seed(0),
                     collate_fn=loader.collate_fn)
        for _ in range(2)
    )
    assert torch.equal(loader_gen.get_state(), state)
    assert [x.shape[0] for x, _ in a] == [8, 8, 8]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    labels = torch.cat([y for _, y in a])
    assert len(set(labels.tolist())) == 24  # without replacement
    assert not torch.equal(labels, torch.arange(24))  # shuffled, not the first samples


def test_draw_batches_shards_are_disjoint_and_usable_after_inference_mode():
    dataset = _dataset(40)
    with torch.inference_mode():
        shards = [
            draw_batches(dataset, 2, 5, generator=torch.Generator().manual_seed(1), rank=r, world_size=3)
            for r in range(3)
        ]
    labels = [set(torch.cat([y for _, y in s]).tolist()) for s in shards]
    assert all(len(s) == 10 for s in labels)
    assert not (labels[0] & labels[1]) and not (labels[1] & labels[2]) and not (labels[0] & labels[2])
    x = shards[0][0][0]
    assert not x.is_inference()
    w = torch.ones(1, requires_grad=True)
    (x * w).sum().backward()  # an inference tensor could not be saved for backward


def test_draw_batches_small_dataset_and_bad_counts():
    assert sum(len(y) for _, y in draw_batches(_dataset(5), 4, 2, generator=torch.Generator())) == 5
    with pytest.raises(ValueError, match="num_batches"):
        draw_batches(_dataset(), 0, 2, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        draw_batches(_dataset(), 1, -1, generator=torch.Generator())
    with pytest.raises(ValueError, match="rank"):
        draw_batches(_dataset(), 1, 2, generator=torch.Generator(), rank=2, world_size=2)


def test_cadence():
    c = Cadence(every_n_epochs=2, every_n_steps=3)
    assert [e for e in range(6) if c.due_at_epoch_end(e)] == [1, 3, 5]
    assert [s for s in range(10) if c.due_at_step(s)] == [3, 6, 9]
    assert not Cadence(every_n_epochs=None, every_n_steps=1).due_at_epoch_end(0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_epochs"):
            Cadence(every_n_epochs=bad)
        with pytest.raises(ValueError, match="every_n_steps"):
            Cadence(every_n_steps=bad)
    with pytest.raises(ValueError, match="both None"):
        Cadence(every_n_epochs=None, every_n_steps=None)


class _Disturber:
    """A measurement that does everything it should not, through the base class's context."""

    @staticmethod
    def make(**kwargs):
        from lightning_optsurvey.callbacks import MeasuringCallback

        class Disturber(MeasuringCallback):
            def measure(self, trainer, pl_module, batches):
                pl_module.train()
                x, y = batches[0]
                loss = torch.nn.functional.cross_entropy(pl_module(x), y)
                loss.backward()  # .grad and BN running statistics change
                with torch.no_grad():
                    for p in pl_module.parameters():
                        p.mul_(0.5)
                torch.rand(2)  # global RNG consumed
                return {"disturb/loss": loss.detach()}

        return Disturber(**kwargs)


def _fit(callbacks, model: str, optimizer: str, trainer_kwargs: dict):
    from lightning.pytorch import Trainer, seed_everything

    from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

    seed_everything(0, verbose=False)
    module = ClassifierModule(model, optimizer, {"lr": 0.05} if optimizer == "sgd" else {"lr": 1e-3})
    trainer = Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, callbacks=callbacks,
                      **trainer_kwargs)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return module


def test_measuring_callback_does_not_perturb_training(quiet_trainer_kwargs):
    cb = _Disturber.make(every_n_epochs=1, every_n_steps=3, num_batches=2)
    with_cb = _fit([cb], "cnn_bn", "sgd", quiet_trainer_kwargs)
    without = _fit([], "cnn_bn", "sgd", quiet_trainer_kwargs)
    for (n, a), b in zip(with_cb.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), n
    # steps 3 and 6, plus the ends of epochs 0 and 1 (steps 4 and 8)
    assert [int(h["step"]) for h in cb.history] == [3, 4, 6, 8]
    assert all(np.isfinite(h["disturb/loss"]) for h in cb.history)


def _every_measuring_callback() -> list:
    from lightning_optsurvey import callbacks as cbs

    return [cbs.HessianSpectrum(top_k=2, trace=True), cbs.Sharpness(), cbs.GeneralizationGap(),
            cbs.GradientNoiseScale(), cbs.EdgeOfStability(), cbs.LossLandscape(), cbs.GeneralizationMeasures()]


@pytest.mark.parametrize("index", range(7))
def test_every_measuring_callback_survives_ddp_spawn_pickling(index):
    """ddp_spawn pickles the callbacks with torch.multiprocessing's pickler: each must come back equal, and
    any generator it keeps must continue the very same stream of draws (not restart, not be shared)."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # registers torch's tensor reductions on ForkingPickler)

    callback = _every_measuring_callback()[index]
    generators = {k: v for k, v in vars(callback).items() if isinstance(v, torch.Generator)}
    for g in generators.values():
        torch.rand(5, generator=g)  # mid-stream, not at the seed
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(callback)
    copy = pickle.loads(buffer.getvalue())
    assert type(copy) is type(callback)
    assert copy.state_key == callback.state_key
    torch.testing.assert_close(copy.state_dict(), callback.state_dict(), rtol=0, atol=0)
    assert set(vars(copy)) == set(vars(callback))
    for name, g in generators.items():
        twin = getattr(copy, name)
        assert isinstance(twin, torch.Generator) and twin is not g
        assert torch.equal(torch.rand(7, generator=twin), torch.rand(7, generator=g))


def test_draw_batches_names_the_dataset_size_when_a_rank_gets_nothing():
    """Two samples over three ranks: rank 2 gets none, and the error says the dataset has 2 (not 0)."""
    with pytest.raises(ValueError, match=r"rank 2 got no samples from a dataset of 2 .*world_size=3"):
        draw_batches(_dataset(2), 1, 1, generator=torch.Generator(), rank=2, world_size=3)
