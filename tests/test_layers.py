"""The project's layering, read from the source with `ast`: no module reaches into another's private names,
and the library's modules import each other without a cycle (function-local imports included: a cycle hidden
in a function is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xlsub", "entry_points")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """Every import statement anywhere in the module, as (imported module, names taken from it, line);
    relative imports resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def test_no_module_imports_another_modules_private_names():
    reaches = []
    for package in PACKAGES:
        for name, path in modules(package).items():
            for module, names, line in imports(name, path):
                if is_project(module) and module != name:
                    reaches += [f"{path.relative_to(ROOT)}:{line}: from {module} import {n}" for n in names
                                if n.startswith("_") and not n.startswith("__")]
    assert not reaches, "private names imported across modules (make them public where they belong, or move them):\n" + "\n".join(reaches)


def import_graph() -> dict[str, set[str]]:
    """xlsub's modules and the xlsub modules each imports (`from xlsub.a import b` depends on xlsub.a.b where
    that is a module, else on xlsub.a)."""
    known = modules("xlsub")
    graph = {}
    for name, path in known.items():
        edges = set()
        for module, names, _ in imports(name, path):
            if module.split(".")[0] != "xlsub":
                continue
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
            edges |= set(submodules) if submodules and len(submodules) == len(names) else {module, *submodules}
        graph[name] = {m for m in edges if m in known and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "black"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in xlsub/ (move the shared piece to the module it belongs to): " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_and_a_function_local_import(tmp_path):
    """The checks above on made-up modules: a cycle found, a DAG passed, an import inside a function seen."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from xlsub.stats.intervals import _hidden\n")
    assert imports("xlsub.m", source) == [("xlsub.stats.intervals", ["_hidden"], 2)]
