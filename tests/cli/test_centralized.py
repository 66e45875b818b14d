"""``optsurvey compare`` with the centralized strategies on several CPU processes (slow: a run per strategy)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]


def test_compare_trains_every_centralized_strategy_on_several_processes(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    command = [sys.executable, "-m", "lightning_optsurvey.cli", "compare", "--optimizers", "sgd",
               "--strategy", "local_sgd,easgd,lsgd,grawa", "--devices", "2", "--max-epochs", "2",
               "--limit-train-batches", "8", "--no-measure", "--tracking-uri", uri, "--experiment", "c"]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=840, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("c").experiment_id])
    assert sorted(r.data.params["strategy"] for r in runs) == ["easgd", "grawa", "local_sgd", "lsgd"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["world_size"] == "2"
        assert int(run.data.params["sync_every"]) >= 1  # the strategy's own parameters reach MLflow
        assert "comm/bytes_sent" in run.data.metrics and "val/acc" in run.data.metrics
