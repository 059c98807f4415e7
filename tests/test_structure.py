"""Rules of the code's shape that ruff and import-linter do not check (see README "Layers")."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trees(folder: str) -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted((REPO / folder).rglob("*.py"))]


def test_the_package_imports_itself_at_the_top_of_modules_only():
    """A function-local `from pipeline… import` hides a dependency from the layer check."""
    local = [f"{path.relative_to(REPO)}:{node.lineno}"
             for path, tree in trees("pipeline")
             for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
             or isinstance(node, ast.Import) and any(a.name.startswith("pipeline") for a in node.names)]
    assert local == []


def test_tests_use_no_private_name_of_the_package():
    """Tests go through public names, so a refactor inside a module cannot break them silently."""
    private = []
    for path, tree in trees("tests") + trees("benchmarks"):
        imports = [n for n in ast.walk(tree)
                   if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pipeline")]
        modules = {a.asname or a.name for n in imports for a in n.names} | {"pipeline"}
        private += [f"{path.name}:{n.lineno} {a.name}" for n in imports for a in n.names if a.name.startswith("_")]
        private += [f"{path.name}:{n.lineno} {n.value.id}.{n.attr}" for n in ast.walk(tree)
                    if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                    and isinstance(n.value, ast.Name) and n.value.id in modules]
    assert private == []
