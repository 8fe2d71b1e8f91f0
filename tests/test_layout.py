"""The code's shape, as the code map of docs/model.md promises it: layered packages, one training loop,
short functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"

#: each package of mdeq and the packages it may import (the layers of docs/model.md's code map)
ALLOWED = {
    "config": set(),
    "utils": {"config"},
    "solvers": {"config", "utils"},
    "modules": {"config", "utils", "solvers"},
    "models": {"config", "utils", "solvers", "modules"},
    "datasets": {"config", "utils"},
    "analysis": {"config", "utils", "solvers", "modules", "models", "datasets"},
    "core": {"config", "utils", "solvers", "modules", "models", "datasets", "analysis"},
    "tasks": {"config", "utils", "solvers", "modules", "models", "datasets", "analysis", "core"},
    "programs": {"config", "utils", "solvers", "modules", "models", "datasets", "analysis", "core", "tasks"},
}


def test_every_package_folder_is_a_package_and_has_its_layer():
    folders = {p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(ALLOWED), folders ^ set(ALLOWED)
    assert not [f for f in folders if not (LIB / f / "__init__.py").is_file()]


def _modules():
    for path in sorted(LIB.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imported_packages(path: Path, tree: ast.AST):
    """The mdeq packages a module imports (relative or absolute imports, from any depth of folders)."""
    folders = list(path.relative_to(LIB).parts[:-1])   # the package the module is in, below mdeq
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if node.module and node.module.startswith("mdeq."):
                yield node.module.split(".")[1]
            continue
        up = node.level - 1
        target = folders[:len(folders) - up] + (node.module.split(".") if node.module else [])
        if target:
            yield target[0]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package):
    bad = []
    for path, tree in _modules():
        rel = path.relative_to(LIB).parts
        if len(rel) < 2 or rel[0] != package:
            continue
        for imported in _imported_packages(path, tree):
            if imported != package and imported not in ALLOWED[package]:
                bad.append(f"{path.relative_to(LIB)} imports mdeq.{imported}")
    assert not bad, bad


def test_no_function_in_lib_or_tools_is_longer_than_60_lines():
    files = sorted(LIB.rglob("*.py")) + sorted((LIB.parent / "tools").glob("*.py"))
    long = [f"{path.relative_to(LIB.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in files for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def _imported_names(path: Path, module: str) -> set:
    tree = ast.parse(path.read_text())
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == module for a in n.names}


def test_one_training_loop_and_one_program_runner_for_every_task():
    """One train_one_epoch (the engine's); every task a Task of the engine; one runner that calls fit,
    whose train / test every task's program module and tool use, under the same names."""
    defs = [f"{path.relative_to(LIB)}" for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name == "train_one_epoch"]
    assert defs == ["core/trainer.py"], defs
    fits = [f"{path.relative_to(LIB)}" for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fit"]
    assert fits == ["programs/runner.py"], fits
    tools = Path(LIB.parent, "tools")
    for task, train_tool, test_tool in (("classification", "cls_train.py", "cls_valid.py"),
                                        ("segmentation", "seg_train.py", "seg_test.py")):
        assert "Task" in _imported_names(LIB / "tasks" / f"{task}.py", "core.trainer")
        assert {"run_train", "run_test"} <= _imported_names(LIB / "programs" / f"{task}.py", "runner")
        assert f"from mdeq.programs.{task} import train\n" in (tools / train_tool).read_text()
        assert f"from mdeq.programs.{task} import test\n" in (tools / test_tool).read_text()
