"""No import cycle among the modules of cluster/ and edge/: a static check over their `import` statements (ast).

What counts as an edge: every `import x.y` and `from x import y` at module level, including those inside a
module-level `if` or `try` and under `if TYPE_CHECKING:` (never run, but a cycle of types is still two modules that
cannot be understood, or moved, apart); `from x import y` is an edge to the module `x.y` where y is a submodule,
else to `x`. Exempt: imports inside functions or classes (lazy: they run when called, after every module has
loaded; a deliberate way to reach up, to be kept rare). Importing a submodule also runs its package's __init__, but
that implicit edge is not counted (a package's own modules always take part in it; import-linter and pylint's
cyclic-import leave it out too); an explicit `from package import name` of a name its __init__ defines is.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "edge")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _module_level_imports(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_among_cluster_and_edge_modules():
    graph = import_graph()
    assert len(graph) > 20, f"found only {len(graph)} modules under {PACKAGES}: is ROOT right?"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (modules that import each other, directly or round a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_check_finds_a_cycle(tmp_path):
    """The check itself: a two-module cycle through `from ... import` is found; a lazy import is not an edge, one
    for type checking is."""
    pkg = tmp_path / "cluster"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cluster.b import thing\n")
    (pkg / "b.py").write_text("from cluster import a, name\n\ndef f():\n    from cluster import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import cluster.b\n")
    (tmp_path / "edge").mkdir()
    graph = import_graph(tmp_path)
    assert graph["cluster.b"] == {"cluster", "cluster.a"} and graph["cluster.c"] == {"cluster.b"}, graph
    assert find_cycles(graph) == [["cluster.a", "cluster.b"]]
