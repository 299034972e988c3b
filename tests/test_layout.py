"""The package's shape (issue 20): no import circle, old import paths still work, and tests that
stand alone."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import multitoken
from multitoken.moved import MOVED

SRC = Path(multitoken.__file__).parent
TESTS = Path(__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("multitoken", *parts)).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports, at any depth of its
    code (an import inside a function closes a circle as surely as one at the top)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                edges.add(node.module)
                edges |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names} & modules.keys()
        graph[name] = edges - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "multitoken.decode.api" in graph and graph["multitoken.decode.api"]
    assert circles(graph) == []


def test_a_circle_is_found_where_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_import_path_is_the_new_module(old):
    assert importlib.import_module(f"multitoken.{old}") is importlib.import_module(MOVED[old])


def test_old_paths_work_in_a_fresh_interpreter_and_keep_the_api():
    """``from multitoken.tree import Tree`` and friends, as users wrote them before the move;
    ``multitoken.train`` stays the function after its sub-package is imported."""
    code = (
        "import multitoken\n"
        "from multitoken.generate import generate, make_plan\n"
        "from multitoken.tree import Tree, parse_spec, accept_sampled_tree\n"
        "from multitoken.bench import bench\n"
        "import multitoken.checkpoint as c\n"
        "import multitoken.training.trainer\n"
        "assert callable(multitoken.train) and callable(multitoken.load)\n"
        "assert Tree.parse('2,1').size == 5 and c.__name__ == 'multitoken.io.checkpoint'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_no_test_module_imports_another():
    tests = {p.stem for p in TESTS.rglob("test_*.py")}
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[-1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[-1] for a in node.names]
            assert not set(names) & tests, f"{path.relative_to(TESTS)} imports {names}"


def test_test_files_have_unique_names():
    """pytest imports test files by their base name: two of one name would collide."""
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names))
