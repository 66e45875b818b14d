"""Lightning's internals are read only through ``lightning_optsurvey/_compat.py``, and only on a tested version.

- The installed Lightning is inside the range ``pyproject.toml`` declares, which is ``_compat.TESTED_LIGHTNING``.
- Every accessor's target (private attribute, method, the calls the patches rely on) exists in it.
- No other module of the package imports a private Lightning name or reads one of the private attributes the
  accessors wrap (an AST scan).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lightning_optsurvey import _compat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_optsurvey"

#: Private attributes of Lightning objects that only _compat.py may touch (what its accessors wrap).
LIGHTNING_PRIVATE_ATTRIBUTES = frozenset({
    "_trainer", "_current_fx_name", "_val_check_time_interval", "_accelerator_connector", "_every_n_train_steps",
    "_train_time_interval", "_batches_that_stepped", "_results", "_broadcast_sigterm_tensor", "_should_check_val_fx",
    "_skip_next_val", "_layer_sync", "_logger_connector", "_checkpoint_connector", "_signal_connector",
    "_data_connector", "_callback_connector", "_process_group_backend", "_get_process_group_backend", "_ddp_kwargs",
    "_ddp_comm_state", "_ddp_comm_hook", "_defaults",
})
#: Of those, the ones a strategy inherits from DDPStrategy: caught on ``self`` too.
INHERITED_PRIVATE_ATTRIBUTES = frozenset({
    "_layer_sync", "_process_group_backend", "_get_process_group_backend", "_ddp_kwargs", "_ddp_comm_state",
    "_ddp_comm_hook",
})



def _lightning_requirement() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "lightning"]
    assert len(found) == 1, "pyproject.toml must declare the lightning dependency once"
    return found[0]


def test_installed_lightning_is_inside_the_tested_range() -> None:
    requirement = _lightning_requirement()
    assert requirement.specifier == SpecifierSet(_compat.TESTED_LIGHTNING), (
        f"pyproject.toml declares lightning{requirement.specifier}, lightning_optsurvey/_compat.py was checked "
        f"against {_compat.TESTED_LIGHTNING}: update both together, after checking every accessor there"
    )
    version = Version(lightning.__version__)
    assert version in requirement.specifier, (
        f"Lightning {version} is installed, outside the tested range {requirement.specifier}: check every accessor "
        "of lightning_optsurvey/_compat.py against it (and the strategy tests), then widen the range in "
        "pyproject.toml and _compat.TESTED_LIGHTNING"
    )


def test_every_accessor_target_exists_in_the_installed_lightning() -> None:
    missing = _compat.missing_targets()
    assert not missing, (
        f"Lightning {lightning.__version__} lacks what these accessors of lightning_optsurvey/_compat.py use; "
        "adapt them:\n" + "\n".join(missing)
    )


def _findings(path: Path) -> set[str]:
    rel = path.relative_to(PACKAGE).as_posix()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.add(f"{rel}: import {node.module}")
            found.update(f"{rel}: import {node.module}.{a.name}" for a in node.names if a.name.startswith("_"))
        elif isinstance(node, ast.Attribute):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if node.attr in (INHERITED_PRIVATE_ATTRIBUTES if on_self else LIGHTNING_PRIVATE_ATTRIBUTES):
                found.add(f"{rel}: .{node.attr}")
            if node.attr == "epoch_loop" and isinstance(node.value, ast.Attribute) and node.value.attr == "fit_loop":
                found.add(f"{rel}: .fit_loop.epoch_loop")
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
              and node.value.id == "StrategyRegistry"):
            found.add(f"{rel}: StrategyRegistry entry")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "dict" and node.args
              and isinstance(node.args[0], ast.Name) and node.args[0].id == "StrategyRegistry"):
            found.add(f"{rel}: StrategyRegistry entry")
    return found


def test_lightning_internals_are_read_only_through_compat() -> None:
    found: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "_compat.py":
            found |= _findings(path)
    new = sorted(found)
    assert not new, "Lightning internals outside lightning_optsurvey/_compat.py (add an accessor there):\n" + "\n".join(
        new)


def test_the_scan_catches_each_kind_of_access(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from lightning.pytorch.overrides.distributed import _sync_module_states\n"
        "from lightning.fabric.strategies import _StrategyRegistry\n"
        "def f(trainer, module):\n"
        "    return (trainer.fit_loop.epoch_loop, module._trainer, StrategyRegistry['ddp'],\n"
        "            self._process_group_backend)\n"
    )
    original = PACKAGE
    try:
        globals()["PACKAGE"] = tmp_path
        found = _findings(source)
    finally:
        globals()["PACKAGE"] = original
    assert found == {
        "probe.py: import lightning.pytorch.overrides.distributed._sync_module_states",
        "probe.py: import lightning.fabric.strategies._StrategyRegistry",
        "probe.py: .fit_loop.epoch_loop", "probe.py: ._trainer", "probe.py: StrategyRegistry entry",
        "probe.py: ._process_group_backend",
    }


def test_refuse_layer_sync_refuses_any_layer_sync_and_reads_none() -> None:
    @_compat.refuse_layer_sync("the reason.")
    class Strategy:
        def __init__(self) -> None:
            self._layer_sync = None  # what ParallelStrategy.__init__ does

    strategy = Strategy()
    assert strategy._layer_sync is None
    with pytest.raises(ValueError, match="Strategy does not support sync_batchnorm=True: the reason."):
        strategy._layer_sync = object()
