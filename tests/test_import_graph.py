"""fastmae.data's modules import each other without a cycle, counting imports inside functions too: constants,
index and sampling at the bottom, the shared loader base above them, the backends on the base, the factory on
top."""

from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def data_imports() -> dict[str, set[str]]:
    """module -> the fastmae.data modules it imports (relative imports anywhere in the file)."""
    names = {p.stem for p in DATA.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in DATA.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:  # from . import x
                    deps.update(a.name for a in node.names)
        graph[path.stem] = {d for d in deps if d in names and d != path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_package_has_no_import_cycle() -> None:
    graph = data_imports()
    assert {"loader", "base", "constants", "torch_loader", "dali_pipeline", "randaug"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    # the layering itself: backends build on the base, never on the factory; the base knows no backend
    for backend in ("torch_loader", "dali_pipeline", "synthetic"):
        assert "loader" not in graph[backend] and backend not in graph["base"]
    assert graph["constants"] == set() and graph["randaug"] <= {"constants"}
