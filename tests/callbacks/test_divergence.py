"""Divergence is an outcome: reported once with its step, measurements skipped, the run tagged or stopped.

The probe of issue 13: sgd at lr=1e4 on digits makes the loss non-finite within a few steps. Before,
HessianSpectrum ended the run with ``linalg.eigh`` failing to converge and Sharpness logged NaN into a
FINISHED run; now the run completes (or stops, on request) as a reported divergence.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import MLFlowLogger

from lightning_optsurvey.callbacks import DivergenceMonitor, HessianSpectrum, Sharpness
from lightning_optsurvey.callbacks.divergence import nonfinite_reason
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"  # one store: create its tables once


def logger_runs(db: str, filter_string: str) -> list[str]:
    """Run ids of experiment "div" that ``mlflow.search_runs`` finds with ``filter_string``."""
    import mlflow

    mlflow.set_tracking_uri(db)
    try:
        frame = mlflow.search_runs(experiment_names=["div"], filter_string=filter_string)
    finally:
        mlflow.set_tracking_uri(None)
    return list(frame["run_id"])


def _fit(db: str | None, lr: float, stop: bool = False, epochs: int = 2):
    torch.manual_seed(0)
    module = ClassifierModule(model="mlp", optimizer="sgd", optimizer_kwargs={"lr": lr})
    monitor = DivergenceMonitor(stop=stop)
    hessian = HessianSpectrum(top_k=1, every_n_steps=2)
    sharpness = Sharpness(kinds=("sam",), rho=0.05, every_n_steps=2)
    logger = MLFlowLogger(experiment_name="div", tracking_uri=db) if db else False
    trainer = Trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=1, accelerator="cpu",
                      logger=logger, callbacks=[monitor, hessian, sharpness], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    run = logger.experiment.get_run(logger.run_id) if logger else None
    history = logger.experiment.get_metric_history if logger else None
    return trainer, monitor, hessian, run, history, [str(w.message) for w in caught]


def test_divergent_sgd_is_reported_once_measurements_skip_and_the_run_is_tagged(db: str) -> None:
    trainer, monitor, hessian, run, history, messages = _fit(db, lr=1e4)
    assert monitor.diverged_step is not None and not math.isfinite(monitor.diverged_value)
    reports = [m for m in messages if m.startswith("training diverged")]
    assert len(reports) == 1 and f"step {monitor.diverged_step}" in reports[0]
    assert run.data.tags["diverged"] == "true"
    assert run.data.tags["diverged_step"] == str(monitor.diverged_step)
    assert run.data.metrics["divergence/step"] == monitor.diverged_step
    # filterable in MLflow: the query a user types in the UI's search box or in mlflow.search_runs
    found = logger_runs(db, "tags.diverged = 'true'")
    assert run.info.run_id in found
    assert trainer.global_step == 8, "without stop=True the run trains to its end"
    # measurements at the non-finite points were skipped and said so; nothing non-finite was logged
    assert any(h.get("skipped_nonfinite") for h in hessian.history)
    assert any("HessianSpectrum skips its measurements" in m for m in messages)
    assert history(run.info.run_id, "measure/skipped_nonfinite")
    for key in ("hessian/eig_1", "hessian/trace", "sharpness/sam"):
        assert all(math.isfinite(m.value) for m in history(run.info.run_id, key)), key


def test_stop_on_divergence_ends_the_run_at_that_step() -> None:
    trainer, monitor, _, _, _, _ = _fit(None, lr=1e4, stop=True)
    assert trainer.global_step == monitor.diverged_step < 8


def test_a_finite_run_is_tagged_not_diverged(db: str) -> None:
    _, monitor, hessian, run, _, _ = _fit(db, lr=0.01, epochs=1)
    assert monitor.diverged_step is None and run.data.tags["diverged"] == "false"
    assert run.info.run_id in logger_runs(db, "tags.diverged = 'false'")
    assert run.info.run_id not in logger_runs(db, "tags.diverged = 'true'")
    assert not any(h.get("skipped_nonfinite") for h in hessian.history)
    model = torch.nn.Linear(2, 1)
    assert nonfinite_reason(None, model) is None
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    assert "bias" in nonfinite_reason(None, model)
    with pytest.raises(TypeError, match="stop"):
        DivergenceMonitor(stop="yes")
