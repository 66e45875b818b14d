"""benchmarks/heterogeneous_sweep.py: its one-process re-simulation against equivalences that hold exactly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        path = ROOT / "benchmarks" / "heterogeneous_sweep.py"
        spec = importlib.util.spec_from_file_location("heterogeneous_sweep", path)
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return module


def test_dpsgd_on_a_complete_graph_is_ddp(sweep):
    # A ring of 3 is the complete graph (W = 11^T / 3): one gossip round is the exact average.
    setting = sweep.Setting(world=3, epochs=1, batch=64)
    ddp = sweep.simulate("ddp", 0, 0.0, setting)
    dpsgd = sweep.simulate("dpsgd", 0, 0.0, setting)
    assert ddp.steps == dpsgd.steps > 1
    torch.testing.assert_close(dpsgd.models, ddp.models, rtol=1e-5, atol=1e-6)
    assert not torch.equal(dpsgd.models[0], torch.zeros_like(dpsgd.models[0]))


def test_uncompressed_choco_with_unit_step_is_dpsgd(sweep):
    # Top-k with ratio 1 sends everything: x_hat = h, and x = h + (W h - h) = W h on any graph.
    setting = sweep.Setting(world=4, epochs=1, batch=64, ratio=1.0)
    choco = sweep.simulate("choco", 1, 1.0, setting)
    dpsgd = sweep.simulate("dpsgd", 1, 0.0, setting)
    torch.testing.assert_close(choco.models, dpsgd.models, rtol=1e-5, atol=1e-6)
    assert choco.consensus_distance > 0  # a ring of 4 does not average exactly in one round
    assert choco.bytes_per_step == pytest.approx(2.0)  # every value plus its int32 index


def test_top1_percent_byte_ratios(sweep):
    setting = sweep.Setting(world=4, epochs=1, batch=64)
    d = sweep.simulate("dpsgd", 0, 0.0, setting).models.shape[1]
    k = max(1, round(0.01 * d))
    assert sweep.simulate("choco", 0, 0.2, setting).bytes_per_step == pytest.approx(2 * k / d)
    assert sweep.simulate("beer", 0, 0.2, setting).bytes_per_step == pytest.approx(4 * k / d)
