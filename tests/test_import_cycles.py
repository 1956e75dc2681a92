"""No import cycle among the modules of cluster/ and edge/, and no import from a lower layer to a higher one (LAYERS
below, as README's "Where things live" states them): static checks over their `import` statements (ast).

What counts as an edge: every `import x.y` and `from x import y` at module level, including those inside a
module-level `if` or `try` and under `if TYPE_CHECKING:` (never run, but a cycle of types is still two modules that
cannot be understood, or moved, apart); `from x import y` is an edge to the module `x.y` where y is a submodule,
else to `x`. Exempt: imports inside functions or classes (lazy: they run when called, after every module has
loaded; a deliberate way to reach up, to be kept rare). Importing a submodule also runs its package's __init__, but
that implicit edge is not counted (a package's own modules always take part in it; import-linter and pylint's
cyclic-import leave it out too); an explicit `from package import name` of a name its __init__ defines is.
The layer check counts lazy imports too (a function that reaches up ties its module to the one above all the same).
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


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, files: dict[str, Path]) -> list[str]:
    """The modules of `files` that one import statement of module `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
    return [t for t in targets if t in files and t != name]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            graph[name].update(_targets(name, path, node, files))
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


# ---- layers -----------------------------------------------------------------------------------------------------
# The layers of cluster/ and edge/, bottom to top (README, "Where things live"). A module imports from its own layer
# and the layers below it, never from one above: lazy imports (inside a function) count here too, since a function
# that reaches up still ties the lower module to the upper one. An entry names a module, or a package and every
# module in it (the longest entry that matches wins); "cluster" and "edge" stand for their __init__ only. Every
# module is in exactly one layer, so a new module must be placed here.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base: settings, clocks, logs, files",
        (
            "cluster.config",
            "cluster.dependencies",
            "cluster.settings",
            "cluster.role_settings",
            "cluster.clock",
            "cluster.logs",
            "cluster.atomic",
            "cluster.sizes",
        ),
    ),
    ("the wire", ("cluster.protocol", "cluster.codec", "cluster.sockets", "cluster.errors", "cluster.statistics")),
    (
        "what the roles share: keys and CURVE, the model contract, the share, desired state, serving HTTP, options",
        (
            "cluster.keys",
            "cluster.auth",
            "cluster.model_config",
            "cluster.decode",
            "cluster.model_check",
            "cluster.repository",
            "cluster.publish",
            "cluster.torch_files",
            "cluster.compile",
            "cluster.share",
            "cluster.desired",
            "cluster.canary",
            "cluster.serving",
            "cluster.options",
        ),
    ),
    ("the roles", ("cluster.agent", "cluster.broker", "cluster.manager")),
    (
        "the clients",
        ("cluster.client_core", "cluster.client", "cluster.async_client", "cluster.manager.client", "cluster"),
    ),
    (
        "the edge's parts",
        (
            "edge.tokens",
            "edge.errors",
            "edge.metrics",
            "edge.triton_config",
            "edge.oip_json",
            "edge.oip_tensors",
            "edge.oip",
            "edge.body",
            "edge.security",
            "edge.schemas",
        ),
    ),
    ("the edge's data plane", ("edge.dataplane",)),
    ("the edge's surfaces", ("edge.routes", "edge.grpc_service", "edge.repository", "edge.statistics")),
    ("the edge's app", ("edge.app", "edge")),
    (
        "the harness and tools",
        (
            "cluster.local",
            "cluster.process",
            "cluster.ports",
            "cluster.supervisor",
            "cluster.loadgen",
            "cluster.demo_models",
        ),
    ),
    ("the command line", ("cluster.cli", "cluster.__main__", "edge.command", "edge.__main__")),
)
# Groups of LAYERS entries that never import each other, whatever their layers: the roles and the edge talk over
# the bus, not through imports (the edge reaches the manager through cluster.manager.client, an entry of its own).
APART: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the agent", ("cluster.agent",)),
    ("the broker", ("cluster.broker",)),
    ("the manager", ("cluster.manager",)),
    ("the edge", tuple(e for _, names in LAYERS for e in names if e == "edge" or e.startswith("edge."))),
)
# (importer, imported) -> why this upward import is allowed. None today; an entry needs a reason a reader accepts.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _place(module: str, entries) -> str | None:
    """The longest entry of `entries` that `module` is or lies in ("cluster" and "edge" match only themselves)."""
    found = [e for e in entries if module == e or (e not in PACKAGES and module.startswith(e + "."))]
    return max(found, key=len, default=None)


def layer_of(module: str, layers=LAYERS) -> int | None:
    entries = {entry: i for i, (_, names) in enumerate(layers) for entry in names}
    entry = _place(module, entries)
    return None if entry is None else entries[entry]


def group_of(module: str, layers=LAYERS, apart=APART) -> str | None:
    """The APART group of the LAYERS entry that `module` is placed by, if any."""
    entry = _place(module, [e for _, names in layers for e in names])
    return next((group for group, entries in apart if entry in entries), None)


def every_import(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(importer, imported, "path:line") for every import among the modules, module-level and lazy alike."""
    files = module_files(root)
    found = []
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
                found += [(name, target, where) for target in dict.fromkeys(_targets(name, path, node, files))]
    return found


def layering_problems(root: Path = ROOT, layers=LAYERS, apart=APART, allowed=ALLOWED_UPWARD) -> list[str]:
    """One line for each module in no layer, each import of a higher layer, and each import from one `apart` group
    into another."""
    problems = [
        f"{name} is in no layer: add it to LAYERS in tests/test_import_cycles.py where it belongs"
        for name in module_files(root)
        if layer_of(name, layers) is None
    ]
    for importer, imported, where in every_import(root):
        low, high = layer_of(importer, layers), layer_of(imported, layers)
        if low is None or high is None or (importer, imported) in allowed:
            continue
        if high > low:
            problems.append(
                f"{where}: {importer} ({layers[low][0]}) imports {imported} ({layers[high][0]}), a layer above it"
            )
        mine, theirs = group_of(importer, layers, apart), group_of(imported, layers, apart)
        if mine and theirs and mine != theirs:
            problems.append(f"{where}: {importer} imports {imported}: {mine} and {theirs} never import each other")
    return problems


def test_no_module_imports_a_layer_above_its_own():
    problems = layering_problems()
    assert not problems, "layering (lower modules never import higher ones):\n" + "\n".join(problems)
    stale = [pair for pair in ALLOWED_UPWARD if pair not in {(a, b) for a, b, _ in every_import()}]
    assert not stale, f"ALLOWED_UPWARD lists imports that no longer exist: {stale}"


def test_the_layer_check_finds_what_reaches_up(tmp_path):
    """The check itself: a lazy import of a higher layer, one role importing another, the edge importing a role
    (a lower layer, but apart) and a module in no layer are each reported, with the file and line; importing a lower
    layer is fine."""
    for package in ("cluster", "cluster/broker", "cluster/agent", "edge"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "cluster" / "config.py").write_text("def f():\n    from cluster.local import LocalCluster\n")
    (tmp_path / "cluster" / "local.py").write_text("from cluster import config\n")
    (tmp_path / "cluster" / "broker" / "loop.py").write_text("import cluster.config\nimport cluster.agent.agent\n")
    (tmp_path / "cluster" / "agent" / "agent.py").write_text("")
    (tmp_path / "cluster" / "stray.py").write_text("")
    (tmp_path / "edge" / "stats.py").write_text("from cluster.agent.agent import x\n")
    layers = (
        ("bottom", ("cluster.config",)),
        ("middle", ("cluster.broker", "cluster.agent")),
        ("top", ("cluster.local", "cluster", "edge", "edge.stats")),
    )
    apart = (("the broker", ("cluster.broker",)), ("the agent", ("cluster.agent",)), ("the edge", ("edge.stats",)))
    problems = layering_problems(tmp_path, layers, apart, {})
    assert problems == [
        "cluster.stray is in no layer: add it to LAYERS in tests/test_import_cycles.py where it belongs",
        "cluster/broker/loop.py:2: cluster.broker.loop imports cluster.agent.agent: the broker and the agent never "
        "import each other",
        "cluster/config.py:2: cluster.config (bottom) imports cluster.local (top), a layer above it",
        "edge/stats.py:1: edge.stats imports cluster.agent.agent: the edge and the agent never import each other",
    ], problems
