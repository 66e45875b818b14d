"""Writing a measuring callback's files (figures, JSON grids) where the run's logger keeps artifacts.

With an ``MLFlowLogger`` the file goes to the run's artifact store through the logger's own client
(``logger.experiment.log_artifact(run_id, path, artifact_path)``), so library code never imports mlflow;
otherwise it stays under ``trainer.log_dir`` (or ``trainer.default_root_dir`` without a logger).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import MLFlowLogger

__all__ = ["save_artifact", "save_figure", "save_json"]


def _local_root(trainer: Trainer) -> str | None:
    """Where files stay when no MLflow logger takes them (``None`` when one does).

    Called on *every* rank: ``trainer.log_dir`` is a collective (rank 0's directory is broadcast), so
    reading it on rank 0 alone would leave rank 0 waiting for the others forever.
    """
    if _mlflow_loggers(trainer):
        return None
    root = trainer.log_dir if trainer.loggers else None
    return str(root or trainer.default_root_dir)


def _mlflow_loggers(trainer: Trainer) -> list[MLFlowLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def save_artifact(trainer: Trainer, local_path: str | os.PathLike, artifact_path: str) -> None:
    """Upload ``local_path`` to every MLflow logger's run under ``artifact_path`` (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    for logger in _mlflow_loggers(trainer):
        logger.experiment.log_artifact(logger.run_id, str(local_path), artifact_path)


def _target(root: str | None, artifact_path: str, filename: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        return Path(tmp.name) / filename, tmp
    directory = Path(root) / artifact_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory / filename, None


def save_json(trainer: Trainer, data: Any, artifact_path: str, filename: str) -> Path | None:
    """Write ``data`` as JSON to the artifact store (MLflow) or ``log_dir/artifact_path/filename``.

    Returns:
        The local path when the file stays local, ``None`` when it went to MLflow (or not rank 0).
    """
    root = _local_root(trainer)  # every rank: a collective
    if not trainer.is_global_zero:
        return None
    path, tmp = _target(root, artifact_path, filename)
    path.write_text(json.dumps(data, indent=1))
    return _finish(trainer, path, artifact_path, tmp)


def save_figure(trainer: Trainer, figure: Any, artifact_path: str, filename: str) -> Path | None:
    """Save a matplotlib figure as PNG to the artifact store (MLflow) or under ``log_dir``, then close it.

    A ``matplotlib.figure.Figure`` built without pyplot needs no closing; a pyplot figure is closed.
    """
    try:
        root = _local_root(trainer)  # every rank: a collective
        if not trainer.is_global_zero:
            return None
        path, tmp = _target(root, artifact_path, filename)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        return _finish(trainer, path, artifact_path, tmp)
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(figure)


def _finish(trainer: Trainer, path: Path, artifact_path: str, tmp: tempfile.TemporaryDirectory | None) -> Path | None:
    if tmp is None:
        return path
    try:
        save_artifact(trainer, path, artifact_path)
    finally:
        tmp.cleanup()
    return None
