"""The import rule of the package layout (README, "Layout"): imports go down, from the pipeline and the commands to
the domain packages to the ground floor; no import circle; nothing loaded by a name string.

Every `import` statement counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_coupling"

# Bottom to top. A module may import its own layer and the layers below it.
LAYERS = [
    ("errors", "outputs", "cache", "progress"),
    ("models", "scoring", "trainer", "loggers"),
    ("data",),
    ("gradients", "editing", "inject", "analysis"),
    ("pipeline", "cli", "check_model", "__main__"),
]
TOP = LAYERS[-1]
# The one import that runs back up: an embedded model's cache key hashes the default synthetic world.
ALLOWED_UPWARD = {("lit_coupling.models.embedded", "lit_coupling.data.world")}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module → the lit_coupling modules it imports (a `from package import name` names the submodule if it is
    one)."""
    found = modules(root)

    def owner(name: str) -> str:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith("lit_coupling"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("lit_coupling"):
                    deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in found else owner(base) for a in node.names)
        deps.discard(name)
        deps.discard("lit_coupling")  # the package's __init__ holds only the version
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    return None


def upward(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {
        (m, d)
        for m, deps in graph.items()
        for d in deps
        if layer(m) is not None and layer(d) is not None and layer(d) > layer(m)
    }


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if m != "lit_coupling" and layer(m) is None] == []


def test_no_import_circle(graph):
    assert cycles(graph) == []


def test_no_domain_module_imports_the_pipeline_or_a_command(graph):
    offenders = {
        (m, d)
        for m, deps in graph.items()
        for d in deps
        if layer(m) is not None and layer(m) < len(LAYERS) - 1 and layer(d) == len(LAYERS) - 1
    }
    assert offenders == set()


def test_at_most_one_import_runs_back_up(graph):
    assert upward(graph) <= ALLOWED_UPWARD


def test_nothing_is_loaded_by_a_name_string():
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__"):
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """On a made-up package: a circle, an upward import and a domain module importing the pipeline are found."""
    root = tmp_path / "lit_coupling"
    for package in ("", "models", "data", "pipeline"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    (root / "models" / "loading.py").write_text("def f():\n    from lit_coupling.data import pieces\n")
    (root / "data" / "pieces.py").write_text(
        "from lit_coupling.models.loading import f\nfrom lit_coupling.pipeline import run\n"
    )
    (root / "pipeline" / "run.py").write_text("from ..data import pieces\n")
    made_up = import_graph(root)
    assert made_up["lit_coupling.pipeline.run"] == {"lit_coupling.data.pieces"}
    assert cycles(made_up) == [["lit_coupling.data.pieces", "lit_coupling.models.loading", "lit_coupling.pipeline.run"]]
    assert upward(made_up) == {
        ("lit_coupling.models.loading", "lit_coupling.data.pieces"),
        ("lit_coupling.data.pieces", "lit_coupling.pipeline.run"),
    }
