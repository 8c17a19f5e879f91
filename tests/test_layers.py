"""The layout: no import cycle in grid/ (imports inside functions included), the pure layers import without Ray, MLflow, Optuna or pydantic, and
no function in grid/, preprocess/, epir/ or benchmarks/ runs over 60 lines."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import REPO

PURE = ["epir.model", "epir.registry", "epir.presets", "epir.train", "epir.pack", "epir.metrics", "epir.regions", "grid.cells",
        "grid.config", "grid.data", "grid.ids", "grid.schema", "grid.records", "grid.compare", "grid.pairing",
        "grid.predictions", "grid.space", "grid.nested", "grid.values", "preprocess.shards"]


def _module_imports(path) -> set[str]:
    """The grid modules a grid module imports, at module level or deferred inside a function (a deferred import
    hides a cycle from Python at import time, not from the design)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("grid."):
                out.add(node.module.split(".")[1])
            elif node.module == "grid":
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("grid."))
    return out


def test_grid_has_no_import_cycle():
    mods = {p.stem: p for p in (REPO / "grid").glob("*.py") if p.stem != "__init__"}
    graph = {m: _module_imports(p) & set(mods) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert graph["cells"] <= {"config", "data", "ids", "schema"} and graph["records"] <= {"cells"}  # records are only records
    assert not graph["schema"]  # the MLflow names import nothing of the grid


def test_the_pure_layers_and_the_gpu_path_import_without_ray_mlflow_optuna_or_pydantic():
    code = ("import sys\nfor m in ('ray', 'mlflow', 'optuna', 'pydantic'):\n    sys.modules[m] = None\n"
            f"import importlib\nfor m in {PURE!r}:\n    importlib.import_module(m)\n"
            "import runpy\nrunpy.run_path('benchmarks/gpu_ladder.py', run_name='gpu_ladder')\n"
            "print('imported')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "imported" in res.stdout, res.stderr[-3000:]


def test_no_function_runs_over_sixty_lines():
    files = [f for folder in ("grid", "preprocess", "epir", "benchmarks") for f in sorted((REPO / folder).rglob("*.py"))]
    long = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_mlflow_names_are_written_in_the_schema_module_only():
    """Within grid/, an ``epir.*`` tag name, a param or metric prefix (``model.``, ``recipe.``, ...) and the cell
    run's own metric names appear as strings (outside docstrings) in grid/schema.py only: writers and readers
    share its names, so a renamed one cannot leave a reader on the old name."""
    import re

    modules = {p.stem for p in (REPO / "epir").rglob("*.py")} | {"models"}
    found = []
    for f in sorted((REPO / "grid").glob("*.py")):
        if f.name == "schema.py":
            continue
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                found += [f"{f.name}:{node.lineno} {m}" for m in re.findall(r"\bepir\.([a-z_]+)", node.value)
                          if m not in modules]
                if node.value.startswith(PARAM_PREFIXES) or node.value in METRIC_NAMES:
                    found.append(f"{f.name}:{node.lineno} {node.value}")
    assert not found, found


# MLflow param and metric names that only grid/schema.py spells (writers and readers take them from there)
PARAM_PREFIXES = ("model.", "recipe.", "choice.", "members.", "paired.", "best_test_epoch.")
METRIC_NAMES = {"wall_seconds", "train_seconds_sum", "shards_config_id", "subjects_total"}


def test_no_grid_module_runs_over_350_lines():
    """A module of grid/ holds a few jobs its docstring names; one that grows past 350 lines is split by job."""
    long = [f"{f.name} ({n} lines)" for f in sorted((REPO / "grid").glob("*.py"))
            if (n := len(f.read_text().splitlines())) > 350]
    assert not long, long
