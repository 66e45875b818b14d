"""benchmarks/gpu_check.py: a clean skip without CUDA, and the same checks passing on the CPU (slow)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_without_cuda_it_skips_cleanly(capsys):
    assert _load().main([]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


@pytest.mark.slow
def test_the_cpu_run_passes_every_check(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "non-perturbation ok" in out and "optimizer paths ok" in out
    for title in ("### HVP on cpu", "### Lanczos on cpu", "### bfloat16 HVP", "### Non-perturbation",
                  "### Optimizer iterations on cpu, mlp, bfloat16"):
        assert title in out
