"""Start a script once per rank, as a cluster launcher would, with a hard timeout.

Lightning's own launcher re-executes ``sys.argv``, which inside pytest would re-run pytest. Here every
rank is a plain ``python script.py OUT_DIR ...`` process with ``LOCAL_RANK``, ``NODE_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and a fresh ``MASTER_PORT``; Lightning sees ``LOCAL_RANK`` and
does not launch anything itself. ``nodes > 1`` emulates several machines on loopback. Nothing can hang:
after ``timeout`` seconds every process is killed and the test fails with the processes' output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _support import free_port

DIST_DIR = Path(__file__).resolve().parent


def launch(
    script: str | Path,
    out_dir: str | Path,
    *args: str,
    nodes: int = 1,
    procs_per_node: int = 2,
    timeout: float = 120.0,
) -> list[str]:
    """Run ``script`` on ``nodes * procs_per_node`` ranks; return each rank's output; raise on failure."""
    script = DIST_DIR / script if not Path(script).is_absolute() else Path(script)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    world = nodes * procs_per_node
    procs: list[tuple[subprocess.Popen, Path]] = []
    for node in range(nodes):
        for local in range(procs_per_node):
            env = dict(
                os.environ,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                NODE_RANK=str(node),
                LOCAL_RANK=str(local),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(procs_per_node),
                OMP_NUM_THREADS="1",
                PYTHONHASHSEED="0",
                PYTHONPATH=os.pathsep.join([str(DIST_DIR), os.environ.get("PYTHONPATH", "")]),
            )
            log = out_dir / f"log_node{node}_local{local}.txt"
            with open(log, "w") as handle:
                cmd = [sys.executable, str(script), str(out_dir), *args]
                procs.append((subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    timed_out = False
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
        for proc, _ in procs:
            proc.wait()
    outputs = [log.read_text() for _, log in procs]
    failed = [(i, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if timed_out or failed:
        tails = "\n".join(f"--- rank {i} (rc={p.returncode}) ---\n{out[-3000:]}"
                          for i, ((p, _), out) in enumerate(zip(procs, outputs)))
        reason = f"timed out after {timeout}s" if timed_out else f"failed ranks {failed}"
        raise AssertionError(f"{script.name} {reason}\n{tails}")
    return outputs


def launched(tmp_path_factory: Any, script: str, *args: str, **kwargs: Any) -> Path:
    """:func:`launch` ``script`` into a fresh temporary folder (pytest's ``tmp_path_factory``); return the folder."""
    out = tmp_path_factory.mktemp(Path(script).stem)
    launch(script, out, *args, **kwargs)
    return out


def load_ranks(out_dir: str | Path, scenario: str, world: int) -> list[dict[str, Any]]:
    """What each of ``world`` ranks saved for ``scenario`` (``{scenario}_rank{r}.pt`` in ``out_dir``)."""
    import torch

    return [torch.load(Path(out_dir) / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(world)]


def run_script(script: str | Path, *args: str, timeout: float = 120.0) -> str:
    """Run ``python script args`` as a plain user script (it may launch its own ranks); return its output.

    The script runs in a new session, so on timeout the whole process group, including any ranks it
    started, is killed.
    """
    import signal

    script = DIST_DIR / script if not Path(script).is_absolute() else Path(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{script.name} timed out after {timeout}s\n{output[-5000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} failed with rc={proc.returncode}\n{output[-5000:]}")
    return output
