"""The import rules of the layout, checked by reading every module of api, worker, shared and cli with `ast`.

- No import cycles between modules.
- `shared` imports nothing from `api`, `worker` or `cli`: it is what the API and the workers both use.
- `api` never loads `worker`, torch, transformers or accelerate, not even through another module.
- `cli` loads nothing from `api` or `worker`, nor torch, transformers or accelerate: it starts the API and the workers
  as processes (`python -m api`, `python -m worker`, `python -m worker.model_check`), never imports them. There is
  no exception to list: `ragq worker` and `ragq api` exec those programs.

Every import counts, at module level or inside a function (it runs as soon as that function is called), except
those under `if TYPE_CHECKING:`, which never run. `from pkg import name` is an import of `pkg.name` when that is a
module, else of `pkg`.

For cycles only explicit imports are edges. Importing `pkg.mod` also runs `pkg/__init__.py` first, but that
implicit step is not an edge: the package is always initialised before its submodule, so it cannot form a cycle
at run time, and counting it would flag every `__init__` that imports its own submodules inside a function
(`api.create_app` registering its blueprints) though nothing runs in a circle. A submodule that explicitly
imports a name from its package's `__init__` (`from api import create_app`) is an edge like any other. For what a
module *loads* (the `api` and `cli` rules), the implicit package imports are followed too.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "worker", "shared", "cli")
HEAVY = ("torch", "transformers", "accelerate")


@dataclass
class Graph:
    """Modules by dotted name, and what each one imports: our modules, and the top-level names of the rest."""

    files: dict[str, Path]
    internal: dict[str, set[str]] = field(default_factory=dict)
    external: dict[str, set[str]] = field(default_factory=dict)


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the packages under `root`, by dotted name (a package by its own name)."""
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    nodes: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imported_names(name: str, path: Path, files: dict[str, Path]) -> set[str]:
    """The dotted names module `name` imports, with relative imports resolved and submodules told from names."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in files else base)
    return found


def build_graph(root: Path) -> Graph:
    """Read every module under `root` and sort its imports into ours and the rest."""
    graph = Graph(module_files(root))
    for name, path in graph.files.items():
        graph.internal[name], graph.external[name] = set(), set()
        for imported in imported_names(name, path, graph.files):
            if imported.split(".")[0] in PACKAGES:
                # `import a.b.c` where c is a function or class of a.b: the module is a.b.
                while imported not in graph.files and "." in imported:
                    imported = imported.rsplit(".", 1)[0]
                if imported != name:
                    graph.internal[name].add(imported)
            else:
                graph.external[name].add(imported.split(".")[0])
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def loads(graph: Graph, start: str) -> tuple[set[str], set[str]]:
    """Our modules and the outside top-level packages that importing `start` can load, function-level imports too."""
    seen: set[str] = set()
    external: set[str] = set()
    frontier = [start, *_parents(start)]
    while frontier:
        name = frontier.pop()
        if name in seen or name not in graph.files:
            continue
        seen.add(name)
        external |= graph.external[name]
        for imported in graph.internal[name]:
            frontier.extend([imported, *_parents(imported)])
    return seen, external


def cycles(graph: Graph) -> list[list[str]]:
    """Each group of modules that import one another in a circle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for imported in sorted(graph.internal[name]):
            if imported not in index:
                visit(imported)
                low[name] = min(low[name], low[imported])
            elif imported in on_stack:
                low[name] = min(low[name], index[imported])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(graph.files):
        if name not in index:
            visit(name)
    return found


def violations(graph: Graph) -> list[str]:
    """Every broken rule, one line each; empty when the layout holds."""
    problems = [f"import cycle: {' -> '.join(group)}" for group in cycles(graph)]
    for name in sorted(graph.files):
        top = name.split(".")[0]
        if top == "shared":
            for imported in sorted(graph.internal[name]):
                if imported.split(".")[0] != "shared":
                    problems.append(f"{name} imports {imported}: shared must not import api, worker or cli")
        if top in ("api", "cli"):
            forbidden = ("worker",) if top == "api" else ("api", "worker")
            ours, outside = loads(graph, name)
            for module in sorted(m for m in ours if m.split(".")[0] in forbidden):
                problems.append(f"{name} loads {module}")
            for package in sorted(p for p in outside if p in HEAVY):
                problems.append(f"{name} loads {package}")
    return problems


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(ROOT)


def test_every_package_is_read(graph: Graph) -> None:
    assert set(PACKAGES) <= set(graph.files)
    assert {"api.__main__", "worker.__main__", "cli.serve", "worker.model_check"} <= set(graph.files)
    assert "worker.runtime" in graph.internal["worker.app"]


def test_the_layout_keeps_its_import_rules(graph: Graph) -> None:
    assert violations(graph) == []


def test_the_ragq_serve_parent_loads_neither_torch_nor_the_worker(graph: Graph) -> None:
    ours, outside = loads(graph, "cli.main")
    assert "cli.serve" in ours
    assert not [m for m in ours if m.split(".")[0] in ("api", "worker")]
    assert not outside & set(HEAVY)


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("shared/config.py", "import worker.runtime", "shared.config imports worker.runtime"),
        ("shared/store.py", "from cli import serve", "shared.store imports cli.serve"),
        ("api/errors.py", "import worker.model_check", "api.errors loads worker.model_check"),
        ("cli/client.py", "def late() -> None:\n    from cli import batch", "import cycle: cli.batch -> cli.client"),
        ("cli/progress.py", "import transformers", "cli.progress loads transformers"),
    ],
)
def test_the_check_catches_a_broken_rule(tmp_path: Path, module: str, line: str, expected: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    path = tmp_path / module
    path.write_text(path.read_text() + "\n" + line + "\n")
    problems = violations(build_graph(tmp_path))
    assert [problem for problem in problems if problem.startswith(expected)], problems
