"""The code's shape: no import cycle anywhere in the package (``fastmae``, ``fastmae.data``, ``fastmae.kernels``,
counting imports inside functions too), ``fastmae.data`` layered (constants, index and sampling at the bottom,
the loader base above them, the backends on the base, the factory on top), no function over 80 lines in the
package or ``benchmarks/``, and the trainer within 350 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"fastmae": "fastmae", "data": "fastmae.data", "kernels": "fastmae.kernels"}
MAX_FUNCTION_LINES = 80


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


def module_name(path: Path) -> str:
    package = PACKAGES[path.parent.name]
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports, by name (``fastmae.x``, relative, ``from fastmae import x``);
    importing a submodule is not counted as importing its parent package's ``__init__``, nor are imports for type
    checkers only (``if TYPE_CHECKING:``), which never run."""
    files = {module_name(p): p for folder in PACKAGES for p in (REPO / folder).glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)  # from pkg import module
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            typing_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            todo.extend(child.orelse if typing_only else [child])
    return out


def test_package_has_no_import_cycle() -> None:
    graph = package_imports()
    assert {"fastmae.trainer", "fastmae.finetune", "fastmae.data.loader", "fastmae.kernels.masking"} <= set(graph)
    assert "fastmae.recipes" in graph["fastmae.finetune"]  # what the scan sees: a real edge
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def long_functions(folders: tuple[str, ...]) -> list[str]:
    """``file:function (lines)`` of every function or method longer than MAX_FUNCTION_LINES."""
    found = []
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found.append(f"{path.relative_to(REPO)}:{node.name} ({lines})")
    return found


def test_no_function_over_80_lines() -> None:
    assert long_functions(("fastmae", "data", "kernels", "benchmarks")) == []


def test_trainer_stays_a_loop() -> None:
    """Resume, metrics, the non-finite policy and signals live in their own modules."""
    assert len((REPO / "fastmae" / "trainer.py").read_text().splitlines()) <= 350
