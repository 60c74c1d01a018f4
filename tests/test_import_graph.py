"""The import graph of ``tokenmill/``, read from the source (an AST walk, nothing imported): no
circle, and the arrows the architecture forbids are absent.

Every ``import`` counts, module-level, inside a function (a lazy import still ties the two
modules together) or under ``if TYPE_CHECKING:`` (it never runs, but a circle through
annotations is still two modules that cannot be read, moved or tested one without the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tokenmill"

# (importing package, imported package, why it is forbidden)
FORBIDDEN = [
    *[(low, high, "the engine side never imports the HTTP side or the measuring tools")
      for low in ("engine", "worker", "executor", "layers", "models", "loader", "quant")
      for high in ("server", "gateway", "bench", "commands", "cli")],
    ("layers", "models", "layers take plain numbers; models build on layers, not the reverse"),
    ("server", "bench", "the server shares code with the bench through a common module"),
    ("server", "gateway", "the gateway talks to servers over HTTP only"),
    ("gateway", "server", "the gateway talks to servers over HTTP only"),
    *[(shared, high, "a module both sides share depends on neither")
      for shared in ("openai_protocol", "cost", "sse_parser", "config", "errors")
      for high in ("server", "gateway", "bench")],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The tokenmill modules ``path`` imports (a name imported from a package that is itself a
    module counts as that module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tokenmill":
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] != "tokenmill":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root, root_imports in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(root_imports)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def in_package(module: str, package: str) -> bool:
    full = f"tokenmill.{package}"
    return module == full or module.startswith(full + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_is_read(graph: dict[str, set[str]]) -> None:
    # a walk that found nothing would pass every rule below
    assert len(graph) > 100
    assert "tokenmill.engine.scheduler" in graph["tokenmill.engine.engine_core"]
    assert "tokenmill.loader.model_source" in graph["tokenmill.executor.factory"]


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_no_forbidden_arrow(graph: dict[str, set[str]]) -> None:
    broken = sorted(f"{source} -> {target} ({why})"
                    for low, high, why in FORBIDDEN
                    for source, targets in graph.items() if in_package(source, low)
                    for target in targets if in_package(target, high))
    assert broken == []


def test_the_checks_see_what_they_forbid() -> None:
    """On a hand-made graph: a circle through a lazy import and a forbidden arrow are found."""
    made = {"tokenmill.loader.a": {"tokenmill.loader.b"},
            "tokenmill.loader.b": {"tokenmill.loader.a"},
            "tokenmill.layers.rotary": {"tokenmill.models.arch_config"},
            "tokenmill.models.arch_config": set()}
    assert cycles(made) == [["tokenmill.loader.a", "tokenmill.loader.b"]]
    assert in_package("tokenmill.layers.rotary", "layers")
    assert not in_package("tokenmill.layers_extra", "layers")
