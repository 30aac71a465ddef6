"""The package's import graph has no cycles: every ``import`` counts, those inside functions too (an import moved
into a function to dodge a cycle still is one: the piece lives in the wrong room)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dsunlearn"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (relative imports resolved)."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    stem = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    module = ".".join(stem + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # "from . import x" and "from .pkg import mod" import submodules too.
                candidates = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for c in candidates:
                # The longest package-module prefix ("dsunlearn.eval.runner.Evaluator" -> "dsunlearn.eval.runner").
                parts = c.split(".")
                for i in range(len(parts), 0, -1):
                    prefix = ".".join(parts[:i])
                    if prefix in files:
                        if prefix != name:
                            targets.add(prefix)
                        break
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules, or None (a package's __init__ importing its own submodules is not one:
    importing a submodule runs its package's __init__ first by design, so parent edges are left out)."""
    def edges(m):
        return {t for t in graph[m] if not m.startswith(t + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges(m)):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_walker_finds_cycles_and_function_level_imports(tmp_path):
    pkg = tmp_path / "dsunlearn"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import x\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import dsunlearn.c as c\nx = 1\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(pkg)
    assert graph["dsunlearn.a"] == {"dsunlearn.sub", "dsunlearn.sub.b"}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and {"dsunlearn.a", "dsunlearn.sub.b", "dsunlearn.c"} <= set(cycle)
    (pkg / "c.py").write_text("x = 2\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)
