"""The ``optsurvey`` command: compare, list, and Lightning's fit with MLflow."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _support import free_port
from mlflow.tracking import MlflowClient

from lightning_optsurvey.cli import main
from lightning_optsurvey.tracking import EXPERIMENT_KIND_TAG

FAST = ["--max-epochs", "1", "--limit-train-batches", "4", "--no-measure"]


def _runs(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, exp, (client.search_runs([exp.experiment_id]) if exp else [])


def test_compare_records_one_finished_run_per_optimizer(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    code = main(["compare", "--optimizers", "sgd,adam", "--seeds", "0,1", "--tracking-uri", uri,
                 "--experiment", "e", *FAST])
    assert code == 0
    _, exp, runs = _runs(uri, "e")
    assert exp.tags[EXPERIMENT_KIND_TAG[0]] == EXPERIMENT_KIND_TAG[1]
    assert sorted(r.info.run_name for r in runs) == ["adam-seed0", "adam-seed1", "sgd-seed0", "sgd-seed1"]
    client = MlflowClient(tracking_uri=uri)  # every run is tagged, so divergence filters either way
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.diverged = 'false'")) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["optimizer"] in ("sgd", "adam") and params["seed"] in ("0", "1")
        assert params["task"] == "digits" and params["model"] == "cnn" and params["world_size"] == "1"
        assert float(params["optimizer.lr"]) > 0
        assert {"val/acc", "val/loss", "train/loss"} <= set(run.data.metrics)
    out = capsys.readouterr()
    assert "| optimizer | seed | val/acc" in out.out
    assert f"mlflow ui --backend-store-uri {uri}" in out.out
    command = next(line for line in out.out.splitlines() if "mlflow ui" in line).split(":  ", 1)[1]
    assert shutil.which(command.split()[0]), command  # runnable as printed, venv activated or not
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs" in out.out
    assert "run 4/4" in out.err


def test_hparam_override_is_applied_and_logged(tmp_path):
    uri = f"sqlite:///{tmp_path / 'h.db'}"
    assert main(["compare", "--optimizers", "adam", "--hparam", "adam.lr=0.005", "--tracking-uri", uri,
                 "--experiment", "h", *FAST]) == 0
    _, _, runs = _runs(uri, "h")
    assert runs[0].data.params["optimizer.lr"] == "0.005"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizers", "nosuch"], "known optimizers: .*adam"),
        (["--model", "resnet"], "known models"),
        (["--strategy", "teleport"], "known strategies: .*ddp"),
        (["--hparam", "adam.lr=-1"], "optimizer 'adam'"),
        (["--hparam", "adam.lrr=1"], "does not take"),
        (["--hparam", "sgd.lr=1"], "not among --optimizers"),
    ],
)
def test_bad_input_fails_before_any_run(tmp_path, capsys, argv, message):
    uri = f"sqlite:///{tmp_path / 'bad.db'}"
    defaults = [] if "--optimizers" in argv else ["--optimizers", "adam"]
    code = main(["compare", *defaults, *argv, "--tracking-uri", uri, "--experiment", "bad", *FAST])
    assert code != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bad.db").exists()


@pytest.mark.parametrize("argv", [["--max-epochs", "0"], ["--devices", "-2"], ["--seeds", "a,b"],
                                  ["--hparam", "lr0.1"], ["--timeout", "0"], ["--timeout", "nan"],
                                  ["--timeout", "soon"]])
def test_invalid_numbers_exit_non_zero(tmp_path, argv):
    with pytest.raises(SystemExit) as info:
        main(["compare", *argv, "--tracking-uri", f"sqlite:///{tmp_path / 'n.db'}"])
    assert info.value.code != 0
    assert not (tmp_path / "n.db").exists()


def test_tracking_server_that_does_not_answer(capsys):
    port = free_port()  # a port nobody listens on
    code = main(["compare", "--optimizers", "sgd", "--tracking-uri", f"http://127.0.0.1:{port}", *FAST])
    assert code != 0
    assert "does not answer" in capsys.readouterr().err


def test_file_store_is_refused(tmp_path, capsys):
    assert main(["compare", "--optimizers", "sgd", "--tracking-uri", f"file://{tmp_path}/mlruns", *FAST]) != 0
    assert "file store is deprecated" in capsys.readouterr().err


def test_list_prints_optimizers_strategies_and_callbacks(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "| adam " in out and "Kingma & Ba" in out
    ours = next(line for line in out.splitlines() if line.startswith("Strategies (ours)"))
    for name in ("gossip", "gossip_ring", "gossip_one_peer", "local_sgd", "easgd", "lsgd"):
        assert name in ours.split(": ")[1].split(", ")
    callbacks = next(line for line in out.splitlines() if line.startswith("Callbacks"))
    assert callbacks == ("Callbacks: ConsensusDistance, DivergenceMonitor, EdgeOfStability, GeneralizationGap, "
                         "GeneralizationMeasures, GradientNoiseScale, HessianSpectrum, LossLandscape, Sharpness, "
                         "Straggler")


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("compare", "list", "theory", "fit"):
        assert word in out


def test_fit_with_a_yaml_config_saves_it_as_an_mlflow_artifact(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fit.db'}"
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  optimizer: adam\n  model: mlp\n"
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 3\n  limit_val_batches: 2\n"
        "  enable_progress_bar: false\n  enable_checkpointing: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  logger:\n    class_path: lightning.pytorch.loggers.MLFlowLogger\n"
        f"    init_args:\n      experiment_name: fitexp\n      tracking_uri: {uri}\n"
        f"      artifact_location: {tmp_path / 'artifacts'}\n"
    )
    completed = subprocess.run([sys.executable, "-m", "lightning_optsurvey.cli", "fit", "--config", str(config)],
                               capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    client, exp, runs = _runs(uri, "fitexp")
    assert exp.tags[EXPERIMENT_KIND_TAG[0]] == EXPERIMENT_KIND_TAG[1]
    (run,) = runs
    assert run.data.params["optimizer"] == "adam"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "optimizer: adam" in text


def test_compare_with_the_measuring_callbacks_and_a_closure_optimizer(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    code = main(["compare", "--optimizers", "sgd,adam,sam", "--max-epochs", "2", "--limit-train-batches", "4",
                 "--tracking-uri", uri, "--experiment", "e"])
    assert code == 0
    client, _, runs = _runs(uri, "e")
    assert sorted(r.info.run_name for r in runs) == ["adam-seed0", "sam-seed0", "sgd-seed0"]
    for run in runs:
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        assert {"hessian/eig_1", "hessian/eig_2", "hessian/trace", "gen_gap/acc", "sharpness/sam"} <= set(metrics)
        assert metrics["hessian/eig_1"] >= metrics["hessian/eig_2"]
        # The default set measures the Hessian when training ends (and every 10 epochs): once in 2 epochs.
        assert len(client.get_metric_history(run.info.run_id, "hessian/eig_1")) == 1
    header = capsys.readouterr().out
    assert "hessian/eig_1" in header and "gen_gap/acc" in header and "sharpness/sam" in header


def test_theory_prints_the_table_and_logs_each_check(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 't.db'}"
    assert main(["theory", "--only", "gd_convex,one_peer_exact_averaging", "--tracking-uri", uri,
                 "--experiment", "th"]) == 0
    out = capsys.readouterr().out
    assert "gd_convex" in out and "one_peer_exact_averaging" in out and "2/2 hold" in out
    client, _, runs = _runs(uri, "th")
    assert sorted(r.info.run_name for r in runs) == ["gd_convex", "one_peer_exact_averaging"]
    for run in runs:
        assert run.data.metrics["holds"] == 1.0
        assert [a.path for a in client.list_artifacts(run.info.run_id, "theory")] == [
            f"theory/{run.info.run_name}.png"]


def test_theory_rejects_an_unknown_result(capsys):
    assert main(["theory", "--only", "nosuch"]) == 2
    assert "known results" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ddp", "gossip_ring", "easgd", "easgd_async", "ddp_powersgd"])
def test_timeout_reaches_the_strategy(name):
    from datetime import timedelta

    from lightning_optsurvey.cli.compare import RunConfig, build_strategy

    strategy = build_strategy(RunConfig(optimizer="sgd", seed=0, strategy=name, timeout=12.5))
    assert strategy._timeout == timedelta(seconds=12.5)
    assert build_strategy(RunConfig(optimizer="sgd", seed=0, strategy=name)) == name


def test_async_strategies_get_no_consensus_distance_callback():
    from lightning_optsurvey.callbacks import ConsensusDistance, default_callbacks

    def has_consensus(strategy):
        return any(isinstance(c, ConsensusDistance) for c in default_callbacks(4, strategy))

    assert has_consensus("gossip_ring") and has_consensus("easgd")
    assert not any(has_consensus(name) for name in ("easgd_async", "eamsgd", "lsgd_async"))
