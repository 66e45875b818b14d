"""The README stays true: its methods table is the registry's, and its two commands are the Makefile's."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_optsurvey.optim import methods_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_methods_table_matches_the_registry():
    match = re.search(r"<!-- methods-table:start -->\n(.*?)\n?<!-- methods-table:end -->", README, re.S)
    assert match, "README lacks the methods-table markers"
    assert match.group(1).strip() == methods_markdown().strip(), (
        "README's methods table is stale: replace it with the output of `optsurvey list --markdown`"
    )


def test_readme_shows_the_two_commands_and_ci_runs_the_test_one():
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "TORCH_SPEC ?=" in makefile


def test_every_registered_strategy_and_callback_is_documented():
    from lightning_optsurvey import callbacks
    from lightning_optsurvey.strategies import STRATEGY_NAMES

    for name in STRATEGY_NAMES:
        assert f"`{name}`" in README, name
    from _callback_configs import measuring_callback_names

    for name in measuring_callback_names():  # every measuring callback of callbacks.__all__
        assert f"`{name}(" in README and hasattr(callbacks, name), name


def test_quickstart_runs_and_records_an_mlflow_run(tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, re.S).group(1)
    assert "max_epochs=3" in code
    (tmp_path / "quickstart.py").write_text(code.replace("max_epochs=3", "max_epochs=1, limit_train_batches=4"))
    completed = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"val/acc", "hessian/eig_1", "hessian/eig_2", "hessian/trace"} <= set(run.data.metrics)
    assert run.data.params["optimizer"] == "sam"
