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
LAYERS = {"runtime": 0, "data": 1, "knn": 2, "gpu_aug": 2, "mdra": 3, "eval_knn": 4, "finetune": 4}


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
    # Two interpreters, each importing its modules one layer up at a time and recording the project modules
    # each import adds: as no two of a sequence share a layer, a module above the one imported cannot have
    # been loaded by an earlier import without that import failing its own check. Each of a layer's
    # modules sits in its own sequence, so that neither hides the other from it.
    code = ("import importlib, json, sys\n"
            "for module in sys.argv[1:]:\n"
            "    before = set(sys.modules)\n"
            "    importlib.import_module(module)\n"
            "    print(json.dumps([module, sorted(set(sys.modules) - before - {module})]))\n")
    sequences = [[], []]
    for module in sorted(LAYERS, key=LAYERS.get):
        next(seq for seq in sequences if LAYERS[module] not in {LAYERS[m] for m in seq}).append(module)
    assert sorted(m for seq in sequences for m in seq) == sorted(LAYERS)
    runs = [subprocess.Popen([sys.executable, "-c", code, *seq], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={"PYTHONPATH": str(REPO), "PATH": ""})
            for seq in sequences]  # at once: each spends its time importing torch
    imported = {}
    for seq, run in zip(sequences, runs):
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, seq
        imported.update(json.loads(line) for line in out.splitlines() if line.startswith("["))
    assert imported.keys() == LAYERS.keys()
    for module, added in imported.items():
        loaded = set(added) & LAYERS.keys()
        assert all(LAYERS[name] < LAYERS[module] for name in loaded), f"{module} loads {sorted(loaded)}"
