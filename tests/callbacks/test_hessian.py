"""HessianSpectrum: invisible to training, right against dense Hessians, resumable, and loud on bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _support import PlainModule, cross_entropy_pairs, dense_hessian, fit_digits, flat_parameter_loss, pair_size
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_optsurvey.callbacks import DensityConfig, HessianSpectrum, TraceConfig
from lightning_optsurvey.callbacks._measure import draw_batches
from lightning_optsurvey.curvature import HessianOperator, lanczos
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

BATCH = 32
FLOAT32_EIG_RTOL = 1e-4  # float32 products vs a float64 dense Hessian of the same weights


def _fit(callbacks, model, optimizer, tmp_path, max_epochs=2, ckpt_path=None, logger=False, module=None):
    seed_everything(0, verbose=False)
    if module is None:
        lr = {"sgd": {"lr": 0.05, "momentum": 0.9}, "adam": {"lr": 1e-3}}[optimizer]
        module = ClassifierModule(model, optimizer, lr)
    trainer = fit_digits(module, BATCH, ckpt_path=ckpt_path, max_epochs=max_epochs, limit_train_batches=3,
                         limit_val_batches=1, callbacks=callbacks, logger=logger, deterministic=True,
                         default_root_dir=tmp_path)
    return module, trainer


@pytest.mark.parametrize(("model", "optimizer"),
                         [("cnn_bn", "sgd"), ("cnn_bn", "adam"), ("mlp_dropout", "sgd"), ("mlp_dropout", "adam")])
def test_training_is_bitwise_identical_with_the_callback(model, optimizer, tmp_path):
    # Step cadence on the cheap model covers both triggers; the CNN is measured at epoch ends only.
    every_n_steps = 2 if model == "mlp_dropout" else None
    cb = HessianSpectrum(top_k=3, trace=TraceConfig(matvecs=12), density=DensityConfig(probes=2, steps=10),
                         every_n_steps=every_n_steps)
    logger = CSVLogger(tmp_path, name="with")
    measured, _ = _fit([cb], model, optimizer, tmp_path, logger=logger)
    plain, _ = _fit([], model, optimizer, tmp_path)
    for (name, a), b in zip(measured.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(h["hessian/eig_1"] >= h["hessian/eig_2"] >= h["hessian/eig_3"] for h in cb.history)
    logged = (tmp_path / "with" / "version_0" / "metrics.csv").read_text()
    assert "hessian/eig_3" in logged and "hessian/trace" in logged and "hessian/num_matvecs" in logged
    artifacts = sorted(p.name for p in (tmp_path / "with" / "version_0" / "hessian").iterdir())
    if every_n_steps is None:
        assert [int(h["step"]) for h in cb.history] == [3, 6]
        assert artifacts == [f"density_epoch_{e}.{ext}" for e in (0, 1) for ext in ("json", "png")]
        return
    # steps 2, 4 and 6, and the end of epoch 0 (step 3); step 6 also ends epoch 1 and is measured once
    assert [int(h["step"]) for h in cb.history] == [2, 3, 4, 6]
    assert "density_epoch_0.json" in artifacts and "density_epoch_1_step_4.png" in artifacts
    saved = json.loads((tmp_path / "with" / "version_0" / "hessian" / "density_epoch_1_step_6.json").read_text())
    assert saved["epoch"] == 1 and saved["step"] == 6 and len(saved["nodes"]) == 2


class _Tiny(PlainModule):
    """A 650-parameter float32 classifier: small enough for a dense float64 Hessian."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Flatten(), nn.Linear(64, 9)] + ([nn.BatchNorm1d(9)] if batch_norm else [])
        self.net = nn.Sequential(*layers, nn.Tanh(), nn.Linear(9, 10))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _dense_eigenvalues(module: nn.Module, batches, bn_mode: str) -> torch.Tensor:
    double = _Tiny(batch_norm=any(isinstance(m, nn.BatchNorm1d) for m in module.modules())).double()
    double.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in module.state_dict().items()})
    double.train(bn_mode == "batch")  # BatchNorm on batch statistics, or on its running ones (no Dropout here)
    batches64 = [(x.double(), y) for x, y in batches]
    dense = dense_hessian(*flat_parameter_loss(double, batches64, cross_entropy_pairs, pair_size))
    return torch.linalg.eigvalsh((dense + dense.T) / 2)


@pytest.mark.parametrize(("batch_norm", "bn_mode"), [(False, "eval"), (True, "batch")])
def test_logged_values_match_a_dense_hessian_of_the_same_subset(batch_norm, bn_mode, tmp_path):
    cb = HessianSpectrum(top_k=2, bottom_k=1, trace=TraceConfig(matvecs=600), per_layer=True, num_batches=2,
                         bn_mode=bn_mode, tol=1e-6)
    # the trace to a stated relative standard error, deflated by the top-2 pairs of the same measurement
    stated = HessianSpectrum(top_k=2, trace=TraceConfig(matvecs=400, rtol=0.05), num_batches=2, bn_mode=bn_mode,
                             tol=1e-6)
    module, trainer = _fit([cb, stated], None, None, tmp_path, max_epochs=1, module=_Tiny(batch_norm))
    dm = DigitsDataModule(batch_size=BATCH)
    dm.setup()
    batches = draw_batches(dm.train_set, 2, BATCH, generator=torch.Generator().manual_seed(0))
    eigs = _dense_eigenvalues(module, batches, bn_mode)
    last = cb.history[-1]
    scale = float(eigs.abs().max())
    assert last["hessian/eig_1"] == pytest.approx(float(eigs[-1]), abs=FLOAT32_EIG_RTOL * scale)
    assert last["hessian/eig_2"] == pytest.approx(float(eigs[-2]), abs=FLOAT32_EIG_RTOL * scale)
    assert last["hessian/eig_min_1"] == pytest.approx(float(eigs[0]), abs=FLOAT32_EIG_RTOL * scale)
    # Hutch++ with a sketch of 200 of 650 dimensions: within 4 standard errors of the exact trace
    assert abs(last["hessian/trace"] - float(eigs.sum())) <= 4 * last["hessian/trace_stderr"] + 1e-4 * scale
    quick = stated.history[-1]
    assert abs(quick["hessian/trace"] - float(eigs.sum())) <= 4 * quick["hessian/trace_stderr"] + 1e-4 * scale
    assert quick["hessian/trace_stderr"] <= 0.05 * abs(quick["hessian/trace"]) or quick["hessian/trace_matvecs"] >= 399
    # per-layer: the last layer's block is the trailing diagonal block of the full Hessian
    op = HessianOperator(module, F.cross_entropy, batches, params=[f"net.{len(module.net) - 1}.weight",
                                                                   f"net.{len(module.net) - 1}.bias"],
                         bn_mode=bn_mode)
    block_top = lanczos(op, k=1, tol=1e-8).eigenvalues[0]
    name = f"hessian/net.{len(module.net) - 1}/eig_1"
    assert last[name] == pytest.approx(float(block_top), rel=1e-5)
    assert float(trainer.callback_metrics["hessian/eig_1"]) == pytest.approx(last["hessian/eig_1"])


def test_warm_start_is_checkpointed_and_resumes(tmp_path):
    first = HessianSpectrum(top_k=2, every_n_epochs=1)
    module, trainer = _fit([first], "mlp", "sgd", tmp_path, max_epochs=1)
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    state = first.state_dict()
    assert state["vectors"]["top"].shape == (sum(p.numel() for p in module.parameters()), 2)

    resumed = HessianSpectrum(top_k=2, every_n_epochs=1)
    _, trainer2 = _fit([resumed], "mlp", "sgd", tmp_path, max_epochs=2, ckpt_path=str(ckpt))
    assert len(resumed.history) == 2 and resumed.history[0] == first.history[0]
    # The second measurement was warm-started from the checkpointed vectors: redo it by hand.
    dm = DigitsDataModule(batch_size=BATCH)
    dm.setup()
    batches = draw_batches(dm.train_set, 1, BATCH, generator=torch.Generator().manual_seed(0))
    op = HessianOperator(trainer2.lightning_module, F.cross_entropy, batches)
    generator = torch.Generator()
    generator.set_state(state["generator"])
    redo = lanczos(op, k=2, tol=1e-3, v0=state["vectors"]["top"], generator=generator)
    assert resumed.history[1]["hessian/eig_1"] == pytest.approx(float(redo.eigenvalues[0]), rel=1e-6)
    assert resumed.history[1]["hessian/num_matvecs"] == redo.num_matvecs
    # A differently configured instance has its own state key, so both can be attached at once.
    assert HessianSpectrum(top_k=3).state_key != resumed.state_key


def test_density_goes_to_mlflow_through_the_logger(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    # The file store skips the SQL schema migrations (seconds); the artifact API is the same.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MLFlowLogger(experiment_name="hessian", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    cb = HessianSpectrum(top_k=1, density=DensityConfig(probes=1, steps=5))
    _fit([cb], "mlp", "sgd", tmp_path, max_epochs=1, logger=logger)
    files = {f.path for f in logger.experiment.list_artifacts(logger.run_id, "hessian")}
    assert files == {"hessian/density_epoch_0.png", "hessian/density_epoch_0.json"}
    history = logger.experiment.get_metric_history(logger.run_id, "hessian/eig_1")
    assert len(history) == 1 and history[0].value == pytest.approx(cb.history[0]["hessian/eig_1"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"bottom_k": -1}, "bottom_k"),
        ({"bn_mode": "train"}, "bn_mode"),
        ({"tol": 0.0}, "tol"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": None, "every_n_steps": None}, "both None"),
        ({"num_batches": 0}, "num_batches"),
        ({"trace": TraceConfig(matvecs=60, rtol=0.1), "tol": 1.0}, "tol"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianSpectrum(**kwargs)


class _Matrix:
    """A symmetric float64 matrix as an operator (what HessianSpectrum._trace needs of one)."""

    def __init__(self, matrix):
        self.matrix, self.numel, self.num_matvecs = matrix, matrix.shape[0], 0
        self.dtype, self.device = matrix.dtype, matrix.device

    def __matmul__(self, v):
        self.num_matvecs += 1 if v.ndim == 1 else v.shape[1]
        return self.matrix @ v


def test_deflated_trace_takes_the_top_pairs_exactly_and_stops_at_the_stated_error():
    """Two outliers (1000, 500) over a bulk of small entries: the Ritz values carry them exactly, so the
    probes only see the bulk; the estimate is within 4 standard errors of the exact trace, and the
    stopping rule holds. Without deflation the same probes have a far larger standard error."""
    g = torch.Generator().manual_seed(0)
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    bulk = torch.rand(n, generator=g, dtype=torch.float64) * 0.1
    bulk[:2] = torch.tensor([1000.0, 500.0], dtype=torch.float64)
    matrix = (q * bulk) @ q.T
    op = _Matrix(matrix)
    top = lanczos(op, k=2, tol=1e-8)
    cb = HessianSpectrum(top_k=2, trace=TraceConfig(matvecs=200, rtol=1e-3))
    estimate, stderr, used = cb._trace(op, cb.trace, top)
    exact = float(matrix.trace())
    assert abs(estimate - exact) <= 4 * stderr + 1e-9 * exact
    assert stderr <= 1e-3 * abs(estimate) and used < 200
    cold = HessianSpectrum(top_k=2, trace=TraceConfig(matvecs=used + 1, rtol=1e-3))
    no_deflation = top._replace(eigenvectors=top.eigenvectors[:, :0], eigenvalues=top.eigenvalues[:0])
    assert cold._trace(op, cold.trace, no_deflation)[1] > 100 * stderr


def test_pooled_rounds_equal_one_sample():
    from lightning_optsurvey.callbacks.hessian import _pooled
    from lightning_optsurvey.curvature import TraceResult

    x = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], dtype=torch.float64)

    def summary(part):
        return TraceResult(float(part.mean()), float(part.std() / len(part) ** 0.5), len(part))

    mean, stderr, count = _pooled([summary(x[:3]), summary(x[3:5]), summary(x[5:])])
    assert count == 7 and mean == pytest.approx(float(x.mean()))
    assert stderr == pytest.approx(float(x.std() / 7 ** 0.5))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TraceConfig(matvecs=2), ValueError, "matvecs"),
        (lambda: TraceConfig(rtol=0.0), ValueError, "rtol"),
        (lambda: TraceConfig(block=1), ValueError, "block"),
        (lambda: DensityConfig(probes=0), ValueError, "probes"),
        (lambda: DensityConfig(steps=2.5), TypeError, "steps"),
        (lambda: HessianSpectrum(trace="yes"), TypeError, "trace"),
        (lambda: HessianSpectrum(density=3), TypeError, "density"),
        (lambda: HessianSpectrum(loss_fn=3), TypeError, "loss_fn"),
        (lambda: HessianSpectrum(1, 0), TypeError, "positional"),  # options after top_k are keyword-only
    ],
)
def test_bad_configs_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_k_larger_than_the_parameter_count_raises_at_setup(tmp_path):
    class Small(_Tiny):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.net[1].weight.requires_grad_(False)

    with pytest.raises(ValueError, match="exceeds the number of trainable parameters 10"):
        _fit([HessianSpectrum(top_k=11)], None, None, tmp_path, max_epochs=1, module=Small())
    frozen = _Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        _fit([HessianSpectrum()], None, None, tmp_path, max_epochs=1, module=frozen)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ranks_measure_the_global_hessian_under_ddp_spawn(tmp_path):
    world, batch_size = 2, 16
    module = _Tiny()
    cb = HessianSpectrum(top_k=2, tol=1e-6)
    trainer = Trainer(accelerator="cpu", strategy="ddp_spawn", devices=world, max_epochs=1, limit_train_batches=2,
                      limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(batch_size=batch_size))
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup()
    shards = [batch for rank in range(world)
              for batch in draw_batches(dm.train_set, 1, batch_size, generator=torch.Generator().manual_seed(0),
                                        rank=rank, world_size=world)]
    reference = lanczos(HessianOperator(module, F.cross_entropy, shards), k=2, tol=1e-8)
    one_shard = lanczos(HessianOperator(module, F.cross_entropy, shards[:1]), k=1, tol=1e-8)
    logged = float(trainer.callback_metrics["hessian/eig_1"])
    assert logged == pytest.approx(float(reference.eigenvalues[0]), rel=1e-4)
    assert logged != pytest.approx(float(one_shard.eigenvalues[0]), rel=1e-3)  # not just rank 0's shard
