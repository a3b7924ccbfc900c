"""The package layout's rules, checked on the source: stages never import stages, the runtime and the
serving layer never reach into the pipeline, and no module grows past one screenful of concerns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trail_probe"
STAGES = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "pipeline"}
ENTRY = {"trail_probe.cli", "trail_probe.stages.pipeline"}  # they run stages by name (importlib), never import them
# A part may import only itself and the parts listed for it (besides the leaf modules errors and choices).
ALLOWED = {
    "runtime": {"runtime"},
    "serving": {"serving", "runtime"},
    "offline": {"offline", "runtime", "serving", "config", "atomic", "paths"},
    "stages": {"stages", "offline", "runtime", "serving", "config", "atomic", "paths"},
}
LEAVES = {"errors", "choices", "atomic", "progress", "__init__", "__version__"}
MAX_LINES = 450


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
    if name in ENTRY:
        return
    own = name.rsplit(".", 1)[-1]
    stages = {m for m in imported(path) if m.startswith("trail_probe.stages.") and m.split(".")[2] in STAGES}
    assert not {m for m in stages if m.split(".")[2] != own}, f"{name} imports stage modules {sorted(stages)}"


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_each_part_imports_only_the_parts_below_it(name, path):
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in ALLOWED:
        return
    allowed = ALLOWED[parts[1]] | LEAVES
    reached = {m.split(".")[1] for m in imported(path) if m.count(".") >= 1}
    # `from trail_probe.runtime import X` names runtime.X too; only the part (second component) matters
    assert reached <= allowed, f"{name} ({parts[1]}) imports {sorted(reached - allowed)}"


@pytest.mark.parametrize("name, path", modules(), ids=[m for m, _ in modules()])
def test_modules_stay_small(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it along a concept"


def test_every_stage_is_a_command():
    from trail_probe.stages import COMMANDS

    assert {module.rsplit(".", 1)[1] for module, _, _ in COMMANDS.values()} == STAGES | {"pipeline"}
