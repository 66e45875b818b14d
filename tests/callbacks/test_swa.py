"""SWA: the average of the end-of-epoch iterates, BatchNorm recomputed as torch's update_bn does, for every
registry optimizer in a plain user module, beside a measuring callback that then measures the average."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks import SWA, HessianSpectrum, OptimizerLoopAdapter
from lightning_optsurvey.callbacks._measure import measuring
from lightning_optsurvey.optim import available_optimizers, create_optimizer

EPOCHS, START = 3, 1
#: The methods whose loop needs could interfere (closures, create_graph, snapshots, hooks) and a plain one.
DEFAULT = ["sgd", "sam", "adahessian", "lbfgs", "svrg", "kfac"]


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=12)


class UserModule(LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
        self.name = name

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return create_optimizer(self.name, self.parameters(), model=self)


class _Iterates(Callback):
    """Records the parameters at every epoch end (placed before SWA, so before it averages them)."""

    def __init__(self) -> None:
        self.iterates: list[list[torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.iterates.append([p.detach().clone() for p in pl_module.parameters()])


def _fit(name: str, *callbacks: Callback) -> tuple[UserModule, _Iterates, SWA, Trainer]:
    iterates, swa = _Iterates(), SWA(swa_epoch_start=START)
    trainer = Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[iterates, *callbacks, OptimizerLoopAdapter(), swa])
    module = UserModule(name)
    trainer.fit(module, _loader())
    return module, iterates, swa, trainer


def _check_average(name: str, module: UserModule, iterates: _Iterates, swa: SWA) -> None:
    assert swa.num_averaged == EPOCHS - START
    averaged = [torch.stack(ps).mean(0) for ps in zip(*iterates.iterates[START:])]
    for got, want in zip(module.parameters(), averaged):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # BatchNorm statistics: torch's own update_bn on a network holding the averaged weights.
    reference = copy.deepcopy(module.net)
    update_bn([(x,) for x, _ in _loader()], reference)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(module.net.state_dict()[key], reference.state_dict()[key], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, k=key: f"{name}: {k}: {m}")


@pytest.mark.parametrize("name", DEFAULT)
def test_swa_averages_end_of_epoch_iterates_and_recomputes_batchnorm(name):
    module, iterates, swa, _ = _fit(name)
    _check_average(name, module, iterates, swa)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in available_optimizers() if n not in DEFAULT])
def test_swa_with_every_other_registry_optimizer(name):
    module, iterates, swa, _ = _fit(name)
    _check_average(name, module, iterates, swa)


def test_a_measuring_callback_measures_the_averaged_model_under_swa_prefix():
    hessian = HessianSpectrum(top_k=1, num_batches=1)
    module, _, _, trainer = _fit("sam", hessian)
    assert "hessian/eig_1" in trainer.callback_metrics  # the iterate, every epoch
    logged = float(trainer.callback_metrics["swa/hessian/eig_1"])
    with measuring(module) as unwrapped:  # the same measurement, now, on the module holding the average
        again = hessian.measure(trainer, unwrapped, hessian.measurement_batches(trainer, unwrapped))
    assert logged == pytest.approx(float(again["hessian/eig_1"]), rel=1e-4)


def test_validation_sees_the_iterate_before_averaging_and_the_average_after():
    seen: list[torch.Tensor] = []

    class Recording(UserModule):
        def validation_step(self, batch, batch_idx):
            seen.append(self.net[4].weight.detach().clone())

    iterates, swa = _Iterates(), SWA(swa_epoch_start=START)
    trainer = Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[iterates, OptimizerLoopAdapter(), swa])
    loader = _loader()
    trainer.fit(Recording("sgd"), loader, DataLoader(loader.dataset, batch_size=24))
    # Validation runs before on_train_epoch_end: epoch e validates the average of epochs START..e-1.
    torch.testing.assert_close(seen[0], iterates.iterates[0][-2])  # epoch 0: not averaged yet
    torch.testing.assert_close(seen[2], torch.stack([it[-2] for it in iterates.iterates[START:2]]).mean(0))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"swa_epoch_start": -1}, ValueError, "swa_epoch_start"), ({"swa_epoch_start": 1.5}, ValueError, "swa_epoch_start"),
    ({"swa_epoch_start": True}, TypeError, "swa_epoch_start"), ({"swa_epoch_start": "1"}, TypeError, "swa_epoch_start"),
    ({"swa_lr": 0.0}, ValueError, "swa_lr"), ({"swa_lr": float("nan")}, ValueError, "swa_lr"),
    ({"measure_average": 1}, TypeError, "measure_average"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        SWA(**kwargs)


def test_swa_lr_holds_the_learning_rate_from_the_start_epoch():
    lrs: list[float] = []

    class Lr(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[Lr(), OptimizerLoopAdapter(), SWA(swa_epoch_start=START, swa_lr=0.0123)])
    trainer.fit(UserModule("momentum"), _loader())
    assert lrs[0] != 0.0123 and lrs[START:] == [0.0123] * (EPOCHS - START)


def test_recomputing_batchnorm_leaves_the_loaders_generators_alone():
    from lightning_optsurvey.callbacks.swa import recompute_batchnorm

    generator, sampler_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    dataset = _loader().dataset
    loader = DataLoader(dataset, batch_size=12, generator=generator,
                        sampler=torch.utils.data.RandomSampler(dataset, generator=sampler_generator))
    states = generator.get_state(), sampler_generator.get_state()
    assert recompute_batchnorm(UserModule("sgd"), loader) == 2
    assert torch.equal(generator.get_state(), states[0]) and torch.equal(sampler_generator.get_state(), states[1])
