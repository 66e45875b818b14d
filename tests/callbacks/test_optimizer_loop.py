"""Every registry optimizer in a plain user LightningModule trains as the hand-written reference loop.

The reference is a plain PyTorch loop that does by hand what each method needs (a ``create_graph``
backward, BatchNorm statistics frozen after the first closure evaluation of a step, SVRG's full-gradient
snapshot, K-FAC's Monte-Carlo Fisher sampled from the logits). The Lightning runs get it from
``OptimizerLoopAdapter``: attached by the package's entry point (nothing in the module but
``configure_optimizers``), by one line on the Trainer, or by ``ClassifierModule``'s ``configure_callbacks``;
without it, an optimizer that needs it refuses at its first step, naming itself and the line.
"""

from __future__ import annotations

import importlib.metadata
from contextlib import nullcontext
from pathlib import Path

import pytest
import tomllib
import torch
import torch.nn.functional as F
from _support import UserClassifier, quiet_trainer
from lightning.fabric.utilities import registry as fabric_registry
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks import OptimizerLoopAdapter
from lightning_optsurvey.optim import available_optimizers, create_optimizer, get_spec
from lightning_optsurvey.optim.loop import frozen_batchnorm_stats, loop_needs
from lightning_optsurvey.tasks import ClassifierModule

BATCH, STEPS = 12, 4
GROUP = "lightning.pytorch.callbacks_factory"
#: (registry name, hyperparameters): every entry, and K-FAC's Monte-Carlo Fisher besides its default.
CASES = [(name, {}) for name in available_optimizers()] + [("kfac", {"fisher": "mc", "stat_every": 1})]
IDS = [name if not kw else f"{name}-mc" for name, kw in CASES]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH * STEPS, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH * STEPS,), generator=gen)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data()), batch_size=BATCH)


class UserModule(UserClassifier):
    """What a user writes: a network, a loss, a log call, and a registry optimizer."""

    def __init__(self, name: str, **hparams) -> None:
        super().__init__()
        self.net = _cnn()
        self.name, self.hparams_ = name, hparams
        self.logged: list[float] = []

    def log(self, name, value, *args, **kwargs):  # what Lightning's logging receives
        if name == "train/loss":
            self.logged.append(float(value.detach()))
        super().log(name, value, *args, **kwargs)

    def configure_optimizers(self):
        return create_optimizer(self.name, self.parameters(), model=self, **self.hparams_)


class _SeedEachStep(Callback):
    """Seeds the global RNG before every step (AdaHessian's and Sophia-H's probes use it)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + batch_idx)


def reference(name: str, **hparams) -> tuple[nn.Module, list[float]]:
    """The plain PyTorch loop: what each method needs, written out by hand."""
    net = _cnn()
    spec = get_spec(name)
    opt = create_optimizer(name, net.parameters(), model=net, **hparams)
    x_all, y_all = _data()
    batches = list(zip(x_all.split(BATCH), y_all.split(BATCH)))
    if "snapshot" in loop_needs(opt):  # SVRG: full gradient over the training set, BatchNorm untouched
        opt.zero_grad()
        with frozen_batchnorm_stats(net):
            for x, y in batches:
                (F.cross_entropy(net(x), y) * (len(x) / len(x_all))).backward()
        opt.snapshot(tag=0)
        opt.zero_grad()
    first_losses: list[float] = []
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(1000 + step)
        evaluations = 0

        def closure(x=x, y=y):
            nonlocal evaluations
            opt.zero_grad()
            with nullcontext() if evaluations == 0 else frozen_batchnorm_stats(net):
                logits = net(x)
            loss = F.cross_entropy(logits, y)
            if evaluations == 0:
                first_losses.append(float(loss))
                if hparams.get("fisher") == "mc":
                    opt.sample_fisher(logits, "categorical")
            loss.backward(create_graph=spec.create_graph)
            evaluations += 1
            return loss.detach()

        opt.step(closure)
    return net, first_losses


@pytest.fixture
def entry_point(monkeypatch):
    """Lightning's external-callback entry points: ours as pyproject.toml declares it, or none."""
    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    value = declared["project"]["entry-points"][GROUP]["optsurvey"]

    def use(installed: bool) -> None:
        points = [importlib.metadata.EntryPoint("optsurvey", value, GROUP)] if installed else []
        monkeypatch.setattr(fabric_registry, "entry_points",
                            lambda group=None, **kw: points if group == GROUP else [])

    return use


def _trainer(**kwargs) -> Trainer:
    callbacks = [_SeedEachStep(), *kwargs.pop("callbacks", [])]
    return quiet_trainer(max_epochs=1, callbacks=callbacks, **kwargs)


def _assert_same_training(name, net: nn.Module, logged: list[float], trainer: Trainer, expected) -> None:
    ref_net, ref_losses = expected
    for (key, got), want in zip(net.state_dict().items(), ref_net.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, k=key: f"{name}: {k}: {m}")
    bn = net[1]
    assert int(bn.num_batches_tracked) == STEPS, f"{name}: BatchNorm updated {int(bn.num_batches_tracked)} times"
    assert logged == ref_losses, f"{name}: logged {logged}, first evaluations {ref_losses}"
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(sum(ref_losses) / STEPS, rel=1e-6)


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=IDS)
def test_plain_module_with_nothing_added_trains_as_the_reference(name, hparams, entry_point):
    entry_point(installed=True)
    module = UserModule(name, **hparams)
    trainer = _trainer()
    trainer.fit(module, _loader())
    assert trainer.global_step == STEPS
    _assert_same_training(name, module.net, module.logged, trainer, reference(name, **hparams))


@pytest.mark.parametrize("name", [n for n, kw in CASES if not kw])
def test_without_the_adapter_an_optimizer_that_needs_it_refuses_at_its_first_step(name, entry_point):
    entry_point(installed=False)
    module = UserModule(name)
    needs = loop_needs(create_optimizer(name, _cnn().parameters(), model=_cnn()))
    if not needs:
        return  # nothing to serve: trains as with the adapter (the test above, for these names)
    with pytest.raises(RuntimeError, match=rf"optimizer '{name}' needs .*callbacks=\[OptimizerLoopAdapter\(\)\]"):
        _trainer(max_steps=1).fit(module, _loader())
    assert int(module.net[1].num_batches_tracked) == 0  # refused before the first forward


def test_one_line_on_the_trainer_and_classifier_module_train_the_same(entry_point):
    entry_point(installed=False)
    for name, hparams in [("sam", {}), ("adahessian", {}), ("svrg", {}), ("kfac", {"fisher": "mc", "stat_every": 1})]:
        expected = reference(name, **hparams)
        module = UserModule(name, **hparams)
        trainer = _trainer(callbacks=[OptimizerLoopAdapter()])
        trainer.fit(module, _loader())
        _assert_same_training(name, module.net, module.logged, trainer, expected)

        classifier = ClassifierModule(_cnn(), optimizer=name, optimizer_kwargs=hparams)
        trainer = _trainer()
        trainer.fit(classifier, _loader())
        for got, want in zip(classifier.net.state_dict().values(), expected[0].state_dict().values()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_two_adapters_serve_once(entry_point):
    entry_point(installed=True)  # one from the entry point, one from the Trainer's list
    module = UserModule("sam")
    trainer = _trainer(callbacks=[OptimizerLoopAdapter()])
    trainer.fit(module, _loader())
    assert sum(isinstance(cb, OptimizerLoopAdapter) for cb in trainer.callbacks) == 2
    _assert_same_training("sam", module.net, module.logged, trainer, reference("sam"))


def test_gradient_accumulation_is_refused_for_repeated_evaluations(entry_point):
    entry_point(installed=True)
    with pytest.raises(ValueError, match=r"'lbfgs'.*accumulate_grad_batches=2"):
        _trainer(accumulate_grad_batches=2).fit(UserModule("lbfgs"), _loader())


def test_a_backward_override_dropping_create_graph_is_named(entry_point):
    entry_point(installed=True)

    class DropsKeywords(UserModule):
        def backward(self, loss, *args, **kwargs):
            loss.backward()

    with pytest.raises(RuntimeError, match=r"'sophiah' needs the backward pass to keep its graph.*DropsKeywords"):
        _trainer(max_steps=1).fit(DropsKeywords("sophiah"), _loader())


def test_mc_fisher_without_outputs_to_sample_is_named(entry_point):
    entry_point(installed=True)

    class NoForward(UserModule):  # model=self, but the training step never calls self(x)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    with pytest.raises(RuntimeError, match=r"'kfac' \(fisher='mc'\).*NoForward's forward gave no forward call"):
        _trainer(max_steps=1).fit(NoForward("kfac", fisher="mc"), _loader())


def test_the_adapter_leaves_the_module_as_it_found_it(entry_point):
    entry_point(installed=True)
    module = UserModule("adahessian")
    _trainer(max_steps=2).fit(module, _loader())
    assert "backward" not in vars(module) and "log" not in vars(module) and "log_dict" not in vars(module)
    assert all(m.track_running_stats for m in module.modules() if isinstance(m, nn.BatchNorm2d))


def test_fisher_likelihood_is_checked():
    with pytest.raises(ValueError, match="fisher_likelihood"):
        OptimizerLoopAdapter(fisher_likelihood="bernoulli")


def test_the_readme_example_trains_every_method_it_names(entry_point):
    import re

    entry_point(installed=True)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = re.search(r"### Registry optimizers in your module\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "max_epochs=2" in code
    code = code.replace("max_epochs=2", "max_epochs=1, limit_train_batches=2, limit_val_batches=1, "
                                        "enable_progress_bar=False, enable_model_summary=False")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


class _Attention(LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.name = name
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.encoder(x).mean(1)), y)

    def configure_optimizers(self):
        return create_optimizer(self.name, self.parameters(), model=self)


@pytest.mark.parametrize("name", ["adahessian", "sophiah"])
def test_second_order_optimizers_train_an_attention_module(name):
    """create_graph differentiates the backward: SDPA's fused CPU kernel has no double backward, so the batch
    runs through the math kernel (and the encoder's fast path is off) while it trains, and only then."""
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 5, 8, generator=gen), torch.randint(2, (16,), generator=gen))
    module = _Attention(name)
    before = [p.detach().clone() for p in module.parameters()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False).fit(module, DataLoader(data, batch_size=8))
    after = list(module.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(p, q) for p, q in zip(after, before))
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
