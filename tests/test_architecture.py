"""The shape of the tree: no import cycles among the modules of dcp_backend and megatron/training
(imports inside functions count), and every package directory is installed (pyproject.toml lists them)."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dcp_backend", os.path.join("megatron", "training"))


def _modules() -> dict[str, str]:
    mods = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (top level or inside functions)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")
                    parts = parts[:len(parts) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # a name inside a module -> the module
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = "done"
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def _import_graph_in_a_fresh_interpreter() -> dict[str, set[str]]:
    """CPython 3.11's ast.parse can fail with "AST constructor recursion depth mismatch" in a process whose
    earlier work changed the recursion state (gh-106905); the graph is built in a new interpreter."""
    import json
    import subprocess

    code = ("import json; from tests.test_architecture import import_graph; "
            "print(json.dumps({k: sorted(v) for k, v in import_graph().items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return {k: set(v) for k, v in json.loads(out.stdout).items()}


def test_no_import_cycles():
    graph = _import_graph_in_a_fresh_interpreter()
    assert len(graph) > 50 and "dcp_backend.contract" in graph["dcp_backend.registry"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_package_directory_is_installed():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        conf = tomllib.load(f)["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {name for name, path in _modules().items() if path.endswith("__init__.py")}
    found.add("megatron.training")  # megatron is a namespace package: megatron/__init__.py must not exist
    assert not os.path.exists(os.path.join(ROOT, "megatron", "__init__.py"))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert conf["package-dir"]["dcp_tools"] == "tools" and "dcp_tools" in listed
