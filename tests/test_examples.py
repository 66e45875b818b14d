"""The examples and the ``optsurvey fit`` configs run as a user runs them, and log what they claim.

Each one runs as a subprocess in a fresh directory (so ``mlruns/``, ``lightning_logs/`` and checkpoints land
there), with one epoch of a few batches and, for the multi-process ones, 2 CPU processes started by
Lightning's own launcher. The checks read the MLflow store afterwards and compare the logged values with
closed forms or with an independent recomputation: the Edge-of-Stability values against the Hessian's and
``2 + 2 * momentum``; the generalization gap against the module's own validation loss (which only agrees if
the callbacks used the user's ``loss_fn``); a 2-process ring's spectral gap and consensus distance against
exact averaging; the consensus checkpoint against the mean of the per-rank models and its logged test
accuracy against a recomputation here; DDP against gossip on 2 processes (equal for SGD).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lightning_optsurvey.optim import get_spec
from lightning_optsurvey.strategies import Topology
from lightning_optsurvey.tracking import EXPERIMENT_KIND_TAG

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = EXAMPLES / "configs"
TINY = ["--max-epochs", "1", "--limit-train-batches", "3"]
FIT_TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# Values computed in float32 and logged as float64 agree to float32 rounding of a few operations.
FLOAT32_REL = 1e-5
# Two processes that average exactly (ring of 2, or DDP) differ only in the order of float32 additions.
TWO_RANK_REL = 1e-5
SUBPROCESS_TIMEOUT = 240
_LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with its tables created once (creating them costs seconds per database)."""
    path = tmp_path_factory.mktemp("mlflow_template") / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, empty_store: Path) -> str:
    """The tracking URI of a fresh store in the test's directory."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def run(command: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT) -> str:
    """Run ``command`` like a user in ``cwd``; return its output. Kills every process it started on timeout."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds the ranks Lightning started, too
        output, _ = proc.communicate()
        raise AssertionError(f"{command[1:3]} timed out after {timeout}s\n{output[-4000:]}") from None
    assert proc.returncode == 0, f"{command[1:3]} exited with {proc.returncode}\n{output[-4000:]}"
    return output


def only_run(uri: str, experiment: str) -> Any:
    """The one finished run of ``experiment``."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.status == "FINISHED"
    return found


def load_example(name: str) -> ModuleType:
    """Import an example as a module (its ``__main__`` block does not run).

    Its folder is on the import path while it loads, as when it runs as a script, so that it finds the
    examples' shared module (``_digits``).
    """
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def fit_config(config: str, uri: str, cwd: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "lightning_optsurvey.cli", "fit", "--config", str(CONFIGS / config),
               "--trainer.logger.init_args.tracking_uri", uri, *FIT_TINY, *extra]
    return run(command, cwd)


# --------------------------------------------------------------------------------------------- examples


@pytest.mark.timeout(300)
def test_callbacks_on_your_model(tmp_path: Path, store: str) -> None:
    out = run([sys.executable, str(EXAMPLES / "callbacks_on_your_model.py"), "--tracking-uri", store, *TINY],
              tmp_path)
    found = only_run(store, "callbacks-on-your-model")
    assert f"MLflow run {found.info.run_id}" in out
    assert found.data.params == {"lr": "0.05", "momentum": "0.9"}
    m = found.data.metrics
    assert {"hessian/eig_1", "hessian/eig_2", "hessian/eig_3", "hessian/trace", "sharpness/sam", "sharpness/average",
            "gen_gap/loss", "gen_gap/acc", "stability/sharpness_x_lr", "stability/threshold", "val/loss",
            "val/acc", "train/loss"} <= set(m)
    assert m["hessian/eig_1"] >= m["hessian/eig_2"] >= m["hessian/eig_3"]
    # EdgeOfStability reuses HessianSpectrum's eigenvalue; SGD with momentum 0.9: threshold 2 + 2 * 0.9.
    assert m["stability/sharpness"] == m["hessian/eig_1"]
    assert m["stability/threshold"] == 2 + 2 * 0.9
    assert m["stability/sharpness_x_lr"] == pytest.approx(0.05 * m["hessian/eig_1"], rel=FLOAT32_REL)
    # GeneralizationGap evaluates the validation set with the module's label-smoothed loss_fn, so its
    # val side equals what validation_step logged at the same weights (plain cross-entropy would not).
    assert m["train_eval/loss"] + m["gen_gap/loss"] == pytest.approx(m["val/loss"], rel=FLOAT32_REL)
    assert m["train_eval/acc"] - m["gen_gap/acc"] == pytest.approx(m["val/acc"], abs=1e-6)


@pytest.mark.distributed
@pytest.mark.timeout(360)
def test_gossip_training_two_processes(tmp_path: Path, store: str) -> None:
    out = run([sys.executable, str(EXAMPLES / "gossip_training.py"), "--devices", "2", "--topology", "ring",
               "--tracking-uri", store, "--max-epochs", "1", "--limit-train-batches", "5"], tmp_path, timeout=300)
    found = only_run(store, "gossip-training")
    params, m = found.data.params, found.data.metrics
    assert params["topology"] == "ring" and params["world_size"] == "2"
    assert float(params["spectral_gap"]) == pytest.approx(Topology("ring", 2).spectral_gap(), rel=1e-12)
    # Two processes on a ring average exactly (W = 11^T / 2): the models agree after every round.
    assert m["gossip/consensus_distance"] == 0.0
    example = load_example("gossip_training")
    model = example.DigitsClassifier()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert m["comm/bytes_sent"] == len(Topology("ring", 2).peers(0)[0]) * model_bytes

    (ckpt_path,) = (tmp_path / "checkpoints" / "gossip").glob("*.ckpt")
    assert ckpt_path.name in out
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ranks = checkpoint["per_rank_states"]["ranks"]
    assert len(ranks) == 2
    for key, value in checkpoint["state_dict"].items():  # the checkpoint holds the consensus (the mean)
        mean = (ranks[0]["state_dict"][key] + ranks[1]["state_dict"][key]) / 2
        torch.testing.assert_close(value, mean, rtol=TWO_RANK_REL, atol=0.0)

    # The test accuracy logged by the single-device evaluation, recomputed here from the checkpoint.
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    _, _, test_loader = example.digits_loaders()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    assert m["test/acc"] == pytest.approx(correct / len(test_loader.dataset), rel=FLOAT32_REL)
    assert f"test/acc={m['test/acc']:.4f}" in out


@pytest.mark.timeout(300)
def test_compare_optimizers(tmp_path: Path, store: str) -> None:
    out = run([sys.executable, str(EXAMPLES / "compare_optimizers.py"), "--tracking-uri", store, *TINY], tmp_path)
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("compare-optimizers")
    assert exp.tags[EXPERIMENT_KIND_TAG[0]] == EXPERIMENT_KIND_TAG[1]
    runs = client.search_runs([exp.experiment_id])
    names = ("sgd", "adam", "sam", "kfac")
    assert sorted(r.info.run_name for r in runs) == sorted(f"{n}-auto" for n in names)
    assert len({r.data.tags["sweep"] for r in runs}) == 1
    for r in runs:
        name = r.data.params["optimizer"]
        assert r.info.status == "FINISHED" and r.info.run_name == f"{name}-auto"
        for key, value in get_spec(name).defaults.items():  # the registry's defaults reached the optimizer
            assert r.data.params[f"optimizer_kwargs/{key}"] == str(value)
        assert {"val/acc", "val/loss", "hessian/eig_1", "sharpness/sam", "gen_gap/loss"} <= set(r.data.metrics)
    match = re.search(r"best: (\S+) \(run (\w+)\), val/acc=([\d.]+)", out)
    assert match, out[-2000:]
    best = client.get_run(match.group(2))
    assert best.info.run_name == match.group(1)
    assert best.data.metrics["val/acc"] == max(r.data.metrics["val/acc"] for r in runs)  # ties: any of them
    assert match.group(3) == f"{best.data.metrics['val/acc']:.4f}"
    assert f"mlflow ui --backend-store-uri {store}" in out
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs" in out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_compare_optimizers_over_strategies(tmp_path: Path, store: str) -> None:
    run([sys.executable, str(EXAMPLES / "compare_optimizers.py"), "--tracking-uri", store, *TINY,
         "--optimizers", "sgd", "--strategies", "ddp,gossip_ring", "--devices", "2"], tmp_path, timeout=420)
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("compare-optimizers")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"sgd-ddp", "sgd-gossip_ring"}
    # On 2 processes, SGD then exact averaging of the models is SGD on the averaged gradient (DDP).
    ddp, gossip = runs["sgd-ddp"].data.metrics, runs["sgd-gossip_ring"].data.metrics
    for key in ("val/loss", "train/loss", "hessian/eig_1"):
        assert gossip[key] == pytest.approx(ddp[key], rel=TWO_RANK_REL)


# --------------------------------------------------------------------------------------------- configs


@pytest.mark.timeout(300)
def test_config_sam_hessian(tmp_path: Path, store: str) -> None:
    fit_config("sam_hessian.yaml", store, tmp_path)
    found = only_run(store, "optsurvey-sam-hessian")
    assert found.data.params["optimizer"] == "sam"
    assert found.data.params["optimizer_kwargs/rho"] == "0.05"
    m = found.data.metrics
    assert m["hessian/eig_1"] >= m["hessian/eig_2"] >= m["hessian/eig_3"]
    assert {"hessian/trace", "sharpness/sam", "sharpness/adaptive_worst_case", "sharpness/average",
            "gen_gap/loss", "val/acc"} <= set(m)
    client = MlflowClient(tracking_uri=store)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "hessian")}
    assert {"hessian/density_epoch_0.png", "hessian/density_epoch_0.json"} <= artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(found.info.run_id)}


@pytest.mark.timeout(300)
def test_config_kfac(tmp_path: Path, store: str) -> None:
    fit_config("kfac.yaml", store, tmp_path)
    found = only_run(store, "optsurvey-kfac")
    assert found.data.params["optimizer"] == "kfac" and found.data.params["lr_scheduler"] == "cosine"
    m = found.data.metrics
    assert m["hessian/eig_1"] >= m["hessian/eig_2"]
    assert {"gen_gap/loss", "val/acc", "val/loss"} <= set(m)
    assert all(math.isfinite(v) for v in m.values())


def _two_processes(test: Callable) -> Callable:
    """Marks a config test that fits on 2 processes: slow, distributed, 6 minutes at most."""
    return pytest.mark.slow(pytest.mark.distributed(pytest.mark.timeout(360)(test)))


def _fit_on_two_processes(config: str, experiment: str, batches: int, store: str, tmp_path: Path) -> Any:
    """Fit ``config`` on 2 processes for ``batches`` training batches; its one run, recorded with world size 2."""
    fit_config(config, store, tmp_path, "--trainer.devices", "2", "--trainer.limit_train_batches", str(batches))
    found = only_run(store, experiment)
    assert found.data.params["world_size"] == "2"
    return found


@_two_processes
def test_config_gossip_ring(tmp_path: Path, store: str) -> None:
    # 5 batches: ConsensusDistance measures every 5 steps in this config.
    found = _fit_on_two_processes("gossip_ring.yaml", "optsurvey-gossip-ring", 5, store, tmp_path)
    assert found.data.params["topology"] == "ring"
    assert float(found.data.params["spectral_gap"]) == pytest.approx(Topology("ring", 2).spectral_gap(), rel=1e-12)
    assert found.data.metrics["gossip/consensus_distance"] == 0.0


@_two_processes
def test_config_easgd(tmp_path: Path, store: str) -> None:
    # 4 batches: one synchronization (sync_every 4), then ConsensusDistance measures (every 4 steps).
    found = _fit_on_two_processes("easgd.yaml", "optsurvey-easgd", 4, store, tmp_path)
    params = found.data.params
    assert params["sync_every"] == "4" and float(params["easgd_rho"]) == 0.1
    # Unlike exact averaging (the 2-process ring), the elastic pull leaves the workers apart.
    assert found.data.metrics["gossip/consensus_distance"] > 0.0


def test_every_example_and_config_is_run_here() -> None:
    tests = {name for name, _ in inspect.getmembers(sys.modules[__name__], inspect.isfunction)}
    for path in EXAMPLES.glob("[!_]*.py"):  # _digits.py is the examples' shared module, run through them
        assert f"test_{path.stem}" in tests or any(t.startswith(f"test_{path.stem}") for t in tests), path
    for path in CONFIGS.glob("*.yaml"):
        assert f"test_config_{path.stem}" in tests, path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_configs_name_our_classes_by_class_path(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    text = path.read_text()
    ours = re.findall(r"lightning_optsurvey\.[\w.]+", text)
    assert ours, "each config should use our callbacks or strategies"
    class_paths = re.findall(r"class_path:\s*(\S+)", text)
    assert set(ours) <= set(class_paths)
    for dotted in class_paths:  # every class_path imports
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), dotted
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.MLFlowLogger"
    assert config["trainer"]["logger"]["init_args"]["tracking_uri"] == "sqlite:///mlflow.db"
    if "strategy" in config["trainer"]:  # the multi-process configs are written for 4 processes
        assert config["trainer"]["devices"] == 4
