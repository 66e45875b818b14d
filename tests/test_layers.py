"""The package's import graph holds its layers (read from the source with ``ast``, nothing imported).

Layers, low to high (a module may import its own layer and lower ones, never a higher one):

0. ``validation`` (the argument rule, pure torch) and ``_compat`` (the only reader of Lightning's internals);
1. ``averaging``, ``curvature``, ``measures``, ``optim``: pure torch, no Lightning;
2. ``callbacks``, ``strategies``, ``tasks``, ``user_classes``: the Lightning adapters;
3. ``theory``: checks the survey's claims against the implementations below (``theory.networks`` trains
   with a Trainer), while its pure maths must import without Lightning (checked in a subprocess where
   ``import lightning`` fails);
4. ``tracking`` (MLflow);
5. ``cli``.

And no module imports another subpackage's private name (``from lightning_optsurvey.measures._functional
import ...``, ``from lightning_optsurvey.callbacks.optimizer_loop import _default_loss``): a private module or
name is its subpackage's business. ``lightning_optsurvey._compat`` is the one shared private module. The
package root (``lightning_optsurvey/__init__.py``) is the facade above every layer.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "lightning_optsurvey"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: dict[str, int] = {
    "validation": 0, "_compat": 0,
    "averaging": 1, "curvature": 1, "measures": 1, "optim": 1,
    "callbacks": 2, "strategies": 2, "tasks": 2, "user_classes": 2,
    "theory": 3,
    "tracking": 4,
    "cli": 5,
}
SHARED_PRIVATE = {f"{PACKAGE}._compat"}
#: Layers whose modules must not import Lightning themselves (the transitive rule follows from the layers).
LIGHTNING_FREE = {"validation", "averaging", "curvature", "measures", "optim"}
#: theory modules that train networks with a Trainer; every other theory module is pure maths.
THEORY_WITH_LIGHTNING = {f"{PACKAGE}.theory.networks"}



def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every imported module or ``module.name`` of a file (lazy imports in functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.extend(f"{base}.{alias.name}" for alias in node.names)
    return found


def _sub(module: str) -> str | None:
    """The top-level part of the package a module belongs to (``None`` for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def _private_owner(imported: str) -> str | None:
    """The package owning the first private component of an imported path (``None`` if it is all public)."""
    parts = imported.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _violations() -> set[str]:
    found: set[str] = set()
    for path in sorted(ROOT.rglob("*.py")):
        importer = _module_name(path)
        sub = _sub(importer)
        if sub is None:  # the package root: the facade
            continue
        assert sub in LAYERS, f"{importer}: add its top-level name {sub!r} to LAYERS in tests/test_layers.py"
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top in ("lightning", "pytorch_lightning") and sub in LIGHTNING_FREE:
                found.add(f"{importer} -> lightning (Lightning in a pure-torch layer)")
            if top != PACKAGE:
                continue
            target = _sub(imported)
            if target is not None and target in LAYERS and LAYERS[target] > LAYERS[sub]:
                found.add(f"{importer} -> {PACKAGE}.{target} (layer {LAYERS[target]} above {LAYERS[sub]})")
            owner = _private_owner(imported)
            if owner is not None and not any(imported.startswith(s) for s in SHARED_PRIVATE):
                if owner != PACKAGE and _sub(owner) != sub:
                    private = imported.split(".")
                    private = ".".join(private[: len(owner.split(".")) + 1])
                    found.add(f"{importer} -> {private} (private)")
    return found


def test_import_graph_holds_the_layers() -> None:
    found = _violations()
    new = sorted(found)
    assert not new, "imports against the layers (see tests/test_layers.py's docstring):\n" + "\n".join(new)


_BLOCK_LIGHTNING = """
import importlib, json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
def purge():  # a package whose __init__ failed leaves its imported submodules behind: they must not hide failures
    for loaded in [m for m in sys.modules if m.split(".")[0] == "lightning_optsurvey"]:
        del sys.modules[loaded]
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"
        purge()
print(json.dumps(failed))
"""


def test_pure_layers_and_theory_maths_import_without_lightning() -> None:
    modules = [_module_name(p) for p in sorted(ROOT.rglob("*.py"))]
    pure = [m for m in modules if _sub(m) in LIGHTNING_FREE
            or (_sub(m) == "theory" and m not in THEORY_WITH_LIGHTNING and m != f"{PACKAGE}.theory")]
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _BLOCK_LIGHTNING, json.dumps(pure)], capture_output=True,
                            text=True, env=env, timeout=240, check=True)
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, "these modules need Lightning but are pure maths / pure torch:\n" + "\n".join(
        f"{m}: {why}" for m, why in sorted(failed.items()))
