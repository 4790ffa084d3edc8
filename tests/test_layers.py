"""The import rules of the repository (issue 10, item 4): layers that point one way, no cycles, lazy imports
only where a comment says why.

* ``lint-imports`` (import-linter, the contracts of ``.importlinter``) must pass: ``refstream`` > ``workers`` >
  ``pruning`` | ``video_pipeline``; ``eval`` imports none of them.
* No import cycle anywhere, at module level, in any package (``refstream`` included), counting imports inside
  functions: grimp's graph (import-linter's own) split into strongly connected components.
* ``refstream_errors`` (the shared errors) imports nothing but the standard library.
* In ``workers``, ``pruning``, ``video_pipeline`` and ``eval`` an import inside a function carries a comment on
  its line or the line before (why it is lazy: a heavy optional module such as ray, cv2, decord).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("refstream", "workers", "pruning", "video_pipeline", "eval")
LOWER = ("workers", "pruning", "video_pipeline", "eval")


def _repo_env() -> dict[str, str]:
    """The environment with this checkout first on ``sys.path`` (so a worktree is checked, not an install)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _lint_imports() -> str:
    """The ``lint-imports`` console script of the running interpreter's environment (dev extra)."""
    script = Path(sys.executable).parent / "lint-imports"
    found = str(script) if script.is_file() else shutil.which("lint-imports")
    if not found:
        pytest.fail("lint-imports not found: install the dev extra (pip install -e '.[dev]', import-linter)")
    return found


def test_import_linter_contracts_pass():
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, env=_repo_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"lint-imports failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}{proc.stderr[-3000:]}"
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout


# --------------------------------------------------------------------------------------------------- cycles
def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Components of more than one module, or of one module importing itself (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return sorted(found)


def test_strongly_connected_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def project_graph() -> grimp.ImportGraph:
    sys.path.insert(0, str(REPO))  # grimp finds the packages through importlib
    try:
        return grimp.build_graph(*PACKAGES, cache_dir=None)
    finally:
        sys.path.remove(str(REPO))


def test_no_import_cycles():
    graph = project_graph()
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = strongly_connected(edges)
    described = []
    for component in cycles:
        members = set(component)
        lines = [f"  {a} -> {b} (line {d['line_number']})"
                 for a in component for b in sorted(edges[a] & members)
                 for d in graph.get_import_details(importer=a, imported=b)[:1]]
        described.append(" <-> ".join(component) + ":\n" + "\n".join(lines))
    assert not cycles, "import cycles (module level, function-level imports included):\n" + "\n".join(described)


# ------------------------------------------------------------------------------------------------ leaf errors
def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add("." if node.level else (node.module or "").split(".")[0])
    return roots


def test_refstream_errors_is_a_leaf():
    roots = _imported_roots(ast.parse((REPO / "refstream_errors.py").read_text()))
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}, roots


def test_refstream_errors_are_the_same_classes():
    import refstream.errors
    import refstream_errors

    names = [n for n in dir(refstream_errors) if isinstance(getattr(refstream_errors, n), type)]
    assert {"RefStreamError", "InputError", "ConfigError", "WeightsNotFoundError"} <= set(names)
    for name in names:
        assert getattr(refstream.errors, name) is getattr(refstream_errors, name)


def test_lower_packages_import_errors_from_the_leaf():
    """No module below refstream imports refstream.errors (they use refstream_errors)."""
    offenders = []
    for package in LOWER:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refstream"):
                    if node.module != "refstream_errors":
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} from {node.module}")
    assert not offenders, offenders


def test_packaging_ships_the_leaf_module():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "refstream_errors" in pyproject["tool"]["setuptools"]["py-modules"]
    assert any(dep.startswith("import-linter") for dep in pyproject["project"]["optional-dependencies"]["dev"])
    for dockerfile in sorted((REPO / "docker").glob("Dockerfile*")):
        copied = " ".join(line for line in dockerfile.read_text().splitlines() if line.startswith("COPY"))
        assert "refstream_errors.py" in copied, f"{dockerfile.name} does not COPY refstream_errors.py"


# ------------------------------------------------------------------------------------------- lazy imports
def unexplained_lazy_imports(source: str) -> list[int]:
    """Line numbers of imports inside a function whose line (or the line before) has no comment."""
    lines = source.splitlines()
    bad = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                here, before = lines[child.lineno - 1], lines[child.lineno - 2] if child.lineno > 1 else ""
                if "#" not in here and not before.strip().startswith("#"):
                    bad.append(child.lineno)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return bad


def test_unexplained_lazy_imports_are_found():
    source = (
        "import os\n"
        "def f():\n"
        "    import json\n"
        "    import cv2  # lazy: heavy\n"
        "    # lazy: heavy optional\n"
        "    import ray\n"
        "    class A:\n"
        "        def g(self):\n"
        "            from x import y\n"
    )
    assert unexplained_lazy_imports(source) == [3, 9]


@pytest.mark.parametrize("package", LOWER)
def test_imports_at_module_top_unless_explained(package):
    bad = [f"{path.relative_to(REPO)}:{line}"
           for path in sorted((REPO / package).rglob("*.py"))
           for line in unexplained_lazy_imports(path.read_text())]
    assert not bad, f"imports inside functions without a comment saying why they are lazy: {bad}"
