"""Dependencies point one way and no module imports itself back: build <- serving <- measure <- gateway <- deploy <- cli.

Every import statement of every module is read with `ast` (also those inside functions, which run later but
are dependencies all the same): a module may import only from its own package or from packages before it
in ORDER, and the graph of imports between dyngate's modules has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("dyngate_build", "dyngate_serving", "dyngate_measure", "dyngate_gateway", "dyngate_deploy", "dyngate_cli")
FOLDERS = {"dyngate_build": ROOT / "build", **{p: ROOT / "gateway" for p in ORDER[1:]}}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the five packages."""
    found = {}
    for package in ORDER:
        base = FOLDERS[package]
        for path in sorted((base / package).rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The dyngate modules `name` imports (a `from package import module` names the module itself)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` depends on the module a.b.c
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _package(module: str) -> str:
    return module.split(".")[0]


def test_the_checker_sees_every_package_and_imports_inside_functions():
    graph = _graph()
    assert {_package(m) for m in graph} == set(ORDER)
    assert "dyngate_serving.rollout" in graph["dyngate_cli"]  # imported inside cmd_build only


def test_dependencies_point_one_way():
    wrong = sorted(f"{module} imports {target}" for module, targets in _graph().items() for target in targets
                   if ORDER.index(_package(target)) > ORDER.index(_package(module)))
    assert not wrong, "imports against build <- serving <- measure <- gateway <- deploy <- cli:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = _graph()
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, "modules that import each other (directly or round a cycle):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)
