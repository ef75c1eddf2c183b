"""The layering of the package: no module imports from a layer above its own (the README's Layout).

Every ``from editeval.X import ...`` and ``import editeval.X`` counts, at module level or inside a
function, so a lazy import cannot hide an arrow that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import editeval

# lowest first; a module may import from its own layer's package and from lower layers only
LAYERS = [
    ["taxonomy"],
    ["core"],
    ["toyworld"],
    ["data"],
    ["models", "diffusion"],
    ["methods"],
    ["editing"],
    ["run"],
    ["bench", "metrics", "judge"],
    ["study"],
    ["report"],
    ["toylab"],
    ["cli", "__init__"],
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}
SOURCE = Path(editeval.__file__).resolve().parent


def _package(path: Path) -> str:
    part = path.relative_to(SOURCE).parts[0]
    return part[:-3] if part.endswith(".py") else part


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "editeval":  # from editeval import cli
                names = [f"editeval.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name.split(".")[1] if "." in name else "__init__")
            for line, name in found if name.split(".")[0] == "editeval"]


def test_every_package_has_a_layer():
    packages = {_package(p) for p in SOURCE.rglob("*.py")}
    assert packages <= set(LEVEL), f"add {sorted(packages - set(LEVEL))} to LAYERS"


def test_no_import_runs_up_a_layer():
    upward = []
    for path in sorted(SOURCE.rglob("*.py")):
        own = _package(path)
        for line, target in _imports(path):
            if target in LEVEL and LEVEL[target] > LEVEL[own]:
                upward.append(f"{path.relative_to(SOURCE)}:{line} imports editeval.{target}")
            elif target in LEVEL and LEVEL[target] == LEVEL[own] and target != own:
                upward.append(f"{path.relative_to(SOURCE)}:{line} imports its peer {target}")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    # the property would hold vacuously if _imports missed imports inside functions
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from editeval.bench.runner import run_bench\n")
    assert _imports(module) == [(2, "bench")]
