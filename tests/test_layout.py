"""The package's house rules, read from its imports (AST): sub-packages along the data path import only from
those before them, no import cycles between modules or sub-packages, no library module imports argparse or the
CLI (commands live in `safeneurons.cli`), collectives (torch.distributed) only in `safeneurons.runtime`, and no
module or function grows past the sizes a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "safeneurons"

# The data path; a module may import from its own layer's sub-packages (without a cycle) and from earlier layers.
LAYERS = (
    ("errors", "compat"),
    ("runtime",),
    ("models", "data"),
    ("masks",),
    ("scores",),
    ("interventions",),
    ("evaluation",),
    ("finetune",),
    ("interp", "analysis", "demo"),
    ("workflows",),
    ("cli",),
)
LAYER_OF = {room: index for index, rooms in enumerate(LAYERS) for room in rooms}
ENTRY_POINTS = ("cli", "__main__")  # may parse arguments


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["safeneurons", *parts])


def read_package(root: Path) -> dict[str, str]:
    return {module_name(path, root): path.read_text() for path in sorted(root.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(source: str, modules: set[str], this: str) -> set[str]:
    """The modules `source` imports when it runs (module level and inside functions; not `if TYPE_CHECKING:`)."""
    found: set[str] = set()
    package = this if f"{this}.__init__" in modules or any(m.startswith(this + ".") for m in modules) else \
        this.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layout_problems(sources: dict[str, str]) -> list[str]:
    """Every violation of the house rules in a package given as {module name: source}."""
    modules = set(sources)
    problems = []
    graph: dict[str, set[str]] = {}
    rooms: dict[str, set[str]] = {}
    for module, source in sources.items():
        imported = imports_of(source, modules, module)
        ours = {name for name in imported if name == "safeneurons" or name.startswith("safeneurons.")}
        graph[module] = {name for name in ours if name in modules and name != module}
        room = room_of(module)
        entry = room == "cli" or module.endswith("__main__")
        if room and room != "runtime" and any(name == "torch.distributed" or name.startswith("torch.distributed.")
                                              for name in imported):
            problems.append(f"{module} imports torch.distributed: collectives live in safeneurons.runtime")
        if not entry and room:
            if "argparse" in imported:
                problems.append(f"{module} imports argparse: commands belong in safeneurons.cli")
            if any(room_of(name) == "cli" for name in ours):
                problems.append(f"{module} imports the CLI")
        if room not in LAYER_OF:
            if room:
                problems.append(f"{module} is in no layer of {LAYERS}")
            continue
        for name in ours:
            other = room_of(name)
            if other and other in LAYER_OF and LAYER_OF[other] > LAYER_OF[room] and not entry:
                problems.append(f"{module} (layer {room}) imports {name} (layer {other}, later on the data path)")
            if other and other != room and not entry:
                rooms.setdefault(room, set()).add(other)
    for name, graph_of in (("modules", graph), ("sub-packages", rooms)):
        cycle = find_cycle(graph_of)
        if cycle:
            problems.append(f"import cycle between {name}: {' -> '.join(cycle)}")
    return problems


def test_the_package_keeps_its_layout():
    sources = read_package(PACKAGE)
    assert len(sources) > 50, "the package was not found"
    assert layout_problems(sources) == []


def test_the_checker_finds_a_cycle_an_upward_import_and_argparse():
    base = read_package(PACKAGE)
    cyclic = {**base, "safeneurons.masks.io": base["safeneurons.masks.io"] + "\nfrom safeneurons.masks import apply\n",
              "safeneurons.masks.apply": base["safeneurons.masks.apply"] + "\nfrom safeneurons.masks import io\n"}
    assert any(problem.startswith("import cycle between modules") and "safeneurons.masks.io" in problem
               for problem in layout_problems(cyclic))
    upward = {**base, "safeneurons.runtime.memory": "from safeneurons.scores.config import ScoreConfig\n"}
    assert "safeneurons.runtime.memory (layer runtime) imports safeneurons.scores.config (layer scores, later on " \
           "the data path)" in layout_problems(upward)
    parsing = {**base, "safeneurons.scores.config": "def f():\n    import argparse\n"}
    assert "safeneurons.scores.config imports argparse: commands belong in safeneurons.cli" in layout_problems(parsing)
    collective = {**base, "safeneurons.scores.config": "import torch.distributed as dist\n"}
    assert "safeneurons.scores.config imports torch.distributed: collectives live in safeneurons.runtime" in \
        layout_problems(collective)
    rooms = {**base, "safeneurons.models.extra": "from safeneurons.data import samples\n",
             "safeneurons.data.extra": "from safeneurons.models import structure\n"}
    assert any(problem.startswith("import cycle between sub-packages") for problem in layout_problems(rooms))


@pytest.mark.parametrize("limit, measure", [(500, "lines of a module")])
def test_no_module_is_too_long(limit, measure):
    long = {module: len(source.splitlines()) for module, source in read_package(PACKAGE).items()
            if len(source.splitlines()) > limit}
    assert long == {}, f"over {limit} {measure}"


def test_no_function_is_too_long():
    long = []
    for module, source in read_package(PACKAGE).items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
