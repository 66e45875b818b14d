"""``optsurvey compare --module/--datamodule``: the grid on a user's own classes, defined in this file."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _support import UserClassifier
from lightning.pytorch import LightningDataModule, LightningModule
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_optsurvey.cli import main
from lightning_optsurvey.optim import create_optimizer

HERE = __name__  # importable as the test runner imported it


class TinyModule(UserClassifier):
    """A user's module: its own network (with BatchNorm), its own loss and logging, a registry optimizer."""

    def __init__(self, optimizer: str = "sgd", optimizer_kwargs: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return create_optimizer(self.hparams.optimizer, self.parameters(), **(self.hparams.optimizer_kwargs or {}))


class TinyData(LightningDataModule):
    def __init__(self, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(96, 10, generator=gen)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        self.train_set, self.val_set = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class NoOptimizerArg(LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(10, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_compare_on_a_user_module_leaves_one_finished_run_per_optimizer_with_the_measurements(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'u.db'}"
    code = main(["compare", "--module", f"{HERE}:TinyModule", "--datamodule", f"{HERE}:TinyData",
                 "--optimizers", "sgd,sam", "--hparam", "sgd.lr=0.05", "--batch-size", "16", "--max-epochs", "1",
                 "--limit-train-batches", "3", "--swa", "--tracking-uri", uri, "--experiment", "user"])
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("user").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["sam-seed0-swa", "sgd-seed0-swa"]
    for run in runs:
        assert run.info.status == "FINISHED"
        params, metrics = run.data.params, run.data.metrics
        assert params["model"] == f"{HERE}:TinyModule" and params["task"] == f"{HERE}:TinyData"
        assert params["swa"] == "True"
        assert {"train/loss", "val/loss", "val/acc", "hessian/eig_1", "hessian/eig_2", "hessian/trace",
                "gen_gap/loss", "sharpness/sam", "swa/hessian/eig_1", "swa/sharpness/sam"} <= set(metrics), metrics
        assert metrics["hessian/eig_1"] >= metrics["hessian/eig_2"]
    assert next(r for r in runs if r.info.run_name == "sgd-seed0-swa").data.params["optimizer.lr"] == "0.05"
    assert "| optimizer | seed | val/acc" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--module", "no_such_package.models:Net"], "cannot import --module 'no_such_package.models:Net': no module"),
    (["--module", f"{HERE}:Missing"], "has no attribute 'Missing'"),
    (["--module", f"{HERE}:TinyData"], "not a subclass of lightning.pytorch.core.module.LightningModule"),
    (["--module", f"{HERE}:NoOptimizerArg"], "takes no `optimizer` argument"),
    (["--datamodule", f"{HERE}:TinyModule"], "--datamodule .* not a subclass"),
    (["--module", "not a path"], "must be an import path"),
])
def test_user_classes_that_cannot_serve_are_refused_before_any_run(tmp_path, capsys, argv, message):
    uri = f"sqlite:///{tmp_path / 'bad.db'}"
    assert main(["compare", *argv, "--optimizers", "sgd", "--tracking-uri", uri, "--no-measure"]) == 2
    err = capsys.readouterr().err
    assert "optsurvey compare: error:" in err
    assert re.search(message, err), err
    assert "run 1/" not in err  # refused before the first run


def _fit_config(tmp_path, model: str, extra: str = "") -> str:
    config = tmp_path / "in.yaml"
    config.write_text(
        f"model:\n  class_path: {model}\n  init_args:\n    optimizer: sam\n{extra}"
        f"data:\n  class_path: {HERE}.TinyData\n  init_args:\n    batch_size: 16\n"
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 3\n  limit_val_batches: 1\n  logger: false\n"
        f"  enable_progress_bar: false\n  enable_model_summary: false\n  default_root_dir: {tmp_path / 'out'}\n"
    )
    return str(config)


def test_fit_with_a_config_naming_the_users_classes(tmp_path):
    assert main(["fit", "--config", _fit_config(tmp_path, f"{HERE}.TinyModule")]) == 0
    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["hyper_parameters"]["optimizer"] == "sam" and saved["global_step"] == 3
    # SAM evaluates twice per step; the adapter the CLI attaches keeps BatchNorm at one update per step.
    assert int(saved["state_dict"]["net.1.num_batches_tracked"]) == 3


@pytest.mark.parametrize(("model", "message"), [
    ("no_such_package.models.Net", "cannot import model.class_path 'no_such_package.models.Net': no module"),
    ("torch.nn.Linear", "model.class_path"),
])
def test_fit_refuses_a_class_that_cannot_serve_in_one_line(tmp_path, capsys, model, message):
    assert main(["fit", "--config", _fit_config(tmp_path, model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optsurvey fit: error:") and re.search(message, err[0]), err


def test_fit_takes_a_module_that_builds_its_own_optimizer(tmp_path):
    """Only compare's grid passes registry names; `optsurvey fit` runs any LightningModule."""
    config = tmp_path / "own.yaml"
    config.write_text(
        f"model:\n  class_path: {HERE}.NoOptimizerArg\n  init_args:\n    lr: 0.05\n"
        f"data:\n  class_path: {HERE}.TinyData\n  init_args:\n    batch_size: 16\n"
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 3\n  limit_val_batches: 0\n  logger: false\n"
        f"  enable_progress_bar: false\n  enable_model_summary: false\n  default_root_dir: {tmp_path / 'out'}\n"
    )
    assert main(["fit", "--config", str(config)]) == 0
    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 3


class CrashesUnderAdam(TinyModule):
    def training_step(self, batch, batch_idx):
        if self.hparams.optimizer == "adam":
            raise RuntimeError("a bug in the user's module")
        return super().training_step(batch, batch_idx)


def test_a_failing_run_ends_only_itself_and_the_grid_reports_it(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'f.db'}"
    code = main(["compare", "--module", f"{HERE}:CrashesUnderAdam", "--datamodule", f"{HERE}:TinyData",
                 "--optimizers", "adam,sgd", "--no-measure", "--max-epochs", "1", "--limit-train-batches", "2",
                 "--tracking-uri", uri, "--experiment", "crash"])
    assert code == 1
    out, err = capsys.readouterr()
    assert "| sgd " in out and "| adam " not in out  # the runs that finished are still tabulated
    assert "optsurvey compare: run adam-seed0 failed: RuntimeError: a bug in the user's module" in err
    assert "1 of 2 runs failed (marked FAILED in MLflow): adam-seed0" in err
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("crash").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"adam-seed0": "FAILED", "sgd-seed0": "FINISHED"}


def test_a_run_its_killed_process_left_running_is_marked_failed(tmp_path):
    from lightning_optsurvey.tracking import fail_unfinished_runs

    uri = f"sqlite:///{tmp_path / 'k.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("killed")
    stuck = client.create_run(experiment, run_name="sgd-seed0-gossip_ring").info.run_id  # RUNNING, as SIGKILL leaves it
    done = client.create_run(experiment, run_name="sgd-seed0-gossip_ring").info.run_id
    client.set_terminated(done, "FINISHED")
    other = client.create_run(experiment, run_name="adam-seed0").info.run_id
    assert fail_unfinished_runs(uri, "killed", "sgd-seed0-gossip_ring") == [stuck]
    assert client.get_run(stuck).info.status == "FAILED"
    assert client.get_run(done).info.status == "FINISHED" and client.get_run(other).info.status == "RUNNING"
