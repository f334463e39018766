"""The package's import graph (every `from .x import`, at module level or inside a function): no module imports
from a later stage of the data flow (data -> model -> training -> after), it has no cycle, and the network code is
split by direction: reading datasets (data.hub) and uploading (after.push) import nothing of orpo's data,
evaluation or card code, so neither pulls the other in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "orpo"
# The stages in the order data flows; a module may import its own stage's and earlier stages' modules only.
STAGES = ["data", "model", "training", "after", "search"]
BASE = {"orpo.config", "orpo.trl_names", "orpo.files", "orpo.hub_errors"}  # imported by every stage; they import nothing later
TOP = BASE | {"orpo", "orpo.cli", "orpo.api", "orpo.trainer"}  # the top level: the Python API (api, trainer) and
# the command line over it call into every stage


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


def stage(module: str) -> int:
    """0 for the base modules, 1.. for data, model, training, after, one more for the top (api, trainer, cli)."""
    if module in BASE:
        return 0
    if module in TOP:
        return len(STAGES) + 1
    return STAGES.index(module.split(".")[1]) + 1


def stage_breaks(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import from a later stage (or from the cli)."""
    return [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps) if d in graph and stage(d) > stage(m)]


def test_every_module_belongs_to_a_stage():
    graph = import_graph()
    loose = [m for m in graph if m not in TOP and m.split(".")[1] not in STAGES]
    assert not loose, f"modules outside the stage folders {STAGES}: {loose}"


def test_no_module_imports_from_a_later_stage():
    breaks = stage_breaks(import_graph())
    assert not breaks, "imports against the data flow (data -> model -> training -> after): " + "; ".join(breaks)


def test_a_data_module_importing_training_code_breaks_the_stage_rule():
    graph = import_graph()
    graph["orpo.data.pairs"] = graph["orpo.data.pairs"] | {"orpo.training.loss"}  # what `from ..training.loss import X` adds
    assert stage_breaks(graph) == ["orpo.data.pairs imports orpo.training.loss"]


def test_each_stage_says_what_it_may_import():
    """Each stage folder's __init__ docstring ends with 'May import: ...', and that list is the stage rule."""
    for i, name in enumerate(STAGES):
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        said = re.search(r"May import: (.*)$", doc, re.S)
        assert said, f"orpo/{name}/__init__.py does not say what it may import"
        allowed = set(re.findall(r"orpo\.\w+", said.group(1)))
        assert allowed == {"orpo.config", "orpo.files"} | {f"orpo.{s}" for s in STAGES[:i]}, (name, allowed)


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"orpo.training.loop", "orpo.after.card", "orpo.data.hub", "orpo.after.push"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


def test_network_code_is_split_by_direction():
    graph = import_graph()
    assert graph["orpo.data.hub"] <= {"orpo.hub_errors"}  # reading needs nothing of orpo but the Hub's errors in one line
    assert graph["orpo.after.push"] <= {"orpo.after.card", "orpo.hub_errors"}  # uploading stages through the card, nothing else
    readers = {m for m, deps in graph.items() if "orpo.data.hub" in deps}
    assert readers == {"orpo.data.sources"}
    assert {m for m, deps in graph.items() if "orpo.after.push" in deps} <= {"orpo.cli", "orpo.api"}
