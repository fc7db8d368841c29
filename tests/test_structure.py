"""The shape of the house: imports point one way, and every import sits at the top of its module.

The library's modules import each other in one direction (`book/ -> mrcnn/ -> kernels/`, and
inside `mrcnn/` no module imports one that imports it back): each is read, tested and taught
on its own. This walks the `import` statements of `mrcnn/` and `kernels/` with Python's own
parser, the way `python -X importtime` would meet them, and fails on a cycle, on an import
inside a function (they hide cycles), and on `kernels/` reaching into `mrcnn/`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mrcnn", "kernels")
# Imports that may sit inside a function: optional dependencies that must not be needed to import
# the module (each such line says why in a comment).
OPTIONAL = {"torchvision", "triton", "IPython", "onnxruntime", "onnx"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement imports (`from a import b` gives `a.b` and `a`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # a relative import
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> project module it imports, and the imports found inside functions."""
    known = modules()
    graph, inside_functions = {}, []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        lines = path.read_text().splitlines()
        graph[name] = set()
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    roots = {n.split(".")[0] for n in imported_names(node, name, path.name == "__init__.py")}
                    commented = "#" in lines[node.lineno - 1] or "#" in lines[node.lineno - 2]
                    if not (roots <= OPTIONAL and commented):
                        inside_functions.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_names(node, name, path.name == "__init__.py"):
                    if target in known and target != name:
                        graph[name].add(target)
    return graph, inside_functions


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each one a cycle or more."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_finds_a_cycle_and_a_function_import(tmp_path):
    # the checker itself: a two-module cycle and a three-module one are found, a chain is not
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    node = ast.parse("from . import x").body[0]
    assert imported_names(node, "mrcnn.data.coco", False) == ["mrcnn.data", "mrcnn.data.x"]


def test_no_import_cycles_in_the_library():
    graph, _ = import_graph()
    assert "mrcnn.model" in graph and "kernels.roi_align" in graph  # the walk read the packages
    assert cycles(graph) == []


def test_kernels_import_nothing_from_mrcnn():
    graph, _ = import_graph()
    reaching = {m: sorted(t for t in targets if t.startswith("mrcnn")) for m, targets in graph.items() if m.startswith("kernels")}
    assert {m: t for m, t in reaching.items() if t} == {}


def test_no_imports_inside_functions():
    _, inside_functions = import_graph()
    assert inside_functions == []
