"""dvc.yaml tells the truth: each stage declares exactly the code it imports and the params it reads.

A stage's code is the import closure of its `python -m stages.X` module inside `fscs/` and `stages/`,
found by a static `ast` scan (imports inside functions included; package `__init__.py` files count, they
run on import), plus the files those modules read beside themselves (``Path(__file__).with_name(...)``: the
fused attention kernel's C++ source). A declared folder (``fscs/learn/model``) covers the files under it. A
params section is read where code of the closure calls ``section(..., "name")`` or indexes, ``.get()``s or
takes the attribute ``name`` of something whose name contains ``params``, ``config`` or ``cfg``; the section
names come from
params.yaml. Both directions are checked: an undeclared file or section serves stale results, a declared one
that nothing reads re-runs the stage for nothing. A declared folder must hold only files the stage imports.
The ``memory`` section is the one exception: a budget decides what a stage keeps in memory, never a value
(`tests/test_memory_budget.py`), so it is not a DVC param and changing it re-runs nothing.
Every path argument of the command (``--flag a/b``) must be a dep or an out, and a stage that can open
dataset images or masks (``fscs/data/images.py`` in its closure) must depend on ``${dataset.root}``: the
index holds their paths, so it can stay byte-identical while a mask changes.

`python tests/test_dvc_deps.py` prints each stage's derived code deps and params (to paste into dvc.yaml).
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fscs", "stages")
RECEIVERS = ("params", "config", "cfg")
READER, DATASET = "fscs/data/images.py", "${dataset.root}"  # the module that opens images and masks
NOT_PARAMS = frozenset({"memory"})  # sections that change no output (see the module doc)


def module_file(module: str) -> Path | None:
    """The file of a dotted module inside the project's packages (None: not ours, or not a module)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def executed_modules(module: str) -> list[str]:
    """`a.b.c` runs `a`, `a.b` and `a.b.c` on import."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def imports_of(path: Path) -> frozenset[str]:
    """Project modules a file imports anywhere in its body (``from p import m``: p.m too, if a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(
                f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")
            )
    return frozenset(m for name in found for m in executed_modules(name) if module_file(m))


@cache
def companions_of(path: Path) -> frozenset[Path]:
    """Files a module reads beside itself, named as ``Path(__file__).with_name("...")`` (a C++ source)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "with_name"
            and "__file__" in ast.unparse(node.func.value)
            and node.args
            and _literal(node.args[0])
        ):
            found.add(path.with_name(_literal(node.args[0])))
    return frozenset(found)


def closure(module: str) -> set[Path]:
    """Every project file that `python -m module` executes through imports, and the files they read beside
    themselves."""
    todo = [m for m in executed_modules(module) if module_file(m)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imports_of(module_file(name)))
    files = {module_file(m) for m in seen}
    return files.union(*(companions_of(f) for f in files))


def _receiver_name(node: ast.expr) -> str:
    """The last name of an expression: `params`, `self.params`, `ckpt["config"]` -> params, params, config."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value)
    return ""


def _is_params(node: ast.expr) -> bool:
    return any(word in _receiver_name(node).lower() for word in RECEIVERS)


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@cache
def sections_read_by(path: Path, sections: frozenset[str]) -> frozenset[str]:
    """Params sections a file reads (see the module docstring for the patterns)."""
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            if _receiver_name(func) == "section" and len(node.args) >= 2:
                found.add(_literal(node.args[1]))
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in ("get", "need")
                and node.args
                and _is_params(func.value)
            ):
                found.add(_literal(node.args[0]))
        elif isinstance(node, ast.Subscript) and _is_params(node.value):
            found.add(_literal(node.slice))
        elif isinstance(node, ast.Attribute) and _is_params(node.value):
            found.add(node.attr)
    return frozenset(found & sections)


def stage_module(cmd: str) -> str | None:
    match = re.search(r"python -m ([\w.]+)", cmd)
    return match.group(1) if match else None


def load_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def params_sections() -> frozenset[str]:
    return frozenset(yaml.safe_load((ROOT / "params.yaml").read_text())) - NOT_PARAMS


def _declared_params(stage: dict) -> set[str]:
    out: set[str] = set()
    for entry in stage.get("params", []):
        keys = entry if isinstance(entry, str) else [k for v in entry.values() for k in v]
        out.update(k.split(".")[0] for k in ([keys] if isinstance(keys, str) else keys))
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def derived(stage: dict) -> tuple[set[str], set[str]]:
    """(code files, params sections) that the stage's command really uses."""
    files = closure(stage_module(stage["cmd"]))
    sections = params_sections()
    read = set().union(*(sections_read_by(f, sections) for f in files if f.suffix == ".py"))
    return {_rel(f) for f in files}, read


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _paths(entries: list) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (entries are strings or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def _code_problems(name: str, stage: dict, files: set[str]) -> list[str]:
    code = [d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES]
    out = [
        f"stage {name}: imports {f} but does not declare it in deps"
        for f in sorted(files)
        if not any(_under(f, d) for d in code)
    ]
    for dep in code:
        held = {_rel(p) for p in (ROOT / dep).rglob("*.py")} if (ROOT / dep).is_dir() else {dep}
        unused = sorted(held - files)
        if unused:
            out.append(f"stage {name}: declares dep {dep} but does not import {', '.join(unused)}")
    return out


def _argument_problems(name: str, stage: dict) -> list[str]:
    declared = _paths(stage.get("deps", []))
    declared += _paths(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []))
    args = re.findall(r"--[\w-]+ (\S+/\S+)", stage["cmd"])
    return [
        f"stage {name}: command reads {a} but does not declare it in deps or outs"
        for a in args
        if not any(_under(a, d) for d in declared)
    ]


def _data_problems(name: str, stage: dict, files: set[str]) -> list[str]:
    """A stage that can open dataset images or masks (through the index's paths) depends on the dataset."""
    makes_it = DATASET in _paths(stage.get("outs", []))
    if READER in files and DATASET not in stage.get("deps", []) and not makes_it:
        return [f"stage {name}: reads dataset files through {READER} but does not declare {DATASET}"]
    return []


def problems(stages: dict[str, dict]) -> list[str]:
    """One line per missing or unused code dep / params section / path argument, naming the stage."""
    out = []
    for name, stage in stages.items():
        if not stage_module(stage["cmd"]):
            continue
        files, read = derived(stage)
        out += _code_problems(name, stage, files) + _argument_problems(name, stage)
        out += _data_problems(name, stage, files)
        declared = _declared_params(stage)
        out += [
            f"stage {name}: reads params section '{s}' but does not declare it"
            for s in sorted(read - declared)
        ]
        out += [
            f"stage {name}: declares params section '{s}' but never reads it" for s in sorted(declared - read)
        ]
    return out


def test_every_stage_declares_exactly_the_code_and_params_it_uses():
    found = problems(load_stages())
    assert not found, "dvc.yaml is out of date:\n" + "\n".join(found)


def test_check_names_a_removed_dep():
    stages = load_stages()
    evaluate = stages["evaluate"]
    dropped = next(d for d in evaluate["deps"] if d.startswith("fscs/") and d.endswith(".py"))
    evaluate["deps"] = [d for d in evaluate["deps"] if d != dropped]
    evaluate["params"] = [p for p in evaluate["params"] if p != "evaluate"]
    found = problems(stages)
    assert f"stage evaluate: imports {dropped} but does not declare it in deps" in found
    assert "stage evaluate: reads params section 'evaluate' but does not declare it" in found


def test_check_names_a_removed_kernel_source():
    """The C++ kernel is read by fscs/learn/model/fused_attention.py, never imported: it still counts
    as code."""
    stages = load_stages()
    source = "fscs/learn/model/tiny_attention.cpp"
    deps = stages["train"]["deps"]
    folder = next(d for d in deps if _under(source, d))  # a folder dep holding it: declare its other files
    deps.remove(folder)
    deps += [_rel(p) for p in (ROOT / folder).rglob("*") if p.is_file() and _rel(p) != source]
    assert (
        "stage train: imports fscs/learn/model/tiny_attention.cpp but does not declare it in deps"
        in problems(stages)
    )


def test_check_names_an_undeclared_dataset():
    """Stages read images and masks by the index's paths: the index can stay the same while they change."""
    stages = load_stages()
    stages["baselines"]["deps"].remove("${dataset.root}")
    found = problems(stages)
    assert f"stage baselines: reads dataset files through {READER} but does not declare {DATASET}" in found


def test_scan_follows_function_level_and_relative_imports():
    files = {_rel(f) for f in closure("stages.evaluate")}
    assert {"stages/__init__.py", "stages/_common.py", "fscs/__init__.py", "fscs/learn/targets.py"} <= files
    assert "fscs/learn/model/cst.py" in files and "fscs/learn/model/__init__.py" in files


if __name__ == "__main__":
    for stage_name, stage_def in load_stages().items():
        if stage_module(stage_def["cmd"]):
            code_files, sections_read = derived(stage_def)
            print(f"{stage_name}:\n  params: {sorted(sections_read)}")
            print("".join(f"  - {f}\n" for f in sorted(code_files)), end="", file=sys.stdout)
