"""The package's layers hold: every opd_fast module imports only the layers its package's
docstring allows (no exceptions), and the module import graph has no cycle."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "opd_fast"

# What each subpackage may import (besides itself): lower layers only, CLI on top.
ALLOWED = {
    "op": set(),
    "models": set(),
    "wire": set(),
    "toy": {"models"},
    "teachers": {"wire", "op", "models"},
    "serving": {"wire", "op", "models", "toy"},
    "training": {"teachers", "models", "op", "toy"},
    "paper": {"training", "teachers", "models", "op", "toy"},
    "cli": {"paper", "training", "serving", "teachers", "wire", "models", "op", "toy"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """The opd_fast modules `path` imports, anywhere in it (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` names the module; `from module import name` the module
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name.startswith("opd_fast.") and name in modules)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_every_subpackage_states_its_imports():
    for name in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "Imports:" in doc, f"opd_fast/{name}/__init__.py: say what it may import"


def test_imports_flow_down_the_layers():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        layer = _layer(module)
        if layer is None:  # the top level: opd_fast/__init__.py, __main__.py
            continue
        allowed = [f"opd_fast.{name}" for name in ALLOWED[layer] | {layer}]
        for target in sorted(_imports(path, modules)):
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {module: _imports(path, modules) for module, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
