"""Tracking that survives its server: the local outbox, run copying, delivery and ``optsurvey sync``.

The fast tests copy runs between two SQLite stores (the copy is what delivery does to a server) and let
a delivery thread face a port where nothing listens. The slow tests run ``optsurvey compare`` against a
real ``mlflow server`` killed mid-sweep by its process group, once restarted and once for good.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _support import free_port
from mlflow.tracking import MlflowClient

from lightning_optsurvey.cli import main
from lightning_optsurvey.tracking import SOURCE_TAG, SYNCED_TAG, SYNCED_TO_TAG, Delivery, copy_run, pending_runs


def _histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float, int]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k)] for k in keys}


def _make_run(client: MlflowClient, experiment: str, tmp_path: Path) -> str:
    exp_id = client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name="sgd-seed0", tags={"optimizer": "sgd"})
    run_id = run.info.run_id
    client.log_param(run_id, "optimizer.lr", "0.1")
    for step in range(30):
        client.log_metric(run_id, "train/loss", 1.0 / (step + 1), step=step, timestamp=1000 + step)
    client.log_metric(run_id, "val/acc", float("nan"), step=3)  # a diverged value travels as it is
    (tmp_path / "density.json").write_text('{"nodes": [1, 2]}')
    client.log_artifact(run_id, str(tmp_path / "density.json"), "hessian")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_delivery_keeps_runs_while_the_server_is_away_then_sync_copies_everything_once(
        tmp_path: Path, capsys) -> None:
    outbox = f"sqlite:///{tmp_path / 'outbox.db'}"
    local = MlflowClient(tracking_uri=outbox)
    run_id = _make_run(local, "e", tmp_path)
    # the server is away: delivery keeps the run and gives up within its wait, never holding the sweep
    dead = f"http://127.0.0.1:{free_port()}"
    delivery = Delivery(outbox, dead, "e", retry_every=0.2)
    delivery.submit(run_id)
    started = time.monotonic()
    report = delivery.finish(wait=1.0)
    assert time.monotonic() - started < 15, "a dead server must not hold the sweep"
    assert report.pending == [run_id] and not report.delivered
    assert pending_runs(outbox, "e") == [(run_id, "e")]
    assert main(["sync", "--from", outbox, "--to", dead]) == 2  # still down: one line, exit 2
    assert "does not answer" in capsys.readouterr().err
    # a copy cut short by an earlier outage (no synced tag) is replaced, not kept beside the new one
    server = f"sqlite:///{tmp_path / 'server.db'}"  # a store that answers stands in for the server
    remote = MlflowClient(tracking_uri=server)
    remote_exp = remote.create_experiment("e")
    remote.create_run(remote_exp, tags={SOURCE_TAG: run_id})
    assert main(["sync", "--from", outbox, "--to", server]) == 0
    assert "delivered 1 of 1" in capsys.readouterr().out
    assert pending_runs(outbox) == []
    assert SYNCED_TO_TAG in local.get_run(run_id).data.tags
    runs = remote.search_runs([remote_exp])
    assert len(runs) == 1
    copied = runs[0].info.run_id
    assert copy_run(local, remote, run_id, remote_exp) == copied  # a second delivery reuses the copy
    target = remote.get_run(copied)
    assert target.info.status == "FINISHED" and target.info.run_name == "sgd-seed0"
    assert target.data.params == {"optimizer.lr": "0.1"}
    assert target.data.tags["optimizer"] == "sgd" and target.data.tags[SYNCED_TAG] == "true"
    local_h, remote_h = _histories(local, run_id), _histories(remote, copied)
    assert local_h.keys() == remote_h.keys() and len(local_h["train/loss"]) == 30
    assert local_h["train/loss"] == remote_h["train/loss"]
    assert [a.path for a in remote.list_artifacts(copied, "hessian")] == ["hessian/density.json"]


# ------------------------------------------------------------------------------- real server (slow)


class Server:
    """An ``mlflow server`` on a fixed port and store, started and killed by its process group."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.process = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            stdout=open(self.folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError((self.folder / "server.log").read_text()[-3000:])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _compare(folder: Path, uri: str, sync_wait: float) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("optsurvey")), "compare", "--optimizers", "sgd,adam",
         "--max-epochs", "3", "--no-measure", "--tracking-uri", uri, "--experiment", "outage",
         "--sync-wait", str(sync_wait)],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_first_run(folder: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1)
        # Read-only SQL: an MlflowClient here would create the store's tables while the command creates them too.
        try:
            with sqlite3.connect(f"file:{folder / 'optsurvey-outbox.db'}?mode=ro", uri=True) as db:
                if db.execute("SELECT count(*) FROM runs").fetchone()[0] > 0:
                    return
        except sqlite3.Error:
            continue
    raise RuntimeError("the first run did not start")


def _assert_delivered(outbox: str, server: str) -> None:
    local, remote = MlflowClient(tracking_uri=outbox), MlflowClient(tracking_uri=server)
    local_runs = local.search_runs([local.get_experiment_by_name("outage").experiment_id])
    remote_runs = remote.search_runs([remote.get_experiment_by_name("outage").experiment_id])
    assert sorted(r.info.run_name for r in remote_runs) == ["adam-seed0", "sgd-seed0"]
    by_source = {r.data.tags[SOURCE_TAG]: r for r in remote_runs}
    for run in local_runs:
        copied = by_source[run.info.run_id]
        assert copied.info.status == "FINISHED" and copied.data.params == run.data.params
        assert _histories(local, run.info.run_id) == _histories(remote, copied.info.run_id)
        assert run.data.metrics["time/train_seconds"] < 60, "waiting for the server counted as training"


@contextmanager
def _server_killed_after_the_first_run(tmp_path: Path, sync_wait: int) -> Iterator[tuple[Server, subprocess.Popen]]:
    """A real server, ``optsurvey compare`` against it, and the server killed once the first run is recorded;
    yields both. On the way out the sweep (if still running) and the server are killed."""
    server = Server(tmp_path)
    server.start()
    compare = _compare(tmp_path, server.uri, sync_wait=sync_wait)
    try:
        _wait_for_first_run(tmp_path)
        server.kill()
        yield server, compare
    finally:
        if compare.poll() is None:
            os.killpg(compare.pid, signal.SIGKILL)
        server.kill()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_killed_mid_sweep_and_restarted_loses_nothing(tmp_path: Path) -> None:
    with _server_killed_after_the_first_run(tmp_path, sync_wait=300) as (server, compare):
        time.sleep(30)
        server.start()
        out, err = compare.communicate(timeout=600)
        assert compare.returncode == 0, err[-3000:]
        assert "did not answer" not in err and "| adam " in out
        _assert_delivered(f"sqlite:///{tmp_path / 'optsurvey-outbox.db'}", server.uri)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_that_never_returns_leaves_every_record_and_an_upload_command(tmp_path: Path) -> None:
    with _server_killed_after_the_first_run(tmp_path, sync_wait=5) as (server, compare):
        out, err = compare.communicate(timeout=600)
        assert compare.returncode == 0, err[-3000:]
        assert "| sgd " in out and "| adam " in out  # the sweep completed, the table printed
        command = next(line.strip() for line in err.splitlines() if line.strip().startswith("optsurvey sync"))
        server.start()
        upload = subprocess.run([str(Path(sys.executable).with_name("optsurvey")), *command.split()[1:]],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert upload.returncode == 0, upload.stderr[-3000:]
        _assert_delivered(f"sqlite:///{tmp_path / 'optsurvey-outbox.db'}", server.uri)


class _HealthOnly(BaseHTTPRequestHandler):
    """A tracking server that passes its health check and then fails every request (an outage mid-run)."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b"OK")

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


def test_fit_logs_to_the_outbox_when_the_server_goes_away_and_sync_delivers_it(tmp_path: Path, capsys) -> None:
    """``optsurvey fit`` with an http tracking URI: the run is kept whole in the outbox, one message says how to
    upload it, and ``optsurvey sync`` delivers it (a diverged run, filterable by its tag, with its config)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    outbox = f"sqlite:///{tmp_path / 'outbox.db'}"
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  model: mlp\n  optimizer: sgd\n  optimizer_kwargs: {lr: 1.0e+30}\n"
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 3\n  limit_val_batches: 1\n  enable_progress_bar: false\n"
        f"  enable_checkpointing: false\n  default_root_dir: {tmp_path}\n"
        "  logger:\n    class_path: lightning.pytorch.loggers.MLFlowLogger\n"
        f"    init_args: {{experiment_name: fitout, tracking_uri: '{uri}'}}\n")
    try:
        started = time.monotonic()
        with pytest.warns(RuntimeWarning, match="training diverged"):  # DivergenceMonitor is on by default
            code = main(["fit", "--config", str(config), "--outbox", outbox, "--sync-wait", "1"])
        assert code == 0 and time.monotonic() - started < 90
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert f"the tracking server {uri} did not answer; 1 run(s) are kept in {outbox}" in err
    command = next(line.strip() for line in err.splitlines() if line.strip().startswith("optsurvey sync"))
    assert command == f"optsurvey sync --from {outbox} --to {uri} --experiment fitout"
    local = MlflowClient(tracking_uri=outbox)
    (run,) = local.search_runs([local.get_experiment_by_name("fitout").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["optimizer"] == "sgd"
    assert run.data.metrics["time/train_seconds"] > 0
    # the server is back (a store that answers stands in for it): the command's arguments deliver the run
    target = f"sqlite:///{tmp_path / 'server.db'}"
    assert main(["sync", "--from", outbox, "--to", target, "--experiment", "fitout"]) == 0
    remote = MlflowClient(tracking_uri=target)
    exp = remote.get_experiment_by_name("fitout")
    (diverged,) = remote.search_runs([exp.experiment_id], filter_string="tags.diverged = 'true'")
    assert diverged.data.tags[SOURCE_TAG] == run.info.run_id and diverged.data.params == run.data.params
    assert repr(_histories(local, run.info.run_id)) == repr(_histories(remote, diverged.info.run_id))  # NaN too
    assert "config.yaml" in [a.path for a in remote.list_artifacts(diverged.info.run_id)]
    assert remote.search_runs([exp.experiment_id], filter_string="tags.diverged = 'false'") == []


def test_theory_logs_to_the_outbox_when_the_server_goes_away(tmp_path: Path, capsys) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    outbox = f"sqlite:///{tmp_path / 'outbox.db'}"
    try:
        assert main(["theory", "--only", "gd_convex", "--tracking-uri", uri, "--experiment", "th",
                     "--outbox", outbox, "--sync-wait", "0.5"]) == 0
    finally:
        server.shutdown()
    assert f"optsurvey sync --from {outbox} --to {uri} --experiment th" in capsys.readouterr().err
    target = f"sqlite:///{tmp_path / 'server.db'}"
    assert main(["sync", "--from", outbox, "--to", target]) == 0
    remote = MlflowClient(tracking_uri=target)
    (run,) = remote.search_runs([remote.get_experiment_by_name("th").experiment_id])
    assert run.info.run_name == "gd_convex" and run.data.metrics["holds"] == 1.0
    assert [a.path for a in remote.list_artifacts(run.info.run_id, "theory")] == ["theory/gd_convex.png"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fit_with_a_server_killed_for_good_completes_and_the_upload_command_delivers(tmp_path: Path) -> None:
    server = Server(tmp_path)
    server.start()
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  model: mlp\n  optimizer: adam\n"
        "trainer:\n  max_epochs: 4\n  enable_progress_bar: false\n  enable_checkpointing: false\n"
        "  logger:\n    class_path: lightning.pytorch.loggers.MLFlowLogger\n"
        f"    init_args: {{experiment_name: outage, tracking_uri: '{server.uri}'}}\n")
    fit = subprocess.Popen([str(Path(sys.executable).with_name("optsurvey")), "fit", "--config", str(config),
                            "--sync-wait", "5"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        _wait_for_first_run(tmp_path)
        server.kill()
        _, err = fit.communicate(timeout=600)
        assert fit.returncode == 0, err[-3000:]
        command = next(line.strip() for line in err.splitlines() if line.strip().startswith("optsurvey sync"))
        server.start()
        upload = subprocess.run([str(Path(sys.executable).with_name("optsurvey")), *command.split()[1:]],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert upload.returncode == 0, upload.stderr[-3000:]
        local = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'optsurvey-outbox.db'}")
        remote = MlflowClient(tracking_uri=server.uri)
        (run,) = local.search_runs([local.get_experiment_by_name("outage").experiment_id])
        (copied,) = remote.search_runs([remote.get_experiment_by_name("outage").experiment_id],
                                       filter_string="tags.diverged = 'false'")
        assert copied.data.tags[SOURCE_TAG] == run.info.run_id and copied.info.status == "FINISHED"
        assert _histories(local, run.info.run_id) == _histories(remote, copied.info.run_id)
        assert len(_histories(remote, copied.info.run_id)["val/loss"]) == 4
    finally:
        if fit.poll() is None:
            os.killpg(fit.pid, signal.SIGKILL)
        server.kill()


def test_sync_from_a_mistyped_outbox_or_experiment_says_so_and_creates_nothing(tmp_path: Path, capsys) -> None:
    target = f"sqlite:///{tmp_path / 'server.db'}"
    missing = tmp_path / "outbx.db"
    assert main(["sync", "--from", f"sqlite:///{missing}", "--to", target]) == 2
    assert "no outbox at" in capsys.readouterr().err and not missing.exists()
    outbox = f"sqlite:///{tmp_path / 'outbox.db'}"
    MlflowClient(tracking_uri=outbox).create_experiment("kept")
    assert main(["sync", "--from", outbox, "--to", target, "--experiment", "keptt"]) == 2
    assert "has no experiment 'keptt'; it has ['Default', 'kept']" in capsys.readouterr().err
