"""One model per run: what local SGD, EASGD and LSGD log, checkpoint and evaluate is the same model.

``tests/_dist/one_model_scenarios.py`` trains on digits on 2 gloo ranks with ``ModelCheckpoint`` and
then runs ``test(ckpt_path=best)`` on 2 processes; here the checkpoint file is evaluated in this single
process with a plain Trainer. EASGD's center (its checkpoint model) must be about as good as its workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _dist.launch import launch, load_ranks
from lightning.pytorch import Trainer

from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

LOSS_REL = 1e-5  # float32 means over 2 shards of 180 samples vs one mean over 360
CENTER_POINTS = 0.03  # the issue's bound: the center within 3 accuracy points of the workers' mean


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_model")
    launch("one_model_scenarios.py", out, "checkpoints:easgd", "easgd_center", procs_per_node=2, timeout=540)
    return out


@pytest.fixture(scope="module")
def two_ranks_more(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_model_more")
    launch("one_model_scenarios.py", out, "checkpoints:local_sgd", "checkpoints:lsgd", procs_per_node=2,
           timeout=540)
    return out


def _one_process(path: str, stage: str) -> dict[str, float]:
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    model = ClassifierModule.load_from_checkpoint(path)
    run = trainer.validate if stage == "val" else trainer.test
    return {k: float(v) for k, v in run(model, datamodule=DigitsDataModule(batch_size=32), verbose=False)[0].items()}


def test_best_checkpoint_score_and_test_from_checkpoint_match_one_process(two_ranks: Path) -> None:
    _check_checkpoint(two_ranks, "easgd")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["local_sgd", "lsgd"])
def test_best_checkpoint_matches_one_process_local_sgd_lsgd(two_ranks_more: Path, name: str) -> None:
    _check_checkpoint(two_ranks_more, name)


def _check_checkpoint(out: Path, name: str) -> None:
    results = [r[name] for r in load_ranks(out, f"checkpoints_{name}", 2)]
    assert results[0] == results[1]  # both ranks logged and tested the same
    result = results[0]
    # ModelCheckpoint's score describes its file: the file's model, evaluated in one process, scores it.
    validated = _one_process(result["best_path"], "val")
    assert validated["val/acc"] == pytest.approx(result["best_score"], abs=1e-6)
    # test(ckpt_path=...) on 2 processes evaluates the checkpoint's model, as 1 process does.
    tested = _one_process(result["best_path"], "test")
    assert tested["test/acc"] == pytest.approx(result["test"]["test/acc"], abs=1e-6)
    assert tested["test/loss"] == pytest.approx(result["test"]["test/loss"], rel=LOSS_REL)


def _check_center(results: list[dict[str, Any]], world: int) -> None:
    for result in results:
        assert result["alpha_rule"] == "beta/N"
        assert len(result["workers"]) == world and result["workers"] == results[0]["workers"]
        mean = sum(result["workers"]) / world
        assert abs(result["center"] - mean) <= CENTER_POINTS, (result["center"], result["workers"])
        assert result["center"] > 0.5  # 3 epochs of SGD on digits: the models did learn (chance is 0.1)
        # What Lightning logs as val/acc is the center's accuracy (the checkpoint's model).
        assert result["logged_val_acc"] == pytest.approx(result["center"], abs=1e-6)


def test_easgd_center_tracks_its_workers_on_two_ranks(two_ranks: Path) -> None:
    _check_center(load_ranks(two_ranks, "easgd_center", 2), 2)


@pytest.mark.slow
def test_easgd_center_tracks_its_workers_on_four_ranks(tmp_path: Path) -> None:
    launch("one_model_scenarios.py", tmp_path, "easgd_center", procs_per_node=4, timeout=540)
    _check_center(load_ranks(tmp_path, "easgd_center", 4), 4)
