"""Shared by the multi-process benchmarks: wait for every rank, then read rank 0's results."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import IO, Any


def wait_for_ranks(procs: list[tuple[subprocess.Popen, IO[str]]], out: Path, world: int,
                   timeout: float) -> Any:
    """Wait for the rank processes (killing any still running after ``timeout`` seconds in all), close
    their logs, and return ``out/results.json``; a failed rank raises with the tail of every rank's log."""
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if any(proc.returncode for proc, _ in procs):
        raise RuntimeError("a rank failed:\n" + "\n".join((out / f"rank{r}.log").read_text()[-3000:]
                                                           for r in range(world)))
    return json.loads((out / "results.json").read_text())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: one header row, a rule, then ``rows`` (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
