"""The bars of the run-side redesign (issue 22), checked on the source: an import graph of vaecli/ without
circles or private names crossing modules, short functions and files, thin CLI commands (line length is ruff's, in CI).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vaecli"
MAX_FUNCTION = 60  # lines, decorators and signature included
MAX_FILE = 500
MAX_COMMAND_BODY = 40  # a CLI command parses, builds a config, calls one function, renders


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _target(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _edges() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> modules it imports (lazy imports inside functions included), and private names imported."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    private = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in MODULES}
            elif isinstance(node, ast.ImportFrom):
                target = _target(name, node)
                for alias in node.names:
                    if f"{target}.{alias.name}" in MODULES:
                        graph[name].add(f"{target}.{alias.name}")
                    elif target in MODULES:
                        graph[name].add(target)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append(f"{name} imports {target}.{alias.name}")
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_the_package():
    # a walk that found nothing would pass every bar below
    assert {"vaecli.cli", "vaecli.batch", "vaecli.latents", "vaecli.pipeline", "vaecli.memory"} <= set(MODULES)
    assert len(MODULES) > 60


def test_no_import_circles():
    graph, _ = _edges()
    assert graph["vaecli.batch"], "the import graph is empty: the walk is broken"
    assert _cycles(graph) == []


def test_no_private_name_crosses_modules():
    assert _edges()[1] == []


def test_the_core_imports_neither_the_cli_nor_the_dataset_layer():
    graph, _ = _edges()
    lower = [m for m in MODULES if not m.startswith(("vaecli.cli", "vaecli.dataset", "vaecli.entry"))
             and m not in ("vaecli", "vaecli.__main__", "vaecli.data")]
    wrong = sorted(f"{m} -> {t}" for m in lower for t in graph[m]
                   if t.startswith(("vaecli.cli", "vaecli.dataset")))
    assert wrong == []


def test_no_file_over_the_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_FILE} == {}


def test_no_function_over_the_limit():
    long = {}
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION:
                    long[f"{name}.{node.name}"] = node.end_lineno - start + 1
    assert long == {}


def _commands() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for name, tree in TREES.items():
        if not name.startswith("vaecli.cli"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "attr", getattr(d.func, "id", None)) == "command"
                    for d in node.decorator_list):  # @app.command(...) or cli.app's @command(...)
                found.append((name, node))
    return found


def test_cli_commands_are_thin():
    commands = _commands()
    assert {n.name for _, n in commands} >= {"encode", "decode", "roundtrip", "bench", "info"}
    body = {f"{m}.{n.name}": n.end_lineno - n.body[0].lineno + 1 for m, n in commands}
    assert {k: v for k, v in body.items() if v > MAX_COMMAND_BODY} == {}
