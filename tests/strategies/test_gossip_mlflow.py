"""A plain script with ``Trainer(devices=N, strategy="gossip_ring")`` and an ``MLFlowLogger``.

Lightning's own launcher starts the ranks (as ``optsurvey compare --devices N`` does); the test reads the
MLflow store afterwards: rank 0 logged the model's hyperparameters, the topology and its spectral gap,
``comm/bytes_sent`` every step and ``gossip/consensus_distance``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _dist.launch import run_script

from lightning_optsurvey.strategies import Topology

pytestmark = [pytest.mark.distributed]


def _check_run(tmp_path: Path, devices: int) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_script("plain_gossip_mlflow.py", uri, str(tmp_path), str(devices), timeout=240)
    written = json.loads((tmp_path / "run.json").read_text())
    client = mlflow.MlflowClient(uri)
    run = client.get_run(written["run_id"])
    params = run.data.params
    assert params["topology"] == "ring"
    assert params["world_size"] == str(devices)
    assert float(params["spectral_gap"]) == pytest.approx(Topology("ring", devices).spectral_gap(), rel=1e-12)
    assert params["gossip_algorithm"] == "dpsgd" and params["optimizer"] == "sgd"
    neighbours = len(Topology("ring", devices).peers(0)[0])
    history = client.get_metric_history(written["run_id"], "comm/bytes_sent")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [neighbours * written["model_bytes"]] * 4
    distances = client.get_metric_history(written["run_id"], "gossip/consensus_distance")
    assert len(distances) == 2
    if devices == 2:  # two ranks: W = 11^T / 2 averages exactly, so the models agree after every round
        assert all(m.value == 0.0 for m in distances)
    else:
        assert all(m.value > 0 for m in distances)
    assert {"val/acc", "val/loss", "train/loss"} <= set(run.data.metrics)


@pytest.mark.timeout(300)
def test_plain_script_two_devices_logs_to_mlflow(tmp_path: Path) -> None:
    _check_run(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_script_four_devices_logs_to_mlflow(tmp_path: Path) -> None:
    _check_run(tmp_path, 4)
