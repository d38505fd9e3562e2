"""Package layers: a lower layer never imports a higher one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "multiteach"
# modules that turn a recipe into objects, run or publish it: above the teachers
ABOVE_TEACHERS = ("build", "train", "engine", "cli", "sweep", "demo", "publish", "cache", "eval")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (``from multiteach import build`` counts as ``multiteach.build``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_teacher_module_imports_a_higher_layer():
    higher = {f"multiteach.{name}" for name in ABOVE_TEACHERS}
    bad = {
        f"{path.name}: {module}"
        for path in sorted((PACKAGE / "teachers").glob("*.py"))
        for module in imported_modules(path)
        if module in higher or any(module.startswith(f"{h}.") for h in higher)
    }
    assert not bad, sorted(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from multiteach.build import spec_overrides\nfrom multiteach import train\n")
    assert {"multiteach.build", "multiteach.train"} <= imported_modules(bad)
