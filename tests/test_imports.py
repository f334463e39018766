"""The package's import graph (every `from .x import`, at module level or inside a function) has no cycle, and the
network code is split by direction: reading datasets (hub_read) and uploading (upload) import nothing of orpo's
data, evaluation or card code, so neither pulls the other in."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "orpo"


def import_graph() -> dict[str, set[str]]:
    """{module: orpo modules it imports}, relative and absolute imports, wherever they are in the file."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - node.level + 1])
                deps.add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orpo"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("orpo"))
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep in graph and dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"orpo.train.loop", "orpo.after.card", "orpo.data.hub", "orpo.after.push"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


def test_network_code_is_split_by_direction():
    graph = import_graph()
    assert graph["orpo.data.hub"] == set()  # reading needs nothing of orpo
    assert graph["orpo.after.push"] <= {"orpo.after.card"}  # uploading stages through the card, nothing else
    readers = {m for m, deps in graph.items() if "orpo.data.hub" in deps}
    assert readers == {"orpo.data.sources"}
    assert {m for m, deps in graph.items() if "orpo.after.push" in deps} == {"orpo.cli"}
