"""The code's shape, read from its imports (every one: top-level, inside functions, and module
names in strings such as Ray's setup hook; `if TYPE_CHECKING:` blocks aside, since they never run):

- the layers of `pipeline/` import only downward (README, "Code map");
- every DVC stage lists, as its deps, every file of ours its command imports, transitively, so
  that editing one reruns the stage."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# Each part of the package and the parts it may import (itself always). `commands` are the
# user's `python -m pipeline.<command>` modules at the package's top.
MAY_IMPORT = {
    "config": set(),
    "data": {"config"},
    "losses": {"config", "data"},
    "models": {"config", "data", "losses"},
    "runtime": {"config", "data"},
    "train": {"config", "data", "losses", "models", "runtime"},
    "infer": {"config", "data", "models", "runtime"},
    "orchestrate": {"config", "data", "losses", "models", "runtime", "train", "infer"},
    "commands": {"config", "data", "losses", "models", "runtime", "train", "infer", "orchestrate"},
    "tools": {"config", "data", "losses", "models", "runtime", "train", "infer", "orchestrate", "commands"},
}
MODULE_STRING = re.compile(r"^pipeline(\.\w+)+$")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """Our file that `import module` runs (a package's `__init__.py`), or None if not ours."""
    base = root / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The `pipeline...` modules a file imports anywhere in it (and names in strings)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline.data import augment`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            found.add(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    ours = set()
    for module in found:
        if not module.startswith("pipeline"):
            continue
        # A module, or an attribute of one (`pipeline.runtime.ray_logging.quiet_worker_logs`).
        while module and module_file(module, root) is None:
            module = module.rpartition(".")[0]
        if module:
            parts = module.split(".")
            # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            ours.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return ours


def files_reached(start: Path) -> set[Path]:
    """Our files that running `start` imports, transitively."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [module_file(m) for m in imported_modules(path)]
    return seen


def part_of(path: Path, root: Path = ROOT) -> str:
    """Which part of the package a file belongs to (the keys of MAY_IMPORT)."""
    relative = path.relative_to(root / "pipeline").parts
    if len(relative) == 1:
        return "losses" if relative[0] == "losses.py" else "commands"
    return relative[0]


def upward_imports(root: Path = ROOT) -> list[str]:
    wrong = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        part = part_of(path, root)
        for module in sorted(imported_modules(path, root)):
            target = module_file(module, root)
            if target.name == "__init__.py":
                continue  # a package's docstring (test_packages_hold_only_their_docstring)
            other = part_of(target, root)
            if other != part and other not in MAY_IMPORT[part]:
                wrong.append(f"{path.relative_to(root)} ({part}) imports {module} ({other})")
    return wrong


def test_every_part_of_the_package_is_placed_in_the_layers():
    parts = {part_of(path) for path in (ROOT / "pipeline").rglob("*.py") if path.parent != ROOT / "pipeline"}
    assert parts <= set(MAY_IMPORT), parts - set(MAY_IMPORT)


def test_the_layers_import_only_downward():
    wrong = upward_imports()
    assert not wrong, "imports against the layering (README, Code map):\n" + "\n".join(wrong)


def test_nothing_in_the_product_imports_the_tools():
    users = [p for p in ROOT.joinpath("pipeline").rglob("*.py") if part_of(p) != "tools"]
    for path in users:
        assert not any(m.startswith("pipeline.tools") for m in imported_modules(path)), path


def test_packages_hold_only_their_docstring():
    for init in (ROOT / "pipeline").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0].value, ast.Constant), f"{init}: a docstring only"


def test_a_forbidden_import_is_caught(tmp_path):
    """The guard itself: a lazy import from `models` up into `train` is reported."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    assert upward_imports(tmp_path) == []
    (tmp_path / "pipeline" / "models" / "transunet.py").open("a").write(
        "\n\ndef probe():\n    from pipeline.train.loop import unwrap\n")
    assert upward_imports(tmp_path) == ["pipeline/models/transunet.py (models) imports pipeline.train.loop (train)"]


def dvc_stages() -> list[tuple[str, str, Path, list[str]]]:
    """(dvc.yaml, stage, the Python file its command runs, its deps) for every stage of the
    project's DVC files that runs Python."""
    found = []
    for dvc_file in (ROOT / "dvc.yaml", ROOT / "study" / "dvc.yaml", ROOT / "encoders" / "dvc.yaml"):
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            stage = stage.get("do", stage)  # a foreach stage's template
            command, deps = stage["cmd"], stage.get("deps", [])
            command = command if isinstance(command, str) else " ".join(command)
            script = re.search(r"python (?:-m (\S+)|(\S+\.py))", command)
            if script:
                start = module_file(script[1]) if script[1] else ROOT / script[2]
                found.append((dvc_file.relative_to(ROOT).as_posix(), name, start, deps))
    return found


def uncovered(start: Path, deps: list[str]) -> list[str]:
    """Our files `start` imports that no dep (a file or a folder) covers."""
    covered = [ROOT / dep for dep in deps if "${" not in dep]
    return sorted(path.relative_to(ROOT).as_posix() for path in files_reached(start)
                  if not any(path == dep or dep in path.parents for dep in covered))


def test_dvc_stages_are_found():
    names = {(file, stage) for file, stage, _, _ in dvc_stages()}
    assert {("dvc.yaml", "teacher_finetune"), ("dvc.yaml", "student_train"),
            ("study/dvc.yaml", "report"), ("encoders/dvc.yaml", "standin_encoder")} <= names, names


@pytest.mark.parametrize("dvc_file,stage,start,deps", dvc_stages(), ids=[f"{f}:{s}" for f, s, _, _ in dvc_stages()])
def test_a_stages_deps_cover_every_file_its_command_imports(dvc_file, stage, start, deps):
    missing = uncovered(start, deps)
    assert not missing, f"{dvc_file}: stage {stage} imports files its deps do not list: {missing}"


def test_a_dropped_dep_is_caught():
    """The guard itself: the teacher stage without `pipeline/models` is reported with the files of
    it that it imports (`denoising.py` through its recipe, which the hand-kept lists once missed),
    and with the whole `pipeline` folder as a dep nothing is."""
    start = ROOT / "stages" / "teacher_finetune.py"
    _, _, _, deps = next(s for s in dvc_stages() if s[1] == "teacher_finetune")
    missing = uncovered(start, [d for d in deps if d != "pipeline/models"])
    assert "pipeline/models/denoising.py" in missing and all(m.startswith("pipeline/models/") for m in missing)
    assert uncovered(start, ["stages", "pipeline"]) == []


# Test files that test no one module: the entry points, this file, the cloud launcher configs, and
# the end-to-end runs.
CROSS_CUTTING_TESTS = {"cli", "layout", "cluster_configs", "cluster_e2e", "pipeline_e2e", "pipeline_copy_e2e"}


def test_tests_mirror_the_modules():
    """`tests/test_<module>.py` tests the module of that name (`test_<module>_<aspect>.py` one
    aspect of it): module names are unique across the package, so the flat name is enough."""
    modules = [p.stem for p in (ROOT / "pipeline").rglob("*.py") if p.stem != "__init__"]
    assert len(modules) == len(set(modules)), sorted(m for m in modules if modules.count(m) > 1)
    for test in (ROOT / "tests").glob("test_*.py"):
        name = test.stem.removeprefix("test_")
        assert name in CROSS_CUTTING_TESTS or any(name == m or name.startswith(f"{m}_") for m in modules), \
            f"{test.name} names no module of pipeline/"
