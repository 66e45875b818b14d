"""``optsurvey compare --partition ...``: bad values fail before any run; a 4-process gossip run (slow) logs them."""

from __future__ import annotations

import re

import pytest
from mlflow.tracking import MlflowClient

from lightning_optsurvey.cli import main

FAST = ["--max-epochs", "1", "--limit-train-batches", "4", "--no-measure"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--partition", "label_skew"], "partition must be one of 'iid', 'dirichlet', 'shards', got 'label_skew'"),
        (["--partition", "dirichlet", "--alpha", "0"], "alpha .* must be in \\(0.*, got 0.0"),
        (["--partition", "shards", "--shards-per-rank", "0"], "shards_per_rank must be an integer >= 1, got 0"),
    ],
)
def test_bad_partition_fails_before_any_run(tmp_path, capsys, argv, message) -> None:
    code = main(["compare", "--optimizers", "sgd", *argv, "--tracking-uri", f"sqlite:///{tmp_path / 'p.db'}", *FAST])
    assert code != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "p.db").exists()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_gossip_ring_on_a_dirichlet_split_of_4_processes(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'd.db'}"
    code = main(["compare", "--strategy", "gossip_ring", "--partition", "dirichlet", "--alpha", "0.1", "--devices",
                 "4", "--optimizers", "sgd", "--tracking-uri", uri, "--experiment", "d", *FAST,
                 "--max-epochs", "3"])  # about 5 batches per rank an epoch; compare logs step metrics every 10 steps
    assert code == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("d").experiment_id])
    params = run.data.params
    assert params["partition"] == "dirichlet" and float(params["alpha"]) == 0.1
    assert params["topology"] == "ring" and params["world_size"] == "4"
    assert run.data.metrics["comm/bytes_sent"] > 0
