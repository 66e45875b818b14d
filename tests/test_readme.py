"""The README stays true: its methods table is the registry's, and its two commands are the Makefile's."""

from __future__ import annotations

import re
import subprocess
import sys
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


def test_how_to_extend_examples_run_and_do_what_they_say():
    section = README.split("## How to extend\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4, "one example per extension point: optimizer, sharpness measure, callback, topology"
    check = """
import torch
import torch.nn.functional as F
from lightning_optsurvey.optim import get_spec
from lightning_optsurvey.callbacks.sharpness import KINDS

# The optimizer: registered, built by name, and steps along the sign of the gradient.
assert get_spec("sign_sgd").family == "first_order"
w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
opt = create_optimizer("sign_sgd", [w], lr=0.5)
(w * torch.tensor([3.0, -0.1])).sum().backward()
opt.step()
assert torch.equal(w.detach(), torch.tensor([0.5, -1.5]))

# The sharpness measure: rho times the gradient norm of the mean loss, computed independently.
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))), (torch.randn(2, 3), torch.randint(0, 2, (2,)))]
x = torch.cat([b[0] for b in batches]); y = torch.cat([b[1] for b in batches])
grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
expected = 0.05 * float(torch.sqrt(sum(g.square().sum() for g in grads)))
got = KINDS["gradient_norm"](Sharpness(kinds=("gradient_norm",)), model, F.cross_entropy, batches)
assert abs(got - expected) < 1e-6 * expected, (got, expected)

# The callback: measures the weight norm.
norm = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm())
assert abs(WeightNorm().measure(None, model, [])["weights/l2_norm"] - norm) < 1e-6

# The topology: a user's circulant is doubly stochastic and the strategy accepts it.
W = circulant.mixing_matrix(0)
ones = torch.ones(4, dtype=torch.float64)
assert torch.allclose(W.sum(0), ones) and torch.allclose(W.sum(1), ones)
assert strategy is not None and pairs.world_size == 4 and pairs.period == 2
print("ok")
"""
    script = "\n".join(blocks) + check
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-3000:]


def test_every_test_the_reliability_table_names_exists():
    table = README.split("## Reliability\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_/]*test_[a-z_]*\.py)(?:::([A-Za-z0-9_]+))?`", table))
    assert len(named) >= 10
    for path, test in named:
        source = ROOT / "tests" / path
        assert source.is_file(), f"README's Reliability table names tests/{path}, which does not exist"
        if test:
            assert re.search(rf"^def {test}\(", source.read_text(), re.M), f"tests/{path} has no {test}"
