"""The shape of the product code, checked by reading it (ast; nothing is imported).

- No import cycle among the modules of `dpkernels/` and `dpldm/`. Every runtime import counts, also one inside a
  function (a lazy import hides a cycle from the interpreter, not from a reader); imports under
  `if TYPE_CHECKING:` do not run and do not count. Importing `pkg.sub` is an edge to `pkg.sub` only (Python runs
  `pkg/__init__.py` first, but a package importing its own submodules is not a cycle).
- No function in `dpkernels/` or `dpldm/` over ~80 lines, kernel bodies (`@triton.jit`) excepted.
- Every public name of `dpkernels/` has a docstring, with an Args section when it takes arguments and a Returns
  section when it returns a value ("Args and Returns: as `X`" counts: an override documented by its base).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dpkernels", "dpldm")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the product packages."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def is_extension(name: str) -> bool:
    """A compiled submodule (dpkernels._C): a leaf, it imports no product module."""
    path = ROOT.joinpath(*name.split("."))
    return any(path.parent.glob(path.name + ".*.so")) or any(path.parent.glob(path.name + ".*.pyd"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (anywhere in the file), skipping `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """importer -> the product modules it imports."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_from(node, name, path.name == "__init__.py")
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [s if s in modules or is_extension(s) else base for s in subs]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", ["dpkernels", "dpldm"])
def test_no_import_cycle_in_the_product_code(package: str) -> None:
    graph = import_graph(product_modules())
    assert graph["dpkernels.engine"] and graph["dpldm.train"], "the import graph is empty: the walker is broken"
    found = [c for c in cycles(graph) if any(m == package or m.startswith(package + ".") for m in c)]
    assert not found, "import cycles (each line: modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    """The walker sees an import inside a function, and not one under TYPE_CHECKING."""
    a = ast.parse("def f():\n    from pkg import b\n")
    b = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\nimport pkg.a\n")
    assert [n.names[0].name for n in runtime_imports(a)] == ["b"]
    assert sorted(n.names[0].name for n in runtime_imports(b)) == ["TYPE_CHECKING", "pkg.a"]
    assert cycles({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}) == [["pkg.a", "pkg.b"]]


def _is_kernel(fn: ast.FunctionDef) -> bool:
    """A Triton kernel body (@triton.jit, with or without arguments)."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


@pytest.mark.parametrize("package", PACKAGES)
def test_no_long_function(package: str) -> None:
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(long)


def _returns_value(fn: ast.FunctionDef) -> bool:
    """A `return <value>` in the function's own body (not in a nested def or lambda)."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _decorated(node: ast.AST, *names: str) -> bool:
    return any((isinstance(d, ast.Name) and d.id in names) or (isinstance(d, ast.Attribute) and d.attr in names)
               for d in getattr(node, "decorator_list", []))


def undocumented(tree: ast.Module, where: str) -> Iterator[str]:
    """Public defs and classes (and the public methods of public classes) whose docstring misses a part.

    A class documents its constructor (Args, when its __init__ takes any); a property's docstring says what it is
    (its setter needs none)."""
    def visit(scope: ast.AST, prefix: str) -> Iterator[str]:
        for node in getattr(scope, "body", []):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_") or _decorated(node, "setter", "deleter"):
                continue
            doc = ast.get_docstring(node) or ""
            if isinstance(node, ast.ClassDef):
                init = next((m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"), None)
                takes = bool(init and (init.args.args[1:] or init.args.kwonlyargs or init.args.vararg))
                returns = False
            elif _decorated(node, "property"):
                takes = returns = False
            else:
                a = node.args
                takes = any(x.arg not in ("self", "cls") for x in a.posonlyargs + a.args + a.kwonlyargs) or bool(
                    a.vararg or a.kwarg)
                returns = _returns_value(node)
            missing = [] if doc else ["docstring"]
            missing += [part for part, needed in (("Args", takes), ("Returns", returns)) if needed and part not in doc]
            if missing:
                yield f"{where}:{node.lineno} {prefix}{node.name}: no {', '.join(missing)}"
            if isinstance(node, ast.ClassDef):
                yield from visit(node, f"{prefix}{node.name}.")
    yield from visit(tree, "")


def test_every_public_name_of_dpkernels_is_documented() -> None:
    found = []
    for path in sorted((ROOT / "dpkernels").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if any(part.startswith("_") and part != "__init__.py" for part in rel.parts):
            continue  # a private module (dpkernels/triton/_common.py)
        found += undocumented(ast.parse(path.read_text(), str(path)), str(rel))
    assert not found, "public names without a full docstring (Args/Returns, Google style):\n" + "\n".join(found)
