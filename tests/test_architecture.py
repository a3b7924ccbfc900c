"""The package layout's rules, checked on the source of every module (top-level ones and the entry
points included): stages never import stages, each part imports only what `ALLOWED` lists for it (the
runtime and the serving layer never reach into the pipeline), no module grows past one screenful of
concerns and no function past what a reader can hold (80 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trail_probe"
STAGES = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "pipeline"}
# What each part may import besides itself, bottom to top. Every module of the package is checked,
# the top-level ones and the entry points (cli, stages.pipeline) included; a new top-level module
# needs a line here. `__version__` is `from trail_probe import __version__`.
SHARED = {"errors", "choices", "atomic", "progress", "__version__"}  # what every part above the leaves may use
ALLOWED = {
    # leaves: nothing of the package, or only the error type a bad value raises
    "errors": set(), "atomic": set(), "paths": set(), "progress": set(),
    "choices": {"errors"}, "recipe_files": {"errors"},
    "model_files": {"errors", "atomic"},  # a GGUF's plain copy is written atomically
    # the three parts
    "runtime": {"runtime", "model_files"} | SHARED,  # the serving model's weight hash is checked on load
    "serving": {"serving", "runtime", "model_files"} | SHARED,
    "offline": {"offline", "runtime", "serving", "model_files", "config", "paths"} | SHARED,
    "stages": {"stages", "offline", "runtime", "serving", "model_files", "config", "paths"} | SHARED,
    # the recipe: its files, its paths, and the value checks that runtime and serving own
    # (refine.interval, refine.preemption_c, refine.aging), so each rule stays with the code it guards
    "config": {"errors", "choices", "atomic", "paths", "recipe_files", "runtime", "serving"},
    # the command line: the recipe, and the table of commands (stages are run by name, never imported)
    "cli": {"config", "errors", "stages"},
}
MAX_LINES = 450
MAX_FUNCTION_LINES = 80


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def imported(path: Path) -> set[str]:
    """Every trail_probe module an import statement in `path` names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trail_probe"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("trail_probe"))
    return names


def test_the_checker_sees_stage_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trail_probe.stages.train import train\n    from trail_probe.stages import evaluate\n")
    assert {"trail_probe.stages.train", "trail_probe.stages.evaluate"} <= imported(bad)


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_no_module_imports_a_stage(name, path):
    own = name.rsplit(".", 1)[-1]
    stages = {m for m in imported(path) if m.startswith("trail_probe.stages.") and m.split(".")[2] in STAGES}
    assert not {m for m in stages if m.split(".")[2] != own}, f"{name} imports stage modules {sorted(stages)}"


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_each_part_imports_only_the_parts_below_it(name, path):
    parts = name.split(".")
    part = parts[1] if len(parts) > 1 else "__init__"
    if part == "__init__":  # the package itself holds only __version__
        assert not imported(path), f"{name} imports {sorted(imported(path))}"
        return
    assert part in ALLOWED, f"{name}: a new top-level module; write what it may import into ALLOWED"
    reached = {m.split(".")[1] for m in imported(path) if m.count(".") >= 1} - {part}
    # `from trail_probe.runtime import X` names runtime.X too; only the part (second component) matters
    assert reached <= ALLOWED[part], f"{name} ({part}) imports {sorted(reached - ALLOWED[part])}"


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_modules_stay_small(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it along a concept"


def long_functions(path: Path) -> list[str]:
    """'name (lines)' of every function or method in `path` longer than MAX_FUNCTION_LINES, from its
    `def` line to its last line (nested functions count inside the one that holds them, and alone)."""
    return [f"{node.name} ({node.end_lineno - node.lineno + 1})" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_the_function_checker_counts_every_line(tmp_path):
    long = tmp_path / "long.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))  # with its def: 80 lines
    method = body.replace("\n", "\n    ")
    long.write_text(f"def fits():\n{body}\n\n\nclass C:\n    def too_long(self):\n    {method}\n        return 0\n")
    assert long_functions(long) == [f"too_long ({MAX_FUNCTION_LINES + 1})"]


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_functions_stay_short(name, path):
    assert not long_functions(path), f"{name}: {', '.join(long_functions(path))} lines; split along what they do"


def test_every_stage_is_a_command():
    from trail_probe.stages import COMMANDS

    assert {module.rsplit(".", 1)[1] for module, _, _ in COMMANDS.values()} == STAGES | {"pipeline"}
