"""Tracking that survives its server: log locally first, deliver to the MLflow server when it answers.

When an ``optsurvey`` command (``compare``, ``fit``, ``theory``) is given a tracking *server*
(``http(s)://``), every run is recorded in a local SQLite store (the *outbox*, ``optsurvey-outbox.db`` by
default) exactly as it would be on the server, and a background thread copies each finished run to the
server. Training never waits on the
network, so a server outage neither stalls a run nor inflates ``time/train_seconds``; records are on
disk (durable, in a transactional database) from the moment they are logged; a run is delivered when
the server answers again; and if it never does, the sweep still completes and prints one command
(``optsurvey sync ...``) that uploads what is pending later. Delivery is idempotent: a remote run
carries the tag ``optsurvey.source_run_id`` and is marked ``optsurvey.synced = "true"`` only after its
last record arrived, so a copy cut short by an outage is deleted and redone, never duplicated; the
local run is then tagged ``optsurvey.synced_to``.

What MLflow (and Lightning) provide and we use: Lightning's ``MLFlowLogger`` unchanged (pointed at the
outbox), the SQLite tracking store (local durability), ``MlflowClient``'s
``log_batch`` (params, metrics with their steps and timestamps, tags in batches of MLflow's limits),
``log_artifacts``/``download_artifacts``, ``set_terminated`` (status and end time kept), and its HTTP
client's retry and timeout settings, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and
``MLFLOW_HTTP_REQUEST_TIMEOUT`` (defaulted here to a few quick attempts, so a delivery attempt against a
dead server fails in seconds instead of MLflow's default several-minute backoff). What MLflow lacks
and this module adds: copying a whole run between tracking stores (MLflow's ``mlflow-export-import``
is a separate tool, not a dependency), the delivery queue that retries while training continues, and
the bookkeeping that makes redelivery safe. MLflow's own asynchronous logging
(``MLFLOW_ENABLE_ASYNC_LOGGING``) queues in memory only: records are lost when the process ends before
the server returns, which is why the outbox is a database on disk.

The same outbox serves every command that logs: ``optsurvey compare`` (each run delivered while the next
one trains), ``optsurvey fit``/``validate``/``test`` (an ``MLFlowLogger`` whose ``tracking_uri`` is a
server is built on the outbox instead; the run is delivered when the command ends) and ``optsurvey
theory`` (one run per check). :func:`deliver_pending` is the one ending they share: wait up to
``--sync-wait`` seconds, then one message with the upload command.

This module is the package's only importer of ``mlflow`` (the CLI, the examples and the tests of the
package go through it): experiments (:func:`ensure_experiment`, :func:`ui_hint`), reading runs back
(:func:`read_run`), logging a run in one call (:func:`log_run`), and delivery.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lightning_optsurvey.validation import check_float

__all__ = ["DEFAULT_OUTBOX", "EXPERIMENT_KIND_TAG", "Delivery", "SyncReport", "copy_run", "deliver_pending",
           "ensure_experiment", "is_server", "log_run", "pending_runs", "read_run", "server_answers", "sync",
           "ui_hint", "upload_command"]

#: Tag that makes the MLflow UI open an experiment on its runs table.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
HTTP_SCHEMES = ("http", "https")
DEFAULT_OUTBOX = "sqlite:///optsurvey-outbox.db"
SOURCE_TAG = "optsurvey.source_run_id"
SYNCED_TAG = "optsurvey.synced"
SYNCED_TO_TAG = "optsurvey.synced_to"
# One quick retry, short timeouts: an attempt against a dead server ends in seconds (MLflow's defaults
# are 7 retries with exponential backoff and a 120 s timeout, minutes per call).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _set_http_defaults() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking *server* (``http(s)://``), which an outage can take away."""
    return uri.split(":", 1)[0].lower() in HTTP_SCHEMES


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create (or find) the experiment and tag it so the MLflow UI opens on its runs table.

    Raises:
        ValueError: If the experiment exists but is deleted.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    key, value = EXPERIMENT_KIND_TAG
    if experiment is None:
        return client.create_experiment(name, tags={key: value})
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"experiment {name!r} is deleted in {tracking_uri}; restore it or choose another name")
    if experiment.tags.get(key) != value:
        client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def ui_hint(tracking_uri: str, experiment_id: str) -> tuple[str, str]:
    """The command that shows the runs, and the address of the experiment's runs view."""
    if is_server(tracking_uri):
        return (f"(server already running at {tracking_uri})",
                f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs")
    # The mlflow beside this interpreter, by its full path unless it is the one on PATH (an unactivated venv).
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    if not os.path.exists(mlflow_bin) or shutil.which("mlflow") == mlflow_bin:
        mlflow_bin = "mlflow"
    return (f"{mlflow_bin} ui --backend-store-uri {tracking_uri} --port 5000",
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")


def read_run(tracking_uri: str, run_id: str) -> tuple[dict[str, float], dict[str, str]]:
    """The latest metric values and the tags of one run."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    return dict(run.data.metrics), dict(run.data.tags)


def fail_unfinished_runs(tracking_uri: str, experiment: str, run_name: str) -> list[str]:
    """Mark FAILED the runs named ``run_name`` that are still RUNNING; their ids.

    A process killed outright (SIGKILL, out of memory) never ends its MLflow run: it would stay RUNNING in the
    UI and never be delivered by ``optsurvey sync``, which takes finished runs only.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    stuck = [run.info.run_id for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")
             if run.info.run_name == run_name]
    for run_id in stuck:
        client.set_terminated(run_id, "FAILED")
    return stuck


def log_run(tracking_uri: str, experiment_id: str, name: str, *, params: dict[str, str] | None = None,
            metrics: dict[str, float] | None = None, figures: dict[str, Any] | None = None,
            status: str = "FINISHED") -> str:
    """Record one complete run (params, metrics at step 0, matplotlib figures as artifacts); its id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in (params or {}).items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()])
    for path, figure in (figures or {}).items():
        client.log_figure(run_id, figure, path)
    client.set_terminated(run_id, status)
    return run_id


def server_answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the tracking server at ``uri`` answers its ``/health`` check now."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def copy_run(source: Any, target: Any, run_id: str, target_experiment_id: str) -> str:
    """Copy one finished run (params, tags, full metric histories, artifacts, status) to ``target``.

    ``source`` and ``target`` are ``MlflowClient``s. Idempotent: a complete earlier copy is reused, an
    incomplete one is deleted and redone. Returns the target's run id.
    """
    from mlflow.entities import Metric, Param, RunTag

    run = source.get_run(run_id)
    found = target.search_runs([target_experiment_id], filter_string=f"tags.`{SOURCE_TAG}` = '{run_id}'")
    for earlier in found:
        if earlier.data.tags.get(SYNCED_TAG) == "true":
            return earlier.info.run_id
        target.delete_run(earlier.info.run_id)  # cut short by an outage: redo it
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k != SYNCED_TO_TAG}
    copied = target.create_run(target_experiment_id, start_time=run.info.start_time,
                               tags={**tags, SOURCE_TAG: run_id}, run_name=run.info.run_name)
    new_id = copied.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for chunk in _chunks(params, 100):
        target.log_batch(new_id, params=chunk)
    metrics: list[Metric] = []
    for key in run.data.metrics:
        metrics.extend(source.get_metric_history(run_id, key))
    for chunk in _chunks(metrics, 1000):
        target.log_batch(new_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in chunk])
    if source.list_artifacts(run_id):
        with tempfile.TemporaryDirectory() as tmp:
            local = source.download_artifacts(run_id, "", tmp)
            target.log_artifacts(new_id, local)
    target.log_batch(new_id, tags=[RunTag(SYNCED_TAG, "true")])
    target.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
    return new_id


def _target_experiment(target: Any, name: str, tags: dict[str, str]) -> str:
    experiment = target.get_experiment_by_name(name)
    if experiment is None:
        return target.create_experiment(name, tags=tags)
    return experiment.experiment_id


def pending_runs(local_uri: str, experiment: str | None = None) -> list[tuple[str, str]]:
    """``(run_id, experiment name)`` of the finished local runs not yet delivered.

    Raises:
        ValueError: If ``experiment`` is given and the store has no experiment of that name.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_uri)
    experiments = client.search_experiments()
    if experiment is not None and experiment not in {exp.name for exp in experiments}:
        raise ValueError(f"{local_uri} has no experiment {experiment!r}; it has "
                         f"{sorted(exp.name for exp in experiments)}")
    out = []
    for exp in experiments:
        if experiment is not None and exp.name != experiment:
            continue
        for run in client.search_runs([exp.experiment_id], max_results=50000):
            if run.info.status != "RUNNING" and SYNCED_TO_TAG not in run.data.tags:
                out.append((run.info.run_id, exp.name))
    return out


@dataclass
class SyncReport:
    """What a delivery attempt did: ``delivered`` (local id -> remote id) and the still ``pending`` ids."""

    delivered: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    last_error: str | None = None


def _deliver(local_uri: str, remote_uri: str, run_id: str, experiment: str) -> str:
    from mlflow.tracking import MlflowClient

    _set_http_defaults()
    source = MlflowClient(tracking_uri=local_uri)
    target = MlflowClient(tracking_uri=remote_uri)
    local_exp = source.get_experiment_by_name(experiment)
    exp_tags = {k: v for k, v in (local_exp.tags if local_exp else {}).items() if k != "mlflow.note.content"}
    remote_id = copy_run(source, target, run_id, _target_experiment(target, experiment, exp_tags))
    source.set_tag(run_id, SYNCED_TO_TAG, f"{remote_uri} {remote_id}")
    return remote_id


def sync(local_uri: str, remote_uri: str, experiment: str | None = None) -> SyncReport:
    """Deliver every pending local run (of ``experiment``, or all) to the server now; one attempt each."""
    report = SyncReport()
    for run_id, name in pending_runs(local_uri, experiment):
        try:
            report.delivered[run_id] = _deliver(local_uri, remote_uri, run_id, name)
        except Exception as err:  # any failure leaves the run pending; it is retried later
            report.pending.append(run_id)
            report.last_error = f"{type(err).__name__}: {err}"
    return report


def upload_command(local_uri: str, remote_uri: str, experiment: str | None = None) -> str:
    """The command that delivers the pending runs later."""
    command = f"optsurvey sync --from {local_uri} --to {remote_uri}"
    return command + (f" --experiment {experiment!r}" if experiment and " " in experiment else
                      f" --experiment {experiment}" if experiment else "")


def deliver_pending(delivery: Delivery, wait: float, outbox: str, experiment: str | None = None) -> SyncReport:
    """End a command that logged to ``outbox``: wait up to ``wait`` s for delivery, then say what is left.

    Prints (to stderr) what it waits for and, when the server did not answer, one message naming the
    outbox and the ``optsurvey sync`` command that uploads the runs later.
    """
    if delivery.pending:
        print(f"delivering {len(delivery.pending)} run(s) to {delivery.remote_uri} "
              f"(waiting up to {wait:g} s) ...", file=sys.stderr, flush=True)
    report = delivery.finish(wait)
    if report.pending:
        print(f"\nthe tracking server {delivery.remote_uri} did not answer; {len(report.pending)} run(s) are kept "
              f"in {outbox} (every metric, param and artifact). Upload them when it is back:\n  "
              f"{upload_command(outbox, delivery.remote_uri, experiment)}", file=sys.stderr, flush=True)
    return report


class Delivery:
    """A background thread that delivers finished runs to the server, retrying while it is away.

    ``submit(run_id)`` after a run ends (returns at once); ``finish(wait)`` waits up to ``wait``
    seconds for what is still pending and returns the :class:`SyncReport`. Nothing here blocks training.
    """

    def __init__(self, local_uri: str, remote_uri: str, experiment: str, retry_every: float = 2.0) -> None:
        self.local_uri = local_uri
        self.remote_uri = remote_uri
        self.experiment = experiment
        self.retry_every = check_float("retry_every", retry_every, low=0.0, low_open=True)
        self.report = SyncReport()
        self._queue: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.outage_seconds = 0.0  # time delivery waited for the server
        self._thread = threading.Thread(target=self._loop, name="optsurvey-delivery", daemon=True)
        self._thread.start()

    def submit(self, run_id: str) -> None:
        with self._lock:
            self._queue.append(run_id)
        self._wake.set()

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return list(self._queue)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.retry_every)
            self._wake.clear()
            while True:
                with self._lock:
                    run_id = self._queue[0] if self._queue else None
                if run_id is None or self._stop.is_set():
                    break
                started = time.monotonic()
                try:
                    if not server_answers(self.remote_uri):
                        raise ConnectionError(f"{self.remote_uri} does not answer")
                    remote = _deliver(self.local_uri, self.remote_uri, run_id, self.experiment)
                except Exception as err:  # the server is away: keep the run, try again later
                    self.report.last_error = f"{type(err).__name__}: {err}"
                    self.outage_seconds += time.monotonic() - started
                    self._stop.wait(self.retry_every)
                    self.outage_seconds += self.retry_every
                    continue
                with self._lock:
                    self._queue.pop(0)
                    self.report.delivered[run_id] = remote

    def finish(self, wait: float) -> SyncReport:
        """Wait up to ``wait`` seconds for the queue to empty, then stop; return what was delivered."""
        deadline = time.monotonic() + max(0.0, wait)
        self._wake.set()
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.2)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=1)  # a copy cut short here is redone by the next delivery, never duplicated
        self.report.pending = self.pending
        return self.report
