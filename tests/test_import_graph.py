"""The import graph of `fscs/` and `stages/` has no cycle, no stage imports another stage, and benchmarks
import the library, not stages.

Edges come from a static `ast` scan of every module (`test_dvc_deps.imports_of`: imports inside functions
count too, so a cycle hidden behind an in-function import is still found). A stage is a `stages/` module that
is not private (`_common`) nor the package itself; stages share code through `fscs` or `stages._common`.
"""

from __future__ import annotations

from pathlib import Path

from tests.test_dvc_deps import PACKAGES, ROOT, imports_of, module_file


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: project modules it imports}, over every module of the project's packages."""
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    graph = {module_name(p): set(imports_of(p)) for p in files}
    for name, deps in graph.items():  # `import a.b` runs package `a`; that is not an edge between modules
        deps.discard(name)
        deps.difference_update(
            d for d in list(deps) if name.startswith(d + ".") and module_file(d).name == "__init__.py"
        )
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(comp, graph) for comp in components if len(comp) > 1]


def _cycle_in(comp: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def is_stage(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 2 and parts[0] == "stages" and not parts[1].startswith("_")


def stage_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every stage a that imports another stage b."""
    return [f"{a} imports {b}" for a in sorted(graph) if is_stage(a) for b in sorted(graph[a]) if is_stage(b)]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_stage_imports_a_stage():
    found = stage_imports(import_graph())
    assert not found, "stages import stages (move the shared code into fscs/):\n" + "\n".join(found)


def test_benchmarks_import_no_stage():
    found = [
        f"{path.relative_to(ROOT)} imports {m}"
        for path in sorted((ROOT / "benchmarks").glob("*.py"))
        for m in sorted(imports_of(path))
        if m.split(".")[0] == "stages"
    ]
    assert not found, "benchmarks import stages (import fscs instead):\n" + "\n".join(found)


def test_cycle_check_sees_function_level_imports():
    graph = {"fscs.a": {"fscs.b"}, "fscs.b": {"fscs.c"}, "fscs.c": {"fscs.a"}, "fscs.d": {"fscs.a"}}
    assert find_cycles(graph) == [["fscs.a", "fscs.b", "fscs.c", "fscs.a"]]
    assert find_cycles({"fscs.a": {"fscs.b"}, "fscs.b": set()}) == []
    real = import_graph()
    assert "fscs.pseudo.enhancer" in real["fscs.pseudo.attention"]  # the Labeler loads enhancers
    real["fscs.pseudo.enhancer"].add("fscs.pseudo.attention")  # as an in-function import used to add it
    cycles = [set(c) for c in find_cycles(real)]
    assert {"fscs.pseudo.enhancer", "fscs.pseudo.attention"} in cycles


def test_stage_check_names_the_importing_stage():
    graph = {"stages.enhancer": {"stages.pseudo", "stages._common", "fscs.core.io"}, "stages.pseudo": set()}
    assert stage_imports(graph) == ["stages.enhancer imports stages.pseudo"]


#: fscs's folders in pipeline order (docs/ARCHITECTURE.md "Layout"); config and core serve every step
PIPELINE = (
    "config",
    "core",
    "data",
    "features",
    "pseudo",
    "learn",
    "evaluation",
    "report",
    "predict",
    "demo",
)
#: the imports of a later step's code made on purpose
LATER_ON_PURPOSE = {
    ("fscs.learn.train", "fscs.evaluation.episodes"),  # validation scores episodes as the evaluation does
    ("fscs.core.overlay", "fscs.data.images"),  # overlays paint the void label
}


def test_folders_import_only_earlier_steps():
    def step(module: str) -> int | None:
        parts = module.split(".")
        folder = parts[1] if len(parts) > 1 else None
        if folder in ("config", "core"):
            return 0
        return PIPELINE.index(folder) if folder in PIPELINE else None

    found = [
        f"{m} imports {d}"
        for m, deps in sorted(import_graph().items())
        for d in sorted(deps)
        if m.startswith("fscs.")
        and d.count(".") > 1
        and step(m) is not None
        and step(d) is not None
        and step(d) > step(m)
        and (m, d) not in LATER_ON_PURPOSE
    ]
    assert not found, "a step imports a later step's code:\n" + "\n".join(found)
