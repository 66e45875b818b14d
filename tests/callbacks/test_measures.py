"""The measuring callbacks of issue 4: non-perturbation, resume, bad arguments, and logged values
checked against the functional measures and closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _support import PlainModule
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.callbacks import (
    EdgeOfStability,
    GeneralizationGap,
    GeneralizationMeasures,
    GradientNoiseScale,
    LossLandscape,
    Sharpness,
)
from lightning_optsurvey.callbacks.stability import stability_scaling
from lightning_optsurvey.measures import distance_from_init, gradient_noise_scale, sam_sharpness
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

FLOAT_RTOL = 1e-5  # float32 model, values recomputed in a different order
LANCZOS_RTOL = 1e-3  # the callback's Lanczos tolerance


def fast_callbacks() -> dict[str, object]:
    """Every callback, configured small enough for CPU tests."""
    return {
        "sharpness": Sharpness(kinds=("sam", "adaptive_worst_case", "average", "keskar"), steps=2, num_samples=2,
                               num_batches=1),
        "gap": GeneralizationGap(num_train_batches=2),
        "noise": GradientNoiseScale(num_batches=2),
        "stability": EdgeOfStability(num_batches=1, tol=1e-2),
        "landscape": LossLandscape(kind="2d", directions="init_to_final", resolution=3, num_batches=1,
                                   at="epoch_end"),
        "measures": GeneralizationMeasures(num_batches=1),
    }


def fit(model_name: str, callbacks: list, tmp_path, optimizer: str = "sgd", epochs: int = 2, **kwargs):
    torch.manual_seed(0)
    module = ClassifierModule(model=model_name, optimizer=optimizer,
                              optimizer_kwargs={"lr": 0.05, "momentum": 0.9} if optimizer == "sgd" else {"lr": 1e-3})
    options = {"enable_checkpointing": False, **kwargs}
    trainer = Trainer(
        accelerator="cpu", max_epochs=epochs, limit_train_batches=3, limit_val_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        default_root_dir=tmp_path, callbacks=callbacks, **options,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    return module, trainer


_BASELINES: dict[str, dict[str, torch.Tensor]] = {}


def baseline(model_name: str, tmp_path) -> dict[str, torch.Tensor]:
    if model_name not in _BASELINES:
        module, _ = fit(model_name, [], tmp_path)
        _BASELINES[model_name] = {k: v.clone() for k, v in module.state_dict().items()}
    return _BASELINES[model_name]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", list(fast_callbacks()))
def test_training_is_bitwise_identical_with_each_callback(name, tmp_path):
    callback = fast_callbacks()[name]
    module, _trainer = fit("cnn_bn", [callback], tmp_path)
    assert_bitwise_equal(module.state_dict(), baseline("cnn_bn", tmp_path))
    assert len(callback.history) == 2  # measured after each epoch
    assert all(math.isfinite(v) for h in callback.history for v in h.values())


def test_training_is_bitwise_identical_with_all_callbacks_and_dropout(tmp_path):
    callbacks = list(fast_callbacks().values())
    module, trainer = fit("mlp_dropout", callbacks, tmp_path)
    assert_bitwise_equal(module.state_dict(), baseline("mlp_dropout", tmp_path))
    for name in ("sharpness/sam", "sharpness/adaptive_worst_case", "gen_gap/loss", "gen_gap/acc",
                 "train_eval/loss", "train_eval/acc", "noise/b_simple", "stability/sharpness_x_lr",
                 "stability/threshold", "measures/path_norm", "measures/fisher_rao", "landscape/center_loss"):
        assert name in trainer.callback_metrics, name
    assert float(trainer.callback_metrics["stability/threshold"]) == pytest.approx(2 + 2 * 0.9)


def test_sharpness_callback_logs_the_functional_value(tmp_path):
    cb = Sharpness(kinds=("sam", "worst_case"), rho=0.05, steps=3, num_batches=2)
    module, _trainer = fit("cnn", [cb], tmp_path, epochs=1)
    module.eval()
    expected = sam_sharpness(module, F.cross_entropy, cb._batches, rho=0.05)
    assert cb.history[-1]["sharpness/sam"] == pytest.approx(expected, rel=FLOAT_RTOL)
    assert cb.history[-1]["sharpness/sam"] <= cb.history[-1]["sharpness/worst_case"]


class Memorizer(nn.Module):
    """Predicts the label of a training image it has seen (logit 20), and uniform logits otherwise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images.flatten(1))
        self.register_buffer("labels", labels)
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist, idx = torch.cdist(x.flatten(1), self.images, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
        seen = (dist < 1e-4).float().unsqueeze(1)
        return self.scale * seen * F.one_hot(self.labels[idx], 10).float()


def test_generalization_gap_subsets_sized_by_their_stated_standard_error(tmp_path):
    """stderr=0.1 asks for ceil(1/(4 * 0.01)) = 25 samples a side: one batch of 32 of the training set (the subset
    num_train_batches=1 draws with the same seed) and one of the validation set, fixed across measurements. The
    module's compute_loss path (one forward per batch, outputs caught by a hook) logs exactly what the loss_fn
    path logs."""
    sized = GeneralizationGap(stderr=0.1, every_n_steps=1)
    counted = GeneralizationGap(num_train_batches=1)
    # every_n_steps=100 never comes in this run; it only tells the two state keys apart
    pair = GeneralizationGap(num_train_batches=1, loss_fn=F.cross_entropy, every_n_steps=100)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[sized, counted, pair], default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(model="mlp", optimizer="sgd"), datamodule=DigitsDataModule(batch_size=32))
    assert len(sized._batches) == 1 and len(sized._val_batches) == 1 and len(sized._val_batches[0][1]) == 32
    assert counted.history == pair.history and len(counted.history) == 1
    train_side = ("train_eval/loss", "train_eval/acc")
    assert {k: sized.history[-1][k] for k in train_side} == {k: counted.history[-1][k] for k in train_side}
    val_ids = [id(b) for b in sized._val_batches]
    sized.run_measurement(trainer, trainer.lightning_module)
    assert [id(b) for b in sized._val_batches] == val_ids  # drawn once
    with pytest.raises(ValueError, match="not both"):
        GeneralizationGap(num_train_batches=2, stderr=0.1)
    with pytest.raises(ValueError, match="stderr"):
        GeneralizationGap(stderr=0.6)


def test_generalization_gap_of_a_memorizing_model(tmp_path):
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    images, labels = dm.train_set.tensors
    module = ClassifierModule(model=Memorizer(images, labels), optimizer="sgd", optimizer_kwargs={"lr": 0.0})
    cb = GeneralizationGap()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    h = cb.history[-1]
    train_loss = F.cross_entropy(torch.tensor([[20.0] + [0.0] * 9]), torch.tensor([0])).item()
    val_labels = dm.val_set.tensors[1]
    assert h["train_eval/acc"] == 1.0
    assert h["train_eval/loss"] == pytest.approx(train_loss, rel=1e-4)
    # unseen images get uniform logits: loss log 10, and argmax picks class 0
    assert h["gen_gap/loss"] == pytest.approx(math.log(10) - train_loss, rel=1e-5)
    assert h["gen_gap/acc"] == pytest.approx(1.0 - float((val_labels == 0).float().mean()), rel=1e-6)


def test_noise_callback_matches_the_two_batch_estimator(tmp_path):
    cb = GradientNoiseScale(num_batches=3)
    module, _ = fit("mlp", [cb], tmp_path, epochs=1)
    grads = []
    for x, y in cb._batches:
        module.zero_grad()
        F.cross_entropy(module(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]).double())
    g = torch.stack(grads)
    est = gradient_noise_scale(g.pow(2).sum(1).mean(), 32, g.mean(0).pow(2).sum(), 96)
    assert cb.history[-1]["noise/b_simple"] == pytest.approx(est.b_simple, rel=1e-4)


class LinearRegression(PlainModule):
    criterion = staticmethod(F.mse_loss)

    def __init__(self, optimizer: str = "sgd", **opt) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1, bias=False).double()
        self.optimizer, self.opt = optimizer, opt
        self.loss_fn = F.mse_loss

    def configure_optimizers(self):
        cls = torch.optim.SGD if self.optimizer == "sgd" else torch.optim.Adam
        return cls(self.parameters(), **self.opt)


def regression_data() -> tuple[DataLoader, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=torch.float64)
    y = torch.randn(32, 1, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=8), x


@pytest.mark.parametrize(("optimizer", "opt", "threshold"), [
    ("sgd", {"lr": 0.01}, 2.0),
    ("sgd", {"lr": 0.01, "momentum": 0.5}, 3.0),
    ("sgd", {"lr": 0.01, "momentum": 0.5, "nesterov": True}, 1.5),
    ("adam", {"lr": 0.01}, 38.0),
])
def test_edge_of_stability_against_dense_hessian(optimizer, opt, threshold, tmp_path):
    loader, _ = regression_data()
    module = LinearRegression(optimizer, **opt)
    cb = EdgeOfStability(num_batches=4, tol=1e-8)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module, loader)
    x = torch.cat([b[0] for b in cb._batches])
    hessian = 2 * x.T @ x / len(x)  # mse_loss of a linear model
    d, _, _ = stability_scaling(trainer.optimizers[0], [module.net.weight])
    scaled = d.sqrt()[:, None] * hessian * d.sqrt()[None, :]
    expected = float(torch.linalg.eigvalsh(scaled)[-1])
    assert cb.history[-1]["stability/sharpness_x_lr"] == pytest.approx(expected, rel=LANCZOS_RTOL)
    assert cb.history[-1]["stability/threshold"] == pytest.approx(threshold)


def test_stability_scaling_adam_preconditioner():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.99), eps=1e-3)
    for _ in range(3):
        opt.zero_grad()
        (p.pow(3).sum()).backward()
        opt.step()
    v = opt.state[p]["exp_avg_sq"]
    expected = 0.1 / ((1 - 0.8**3) * ((v / (1 - 0.99**3)).sqrt() + 1e-3))
    d, threshold, rule = stability_scaling(opt, [p])
    torch.testing.assert_close(d, expected)
    assert (threshold, rule) == (pytest.approx(3.6 / 0.2), "adam")


def test_edge_of_stability_reuses_hessian_spectrum(tmp_path):
    hessian = pytest.importorskip("lightning_optsurvey.callbacks.hessian")
    loader, _ = regression_data()
    module = LinearRegression("sgd", lr=0.01)
    eos = EdgeOfStability(num_batches=4, tol=1e-8)
    spectrum = hessian.HessianSpectrum(num_batches=4)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[eos, spectrum],
                      default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert eos.reused_spectrum == 1
    assert eos.history[-1]["stability/sharpness_x_lr"] == pytest.approx(
        0.01 * spectrum.history[-1]["hessian/eig_1"], rel=1e-12)


def test_landscape_writes_png_and_json_and_resumes(tmp_path):
    cb = LossLandscape(kind="1d", directions="filter_normalized", resolution=5, num_batches=1)
    fit("cnn", [cb], tmp_path, epochs=1)
    files = sorted(p.name for p in (tmp_path / "landscape").iterdir())
    assert files == ["1d_filter_normalized_epoch_1.json", "1d_filter_normalized_epoch_1.png"]
    grid = json.loads((tmp_path / "landscape" / files[0]).read_text())
    assert len(grid["loss"]) == 5
    assert grid["loss"][2] == pytest.approx(grid["center_loss"], rel=1e-6)  # alpha = 0 is the weights
    state = cb.state_dict()
    fresh = LossLandscape(kind="1d", directions="filter_normalized", resolution=5, num_batches=1)
    fresh.load_state_dict(state)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(cb._random, fresh._random) for k in a)


def test_landscape_goes_to_mlflow_artifacts(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store is enough to see the artifacts

    logger = MLFlowLogger(experiment_name="t", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    cb = LossLandscape(kind="1d", resolution=3, num_batches=1)
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(model="mlp"), datamodule=DigitsDataModule(batch_size=32))
    names = sorted(a.path for a in logger.experiment.list_artifacts(logger.run_id, "landscape"))
    assert names == ["landscape/1d_filter_normalized_epoch_1.json", "landscape/1d_filter_normalized_epoch_1.png"]


def test_generalization_measures_resume_keeps_initial_weights(tmp_path):
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in ClassifierModule(model="cnn").named_parameters()}
    # uninterrupted run
    cb = GeneralizationMeasures(measures=("distance_from_init", "param_norm"), num_batches=1)
    module, _ = fit("cnn", [cb], tmp_path / "a", epochs=2)
    assert cb.history[-1]["measures/distance_from_init"] == pytest.approx(
        distance_from_init(module, initial), rel=FLOAT_RTOL)
    # the same run stopped after one epoch, then resumed from its checkpoint by a fresh callback
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = GeneralizationMeasures(measures=("distance_from_init", "param_norm"), num_batches=1)
    fit("cnn", [first, ckpt], tmp_path / "b", epochs=1, enable_checkpointing=True)
    resumed = GeneralizationMeasures(measures=("distance_from_init", "param_norm"), num_batches=1)
    torch.manual_seed(123)  # the resumed module starts from other weights: the initial ones must come from the ckpt
    module2 = ClassifierModule(model="cnn", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
    trainer = Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                      default_root_dir=tmp_path / "b", callbacks=[resumed])
    trainer.fit(module2, datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [0.0, 1.0]  # the first from the checkpoint
    # (the resumed loader reshuffles from its seed, so the weights differ from run a's; the reference is
    # the distance of the resumed run's final weights from the original initialization)
    assert resumed.history[-1]["measures/distance_from_init"] == pytest.approx(
        distance_from_init(module2, initial), rel=FLOAT_RTOL)


def test_state_keys_differ_by_configuration():
    cached = Sharpness(rho=0.05)
    first = cached.state_key
    cached.rho = 0.1  # the key is kept between reads, never past a change of configuration
    assert cached.state_key != first and cached.state_key == Sharpness(rho=0.1).state_key
    assert Sharpness(rho=0.05).state_key != Sharpness(rho=0.1).state_key
    assert GeneralizationMeasures(measures=("path_norm",)).state_key != GeneralizationMeasures().state_key
    assert LossLandscape(kind="1d").state_key != LossLandscape(kind="2d").state_key


@pytest.mark.parametrize(("factory", "match"), [
    (lambda: Sharpness(kinds=("sam", "nope")), "kinds"),
    (lambda: Sharpness(rho=0), "rho"),
    (lambda: Sharpness(every_n_epochs=0), "every_n_epochs"),
    (lambda: GeneralizationGap(num_train_batches=0), "num_train_batches"),
    (lambda: GradientNoiseScale(num_batches=1), "num_batches"),
    (lambda: EdgeOfStability(tol=2.0), "tol"),
    (lambda: LossLandscape(kind="3d"), "kind"),
    (lambda: LossLandscape(directions="pca"), "directions"),
    (lambda: LossLandscape(resolution=2), "resolution"),
    (lambda: LossLandscape(at="never"), "at"),
    (lambda: GeneralizationMeasures(measures=("vc_dimension",)), "measures"),
    (lambda: LossLandscape(at="epoch_end", every_n_epochs=None), "every_n_epochs must be a positive integer"),
])
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(("factory", "match"), [
    (lambda: Sharpness(kinds="sam"), r"kinds must be a sequence of names, got the string 'sam'; wrap it"),
    (lambda: Sharpness(kinds=[1]), r"kinds must hold names \(strings\) among \('sam'.*got 1 \(int\)"),
    (lambda: Sharpness(kinds=3), "kinds must be a sequence of names"),
    (lambda: GeneralizationMeasures(measures=[None]), r"measures must hold names \(strings\).*got None"),
])
def test_arguments_of_the_wrong_type(factory, match):
    with pytest.raises(TypeError, match=match):
        factory()


def test_a_landscape_drawn_once_needs_no_epoch_cadence():
    assert LossLandscape(every_n_epochs=None).at == "fit_end"


def test_generalization_measures_log_the_functional_values(tmp_path):
    from lightning_optsurvey.measures import fisher_rao_norm, parameter_norm, path_norm, spectral_norm_product

    cb = GeneralizationMeasures(measures=("param_norm", "spectral_product", "path_norm", "fisher_rao"), num_batches=1)
    module, _ = fit("cnn", [cb], tmp_path, epochs=1)
    module.eval()
    x = cb._batches[0][0]
    h = cb.history[-1]
    assert h["measures/param_norm"] == pytest.approx(parameter_norm(module), rel=FLOAT_RTOL)
    assert h["measures/path_norm"] == pytest.approx(path_norm(module, x), rel=FLOAT_RTOL)
    assert h["measures/fisher_rao"] == pytest.approx(fisher_rao_norm(module, F.cross_entropy, cb._batches),
                                                     rel=FLOAT_RTOL)
    assert h["measures/spectral_product"] == pytest.approx(spectral_norm_product(module, x, tol=1e-6), rel=1e-3)


class _TwoInputClassifier(LightningModule):
    """Called as ``module(x1, x2)``: its batches are ``((x1, x2), y)``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.a = nn.Parameter(torch.randn(3, 4, generator=gen))
        self.b = nn.Parameter(torch.randn(2, 4, generator=gen))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 @ self.a + x2 @ self.b


def test_generalization_gap_evaluates_models_with_several_inputs():
    """A tuple of inputs is several positional arguments (as for the curvature engine and the measures):
    the size-weighted loss and accuracy over two unequal batches equal those computed directly."""
    module = _TwoInputClassifier()
    gen = torch.Generator().manual_seed(6)
    x1, x2 = torch.randn(10, 3, generator=gen), torch.randn(10, 2, generator=gen)
    y = torch.randint(0, 4, (10,), generator=gen)
    batches = [((x1[:7], x2[:7]), y[:7]), ((x1[7:], x2[7:]), y[7:])]
    loss, acc = GeneralizationGap()._evaluate(module, F.cross_entropy, batches)
    with torch.no_grad():
        out = module(x1, x2)
    assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=FLOAT_RTOL)
    assert acc == float((out.argmax(-1) == y).float().mean())  # counts: exact in float32


class _UnfreezeAtEpoch1(Callback):
    """Fine-tuning's usual schedule: a frozen block becomes trainable after the first epoch."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.requires_grad_(True)


def test_distance_from_init_covers_parameters_unfrozen_during_training(tmp_path):
    """Parameters frozen at fit start and unfrozen later still have their initial values recorded: the
    distance after the unfreeze equals the one computed from a copy of every parameter taken before fit."""
    torch.manual_seed(0)
    module = ClassifierModule(model="cnn", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
    first = next(module.parameters())
    first.requires_grad_(False)
    initial = {k: v.detach().clone() for k, v in module.named_parameters()}
    cb = GeneralizationMeasures(measures=("distance_from_init",), num_batches=1)
    trainer = Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, callbacks=[_UnfreezeAtEpoch1(), cb])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert first.requires_grad and not torch.equal(first.detach(), initial[next(iter(initial))])  # it trained
    assert cb.history[-1]["measures/distance_from_init"] == pytest.approx(
        distance_from_init(module, initial), rel=FLOAT_RTOL)


class _RankOneTrainer:
    """A rank-1 trainer of a multi-process run with a file logger: ``log_dir`` is a collective (Lightning
    broadcasts rank 0's directory), so every rank must read it or rank 0 waits forever."""

    is_global_zero = False

    def __init__(self, root) -> None:
        self.loggers = [object()]
        self.default_root_dir = str(root)
        self.log_dir_reads = 0

    @property
    def log_dir(self) -> str:
        self.log_dir_reads += 1
        return self.default_root_dir


@pytest.mark.parametrize("writer", ["json", "figure"])
def test_artifact_writers_take_part_in_the_log_dir_broadcast_on_every_rank(writer, tmp_path):
    from matplotlib.figure import Figure

    from lightning_optsurvey.callbacks._artifacts import save_figure, save_json

    trainer = _RankOneTrainer(tmp_path)
    if writer == "json":
        assert save_json(trainer, {"a": 1}, "landscape", "x.json") is None
    else:
        assert save_figure(trainer, Figure(), "landscape", "x.png") is None
    assert trainer.log_dir_reads == 1
    assert not (tmp_path / "landscape").exists()  # only rank 0 writes


def test_landscape_from_init_covers_parameters_unfrozen_during_training(tmp_path):
    """init_to_final with a block frozen at fit start and unfrozen later: the slice's end at alpha = -1 is
    the initial network (w - (w - w0) = w0), so its loss equals that of a copy taken before fit."""
    import copy

    torch.manual_seed(0)
    module = ClassifierModule(model="cnn", optimizer="sgd", optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
    next(module.parameters()).requires_grad_(False)
    initial = copy.deepcopy(module).eval()
    cb = LossLandscape(kind="1d", directions="init_to_final", resolution=3, span=1.0, num_batches=1,
                       at="epoch_end", every_n_epochs=2)
    trainer = Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, callbacks=[_UnfreezeAtEpoch1(), cb])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    (x, y), = cb._batches
    with torch.no_grad():
        expected = float(initial.compute_loss((x, y)))  # the module's own loss, as resolve_loss_fn picks
    assert cb.last_grid["loss"][0] == pytest.approx(expected, rel=FLOAT_RTOL)


class _SharedGeneratorData(LightningModule):
    """A plain module whose training and validation loaders share one generator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.generator = torch.Generator().manual_seed(0)
        data = torch.Generator().manual_seed(1)
        self.train_set = TensorDataset(torch.randn(64, 4, generator=data), torch.randint(3, (64,), generator=data))
        self.val_set = TensorDataset(torch.randn(32, 4, generator=data), torch.randint(3, (32,), generator=data))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True, generator=self.generator)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=16, generator=self.generator)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_generalization_gap_leaves_a_generator_shared_with_the_training_loader_alone():
    # Iterating the validation loader draws the workers' base seed from its generator: restored afterwards.
    def run(callbacks):
        module = _SharedGeneratorData()
        Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=callbacks).fit(module)
        return [p.detach().clone() for p in module.parameters()]

    for plain, measured in zip(run([]), run([GeneralizationGap()]), strict=True):
        assert torch.equal(plain, measured)


class _NoValidationStep(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(callbacks):
    return Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def test_generalization_gap_without_validation_step_says_why_before_training():
    data = TensorDataset(torch.randn(16, 4), torch.randint(3, (16,)))
    trainer = _trainer([GeneralizationGap()])
    with pytest.raises(ValueError, match=r"_NoValidationStep has no validation_step.*drops the val_dataloaders"):
        trainer.fit(_NoValidationStep(), DataLoader(data, batch_size=8), val_dataloaders=DataLoader(data, batch_size=8))
    assert trainer.global_step == 0


def test_generalization_gap_takes_a_modules_own_val_dataloader_without_validation_step():
    data = TensorDataset(torch.randn(16, 4), torch.randint(3, (16,)))

    class OwnLoaders(_NoValidationStep):
        def train_dataloader(self):
            return DataLoader(data, batch_size=8)

        def val_dataloader(self):
            return DataLoader(data, batch_size=8)

    gap = GeneralizationGap()
    _trainer([gap]).fit(OwnLoaders())
    (measured,) = gap.history
    assert measured["gen_gap/loss"] == pytest.approx(0.0, abs=1e-6)  # the same data on both sides
