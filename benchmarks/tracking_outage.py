"""What a tracking-server outage costs ``optsurvey fit`` and ``optsurvey compare``: wall time and lost records.

Starts a real ``mlflow server`` (sqlite store, one worker) on a free port, then runs the command three times
side by side: without an outage (the anchor), with the server killed (by its process group) once the first
run exists and never restarted (``--sync-wait`` bounds the wait), and killed then restarted ``--down``
seconds later. For each it prints the wall time and its ratio to the anchor, the recorded
``time/train_seconds``, and whether every metric history on the server equals the outbox's (after the
printed ``optsurvey sync`` command, for the outage that never ends).

    python benchmarks/tracking_outage.py --command fit --epochs 3 --down 30
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_tracking import Server  # noqa: E402  (the real server the outage tests start and kill)


def _command(kind: str, folder: Path, uri: str, epochs: int, sync_wait: float) -> list[str]:
    if kind == "compare":
        return [str(BIN / "optsurvey"), "compare", "--optimizers", "sgd,adam", "--max-epochs", str(epochs),
                "--no-measure", "--tracking-uri", uri, "--experiment", "outage", "--sync-wait", str(sync_wait)]
    config = folder / "fit.yaml"
    config.write_text(f"model:\n  model: cnn\n  optimizer: adam\ntrainer:\n  max_epochs: {epochs}\n"
                      "  enable_progress_bar: false\n  enable_checkpointing: false\n  logger:\n"
                      "    class_path: lightning.pytorch.loggers.MLFlowLogger\n"
                      f"    init_args: {{experiment_name: outage, tracking_uri: '{uri}'}}\n")
    return [str(BIN / "optsurvey"), "fit", "--config", str(config), "--sync-wait", str(sync_wait)]


def _first_run_exists(folder: Path) -> bool:
    # Read-only SQL: an MlflowClient here would create the store's tables while the command creates them too.
    try:
        with sqlite3.connect(f"file:{folder / 'optsurvey-outbox.db'}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _compare_stores(folder: Path, uri: str) -> tuple[int, bool, list[float]]:
    from mlflow.tracking import MlflowClient

    local, remote = MlflowClient(tracking_uri=f"sqlite:///{folder / 'optsurvey-outbox.db'}"), MlflowClient(uri)
    local_runs = local.search_runs([local.get_experiment_by_name("outage").experiment_id])
    exp = remote.get_experiment_by_name("outage")
    remote_runs = {r.data.tags.get("optsurvey.source_run_id"): r for r in remote.search_runs([exp.experiment_id])} \
        if exp else {}
    same = True
    for run in local_runs:
        copied = remote_runs.get(run.info.run_id)
        if copied is None:
            same = False
            continue
        for key in run.data.metrics:
            a = [(m.step, m.value) for m in local.get_metric_history(run.info.run_id, key)]
            b = [(m.step, m.value) for m in remote.get_metric_history(copied.info.run_id, key)]
            same &= repr(a) == repr(b)
    seconds = [r.data.metrics.get("time/train_seconds", float("nan")) for r in local_runs]
    return len(remote_runs), same, seconds


def scenario(kind: str, outage: str, epochs: int, down: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"outage-{outage}-"))
    server = Server(folder)
    server.start()
    started = time.monotonic()
    process = subprocess.Popen(_command(kind, folder, server.uri, epochs, 300 if outage == "restart" else 5),
                               cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    killed_at = back_at = None
    if outage != "none":
        while not _first_run_exists(folder):
            time.sleep(0.5)
        server.kill()
        killed_at = time.monotonic() - started
        if outage == "restart":
            time.sleep(down)
            server.start()
            back_at = time.monotonic() - started
    _, err = process.communicate(timeout=1800)
    wall = time.monotonic() - started
    if outage == "never":
        server.start()
        command = next(line.strip() for line in err.splitlines() if line.strip().startswith("optsurvey sync"))
        subprocess.run([str(BIN / "optsurvey"), *command.split()[1:]], cwd=folder, check=True, capture_output=True)
    delivered, same, seconds = _compare_stores(folder, server.uri)
    server.kill()
    return {"outage": outage, "exit": process.returncode, "wall": wall, "killed_at": killed_at, "back_at": back_at,
            "delivered": delivered, "same": same, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", choices=["fit", "compare"], default="fit")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--down", type=float, default=30.0, help="seconds the server stays down (restart case)")
    args = parser.parse_args()
    rows = [scenario(args.command, outage, args.epochs, args.down) for outage in ("none", "never", "restart")]
    anchor = rows[0]["wall"]
    print(f"| {args.command}: outage | exit | wall s | x anchor | killed at s | back at s | runs on server | "
          "histories equal | time/train_seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['outage']} | {r['exit']} | {r['wall']:.1f} | {r['wall'] / anchor:.2f} | "
              f"{r['killed_at'] or 0:.1f} | {r['back_at'] or 0:.1f} | {r['delivered']} | {r['same']} | "
              f"{', '.join(f'{s:.2f}' for s in r['train_seconds'])} |")


if __name__ == "__main__":
    main()
