"""The package's import graph (docs/architecture.md): every arrow points down the layers, and no module imports one
that imports it back, lazily (inside a function) or not."""
from __future__ import annotations

import ast
from pathlib import Path

import tvrn

SRC = Path(tvrn.__file__).parent

# bottom to top: a module may import modules of its own layer or of the layers below it, never above
LAYERS = (
    ("tvrn", "tvrn.fileio", "tvrn.tensors", "tvrn.metrics", "tvrn.losses", "tvrn.distributed", "tvrn.data",
     "tvrn.extract"),
    ("tvrn.scoring",),
    ("tvrn.models",),
    ("tvrn.evaluation", "tvrn.checkpoint", "tvrn.config", "tvrn.grounding", "tvrn.convert"),
    ("tvrn.train", "tvrn.search", "tvrn.export", "tvrn.api"),
    ("tvrn.pipeline",),
    ("tvrn.demo",),
    ("tvrn.commands", "tvrn.cli"),
)


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (module level or inside functions)."""
    modules = {module_name(p, src): p for p in src.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out.update(n for n in names if n in modules and n != mod)
        graph[mod] = out
    return graph


def layer_of(mod: str) -> int:
    """The layer of a module: that of the longest LAYERS prefix naming it."""
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{mod} is in no layer of LAYERS (tests/test_architecture.py): place it"
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module of a higher layer (the package root, which imports nothing, aside)."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if b != "tvrn" and layer_of(b) > layer_of(a))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): modules that import each other,
    directly or round a loop."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_import_points_down_the_layers():
    graph = import_graph()
    assert {"tvrn.scoring.infer", "tvrn.models.base", "tvrn.search.index", "tvrn.cli"} <= set(graph)
    assert upward_imports(graph) == []


def test_no_module_imports_one_that_imports_it_back():
    assert import_cycles(import_graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """On a small package whose lowest module imports a model lazily (upward, and round a loop), both checks
    report it."""
    pkg = tmp_path / "tvrn"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fileio.py").write_text("def f():\n    from .models import base\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "base.py").write_text("from ..fileio import f\n")
    graph = import_graph(pkg)
    assert graph["tvrn.fileio"] == {"tvrn.models", "tvrn.models.base"} and graph["tvrn.models.base"] == {"tvrn.fileio"}
    assert upward_imports(graph) == ["tvrn.fileio -> tvrn.models", "tvrn.fileio -> tvrn.models.base"]
    assert import_cycles(graph) == [["tvrn.fileio", "tvrn.models.base"]]
