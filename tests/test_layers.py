"""The modules' imports point one way: the scripts on top, the method and data below them, the
machinery at the bottom; no module imports one above it, at its top or inside a function."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each module's layer: it may import only modules of lower layers.
LAYERS = {"runtime": 0, "knn": 1, "gpu_aug": 1, "mdra": 2, "eval_knn": 3, "finetune": 3}


def project_imports(module):
    """Every project module that `module`'s source imports, anywhere in it."""
    tree = ast.parse((REPO / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & LAYERS.keys()


def test_every_project_module_has_a_layer():
    assert {path.stem for path in REPO.glob("*.py")} == LAYERS.keys()


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_a_module_imports_only_modules_below_it_even_inside_functions(module):
    above = {name for name in project_imports(module) if LAYERS[name] >= LAYERS[module]}
    assert not above, f"{module} imports {sorted(above)}"


def test_importing_each_module_in_a_fresh_interpreter_loads_none_above_it():
    code = "import importlib, json, sys; importlib.import_module(sys.argv[1]); print(json.dumps(sorted(sys.modules)))"
    runs = {module: subprocess.Popen([sys.executable, "-c", code, module], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                     env={"PYTHONPATH": str(REPO), "PATH": ""})
            for module in LAYERS}  # at once: each spends its time importing torch
    for module, run in runs.items():
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, module
        loaded = set(json.loads(out.splitlines()[-1])) & LAYERS.keys() - {module}
        assert all(LAYERS[name] < LAYERS[module] for name in loaded), f"{module} loads {sorted(loaded)}"
