"""End to end against a real ``mlflow server``: started on 127.0.0.1, stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _support import free_port
from mlflow.tracking import MlflowClient

SERVER_START_TIMEOUT_S = 90


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        # The server runs workers in child processes: stop the whole group by the leader's PID.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


@pytest.mark.timeout(300)
def test_compare_against_a_real_tracking_server(mlflow_server, tmp_path):
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("optsurvey")), "compare", "--optimizers", "sgd,adam",
         "--max-epochs", "2", "--limit-train-batches", "5", "--tracking-uri", mlflow_server,
         "--experiment", "server-test"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"{mlflow_server}/#/experiments/" in completed.stdout
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["adam-seed0", "sgd-seed0"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["optimizer"] in ("sgd", "adam")
        assert run.data.params["seed"] == "0"
        assert 0.0 <= run.data.metrics["val/acc"] <= 1.0
        history = client.get_metric_history(run.info.run_id, "val/loss")
        assert len(history) == 2  # one value per epoch
        assert "train/loss" in run.data.metrics
