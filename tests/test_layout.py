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


# ---- data/ as floors -----------------------------------------------------------------------------

DATA = PACKAGE / "data"
# Each unit of multiteach/data (a sub-package, or a top-level module) and its floor, lowest first. A unit imports
# only from units on lower floors, and from itself; units on one floor never import each other.
DATA_FLOORS = {
    "views": 1,  # augmentations, multi-crop, iBOT masks, perturbations: no files
    "wsi": 1,  # reading slides: open, read region, µm/px, levels, tissue mask, pool of open slides
    "lists": 2,  # tile and slide lists
    "index": 3,  # the tissue index
    "sources": 4,  # the training sources (datasets)
    "tiling": 4,  # offline tiling (`multiteach tile`)
    "online": 5,  # online patching on top of the index and the sources
    "loader": 5,
    "check": 5,
}
MAX_MODULE_LINES = 500


def data_unit(module: str) -> str | None:
    """``multiteach.data.X[.Y]`` -> ``X`` (``""`` for the ``multiteach.data`` package itself); None outside data."""
    if module == "multiteach.data":
        return ""
    if module.startswith("multiteach.data."):
        return module.split(".")[2]
    return None


def upward_data_imports(path: Path, unit: str) -> set[str]:
    """The imports of ``path`` (in data unit ``unit``) that reach a unit on the same or a higher floor."""
    floor = DATA_FLOORS[unit]
    bad = set()
    for module in imported_modules(path):
        target = data_unit(module)
        if target is None or target == unit or (target in DATA_FLOORS and DATA_FLOORS[target] < floor):
            continue
        if target not in DATA_FLOORS and target != "":
            continue  # ``from multiteach.data.views import augment`` also records ``...views.augment``: same unit
        bad.add(module)
    return bad


def test_every_data_unit_has_a_floor():
    units = {p.stem if p.is_file() else p.name for p in DATA.iterdir() if not p.name.startswith(("_", "."))}
    units.discard("__pycache__")
    assert units == set(DATA_FLOORS), f"place these on a floor in DATA_FLOORS: {sorted(units ^ set(DATA_FLOORS))}"


def test_no_data_module_imports_up_a_floor():
    bad = []
    for unit in DATA_FLOORS:
        paths = sorted((DATA / unit).rglob("*.py")) if (DATA / unit).is_dir() else [DATA / f"{unit}.py"]
        bad += [f"{p.relative_to(PACKAGE)}: {m}" for p in paths for m in upward_data_imports(p, unit)]
    assert not bad, sorted(bad)


def test_the_floor_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from multiteach.data.sources.base import SourceTile\n"  # wsi (1) -> sources (4)
        "from multiteach.data import TileDataset\n"  # the package re-exports every floor
        "from multiteach.data.views.augment import hed_jitter\n"  # same floor, other unit
        "from multiteach.data.wsi.slide import open_slide\n"  # own unit: allowed
    )
    assert upward_data_imports(bad, "wsi") == {
        "multiteach.data.sources.base",
        "multiteach.data.sources.base.SourceTile",
        "multiteach.data",
        "multiteach.data.views.augment",
        "multiteach.data.views.augment.hed_jitter",
    }
    assert upward_data_imports(bad, "online") == {"multiteach.data"}


# ---- imports at the top, modules of a readable size -----------------------------------------------


def function_level_imports(path: Path) -> list[str]:
    """``line: module`` of every ``multiteach`` import inside a function body of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                names = [inner.module]
            else:
                continue
            found += [f"{inner.lineno}: {n}" for n in names if n == "multiteach" or n.startswith("multiteach.")]
    return sorted(set(found))


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_function_level_multiteach_import_outside_the_cli():
    # the CLI keeps its imports lazy so that `multiteach --help` stays fast; everything else imports at the top
    bad = [
        f"{p.relative_to(PACKAGE)}:{hit}"
        for p in package_modules()
        if "cli" not in p.relative_to(PACKAGE).parts[:1] and p.stem != "cli"
        for hit in function_level_imports(p)
    ]
    assert not bad, bad


def test_the_import_check_sees_a_function_level_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    import multiteach\n    from multiteach.data import loader\n")
    assert function_level_imports(bad) == ["4: multiteach", "5: multiteach.data"]


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in package_modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these along their concerns (at most {MAX_MODULE_LINES} lines): {long}"


def test_the_training_loop_reads_in_one_screen():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_train")
    assert loop.end_lineno - loop.lineno + 1 <= 120, "keep _train's set-up, step, log, checkpoint and stop in view"
