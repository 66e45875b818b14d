"""The digits task: splits, standardization, models and the classifier module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule, available_models, build_model


def test_splits_are_stratified_and_complete():
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.2, seed=3)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == len(load_digits().target) == 1797
    assert sizes[1] == pytest.approx(0.2 * 1797, abs=2) and sizes[2] == pytest.approx(0.2 * 1797, abs=2)
    total = torch.bincount(torch.as_tensor(load_digits().target), minlength=10).double() / 1797
    for subset in (dm.train_set, dm.val_set, dm.test_set):
        freq = torch.bincount(subset.tensors[1], minlength=10).double() / len(subset)
        assert torch.allclose(freq, total, atol=0.01)


def test_standardization_is_fitted_on_train_only():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    train = dm.train_set.tensors[0].reshape(len(dm.train_set), -1).double()
    varying = train.std(0) > 0
    assert torch.allclose(train.mean(0), torch.zeros(64, dtype=torch.double), atol=1e-5)
    assert torch.allclose(train.std(0, unbiased=False)[varying], torch.ones(int(varying.sum()), dtype=torch.double),
                          atol=1e-5)
    val = dm.val_set.tensors[0].reshape(len(dm.val_set), -1).double()
    assert not torch.allclose(val.mean(0), torch.zeros(64, dtype=torch.double), atol=1e-3)


def test_loader_shapes_and_seeded_order():
    a, b = DigitsDataModule(batch_size=16, seed=1), DigitsDataModule(batch_size=16, seed=1)
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    assert xa.shape == (16, 1, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.long
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batch_size": 0}, "batch_size"), ({"val_fraction": 1.5}, "val_fraction"),
     ({"test_fraction": 0.0}, "test_fraction"), ({"val_fraction": 0.5, "test_fraction": 0.45}, "at least 10%"),
     ({"num_workers": -1}, "num_workers"), ({"seed": -1}, "seed")],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize("name", available_models())
def test_models_build_and_map_images_to_logits(name):
    model = build_model(name, num_classes=7)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 7)


def test_cnn_size_is_lenet_scale():
    n = sum(p.numel() for p in build_model("cnn").parameters())
    assert 40_000 <= n <= 60_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("cnn_bn").modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in build_model("mlp_dropout").modules())


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="known models: .*cnn"):
        build_model("resnet999")


def test_classifier_learns_digits_and_logs_its_metrics(quiet_trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = ClassifierModule("cnn", "adam")
    trainer = L.Trainer(max_epochs=3, **quiet_trainer_kwargs)
    trainer.fit(module, DigitsDataModule())
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    assert float(metrics["val/acc"]) > 0.85
    test_metrics = trainer.test(module, DigitsDataModule(), verbose=False)[0]
    assert test_metrics["test/acc"] > 0.85
    assert module.hparams["optimizer"] == "adam"


def test_classifier_rejects_unknown_names_early():
    with pytest.raises(ValueError, match="known optimizers"):
        ClassifierModule(optimizer="nosuch")
    with pytest.raises(TypeError, match="does not take"):
        ClassifierModule(optimizer="adam", optimizer_kwargs={"lrr": 0.1})
    with pytest.raises(ValueError, match="lr_scheduler"):
        ClassifierModule(lr_scheduler="warp")


@pytest.mark.parametrize("optimizer, kwargs", [("adam", {"lr": -1.0}), ("sam", {"rho": -0.1}),
                                               ("kfac", {"damping": -1.0})])
def test_classifier_rejects_bad_optimizer_values_at_construction(optimizer, kwargs):
    # A bad value must fail in __init__ (like a bad name), not minutes later in configure_optimizers.
    with pytest.raises(ValueError):
        ClassifierModule("mlp", optimizer=optimizer, optimizer_kwargs=kwargs)


def test_classifier_construction_check_leaves_the_network_alone():
    # K-FAC hooks its layers when built: the construction-time check must not leave hooks on our network.
    module = ClassifierModule("mlp", optimizer="kfac")
    assert all(not m._forward_hooks for m in module.net.modules())


def test_classifier_rejects_scheduler_keywords_it_would_ignore():
    # A misspelt scheduler keyword used to be silently dropped (the default step_size was used instead).
    with pytest.raises(TypeError, match="stepsize.*step_size"):
        ClassifierModule("mlp", lr_scheduler="step", lr_scheduler_kwargs={"stepsize": 5})
    with pytest.raises(TypeError, match="T_max"):
        ClassifierModule("mlp", lr_scheduler="exponential", lr_scheduler_kwargs={"T_max": 5})
    with pytest.raises(TypeError, match="lr_scheduler=None"):
        ClassifierModule("mlp", lr_scheduler_kwargs={"gamma": 0.5})


def test_classifier_builds_the_scheduler_it_was_given():
    module = ClassifierModule("mlp", optimizer="sgd", lr_scheduler="step",
                              lr_scheduler_kwargs={"step_size": 2, "gamma": 0.5})
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma) == (2, 0.5)
    assert config["lr_scheduler"]["interval"] == "epoch"
