"""Every bad input of issue 13's probe gets one clear error before any work starts.

ClassifierModule and its schedulers at construction, num_classes against the data at setup, every batch
of a HessianOperator, ``optsurvey compare``'s pre-flight (before the experiment exists: the tracking
database is never created), ``optsurvey theory``'s URI before its checks, and ``optsurvey fit --config``
errors as one line naming the config key, exit code 2, no traceback, and no ``mlflow.db`` left behind.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _support import free_port
from lightning.pytorch import Trainer

from lightning_optsurvey.cli import main
from lightning_optsurvey.curvature import HessianOperator
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"optimizer_kwargs": "lr=0.1"}, TypeError, r"optimizer_kwargs must be a dict .*'lr=0.1'"),
        ({"optimizer_kwargs": {"lr": math.nan}}, ValueError, r"optimizer_kwargs\['lr'\].* must be finite, got nan"),
        ({"optimizer": "adam", "optimizer_kwargs": {"lr": math.inf}}, ValueError, "'lr'.*finite, got inf"),
        ({"optimizer_kwargs": {"lr": "0.1"}}, TypeError, r"'lr'.* must be a real number, got '0.1' \(str\)"),
        ({"optimizer": "adam", "optimizer_kwargs": {"betas": (0.9, math.nan)}}, ValueError, "'betas'.*finite"),
        ({"lr_scheduler": "step", "lr_scheduler_kwargs": {"step_size": 0}}, ValueError,
         "step_size must be an integer >= 1, got 0"),
        ({"lr_scheduler": "step", "lr_scheduler_kwargs": {"step_size": 2.5}}, TypeError,
         r"step_size must be an integer >= 1, got 2.5 \(float\)"),
        ({"lr_scheduler": "step", "lr_scheduler_kwargs": {"gamma": -0.5}}, ValueError, r"gamma must be in \(0"),
        ({"lr_scheduler": "exponential", "lr_scheduler_kwargs": {"gamma": math.nan}}, ValueError, "gamma"),
        ({"lr_scheduler": "cosine", "lr_scheduler_kwargs": {"eta_min": -1.0}}, ValueError, "eta_min"),
        ({"lr_scheduler": "step", "lr_scheduler_kwargs": "step_size=3"}, TypeError, "lr_scheduler_kwargs must"),
        ({"num_classes": 1}, ValueError, "num_classes must be an integer >= 2"),
        ({"num_classes": 10.0}, TypeError, r"num_classes must be an integer >= 2, got 10.0 \(float\)"),
    ],
)
def test_classifier_module_rejects_bad_values_at_construction(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        ClassifierModule(model="mlp", **kwargs)


def test_num_classes_that_does_not_match_the_data_fails_at_setup() -> None:
    module = ClassifierModule(model="mlp", num_classes=3)
    trainer = Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    with pytest.raises(ValueError, match="num_classes=3 does not match the data, which has 10 classes"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ((torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), "batch 1 has no samples"),
        ((torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)), "batch 1: its inputs and targets disagree"),
    ],
)
def test_hessian_operator_checks_every_batch(second, message) -> None:
    model = torch.nn.Linear(4, 3)
    first = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    with pytest.raises(ValueError, match=message):
        HessianOperator(model, F.cross_entropy, [first, second])


FAST = ["--max-epochs", "1", "--limit-train-batches", "2", "--no-measure", "--optimizers", "sgd"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hparam", "sgd.lr=nan"], r"--hparam sgd.lr must be finite, got nan"),
        (["--hparam", "sgd.lr=inf"], r"--hparam sgd.lr must be finite, got inf"),
        (["--hparam", "sgd.lr='0.1'"], r"--hparam sgd.lr must be a real number, got '0.1' \(str\)"),
        (["--devices", "2", "--strategy", "gossip_torus"], r"--strategy gossip_torus .*torus.* got 2"),
        (["--experiment", ""], "--experiment must be a non-empty name"),
    ]
    + ([] if torch.cuda.is_available() else [(["--accelerator", "gpu"], "no CUDA GPU is available")]),
)
def test_compare_preflight_fails_before_the_experiment_exists(tmp_path: Path, capsys, argv, message) -> None:
    db = tmp_path / "pre.db"
    args = ["compare", *FAST, "--experiment", "pre", "--tracking-uri", f"sqlite:///{db}", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("optsurvey compare: error: ") and "Traceback" not in err
    assert not db.exists(), "nothing may be created before the pre-flight passes"


@pytest.mark.parametrize(("argv", "message"), [(["--seeds", str(2**32)], r"\[0, 2\*\*32\)"),
                                               (["--limit-train-batches", "-1"], "fraction in"),
                                               (["--limit-train-batches", "2.5"], "whole number")])
def test_compare_flag_ranges(tmp_path: Path, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compare", *argv, "--tracking-uri", f"sqlite:///{tmp_path / 'n.db'}"])
    assert info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_database_uri_without_its_driver(capsys) -> None:
    from sqlalchemy.engine import make_url

    try:
        make_url("postgresql://u@localhost/db").get_dialect().import_dbapi()
        pytest.skip("a PostgreSQL driver is installed here")
    except ImportError:
        pass
    assert main(["compare", *FAST, "--tracking-uri", "postgresql://u@localhost/db"]) == 2
    assert "needs the database driver" in capsys.readouterr().err


def test_theory_checks_its_tracking_uri_before_running_any_check(monkeypatch, capsys) -> None:
    from lightning_optsurvey import theory

    def fail(*args, **kwargs):
        raise AssertionError("the checks ran before the tracking URI was checked")

    monkeypatch.setattr(theory, "run_checks", fail)
    assert main(["theory", "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "does not answer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("model:\n  optimizer_kwargs: 'lr=0.1'\n", "model.optimizer_kwargs: expected dict or None, got str 'lr=0.1'"),
        ("model:\n  optimizer_kwargs: {lr: .nan}\n",
         r"model: optimizer_kwargs\['lr'\] of optimizer 'sgd' must be finite"),
        ("model:\n  lr_scheduler: step\n  lr_scheduler_kwargs: {step_size: 0}\n", "model: .*step_size must be"),
        ("trainer:\n  callbacks:\n    - class_path: lightning_optsurvey.callbacks.HessianSpectrum\n"
         "      init_args: {top_k: -1}\n", r"trainer.callbacks\[0\] \(HessianSpectrum\): top_k must be"),
        ("trainer:\n  strategy:\n    class_path: lightning_optsurvey.strategies.GossipStrategy\n"
         "    init_args: {topology: nope}\n", "trainer.strategy: unknown topology 'nope'"),
        ("trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.MLFlowLogger\n"
         "    init_args: {tracking_uri: 'http://127.0.0.1:PORT'}\n", "does not answer"),
        ("trainer:\n  max_epochs: [\n", "config: .*line"),  # not YAML
    ],
)
def test_fit_config_errors_are_one_line_naming_the_key(tmp_path: Path, capsys, monkeypatch, config, message) -> None:
    monkeypatch.chdir(tmp_path)  # the default logger's sqlite:///mlflow.db would be here
    path = tmp_path / "bad.yaml"
    path.write_text(config.replace("PORT", str(free_port())))
    assert main(["fit", "--config", str(path), "--trainer.max_epochs", "1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("optsurvey fit: error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists(), "a config error must leave no tracking database behind"
