"""What each pipeline stage's command can read: its code (the import closure within kdrepro) and its configs.

One definition for two consumers: ``dvc.yaml``'s ``deps`` (a test checks that every stage lists all of it and
nothing that its command cannot read) and the cost fingerprint of ``kdrepro calibrate`` (a method is re-measured when
any code its training step can run changes). ``python -m kdrepro.pipeline.deps <stage or command>`` prints a stage's deps in the
compact form ``dvc.yaml`` uses: a folder when the command can read every module in it, single files otherwise;
``python -m kdrepro.pipeline.deps --update`` rewrites the code deps of ``dvc.yaml`` after an import changed.

The closure is static: every ``import kdrepro...`` / ``from kdrepro... import`` anywhere in a module (also inside
functions: a lazily imported module can still run), each module's parent packages, and every submodule of a package
whose ``__init__`` imports its submodules dynamically (``pkgutil.iter_modules``, as :mod:`kdrepro.distill` does).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parent

#: The modules each ``kdrepro <command>`` that a dvc.yaml stage runs starts from (its handler in kdrepro/cli.py). Every
#: command also runs the CLI, the params glue and the config loader. The CLI dispatches lazily: its function-level
#: imports belong to one command's handler each, which ``ENTRIES`` names, so only its module-level imports are followed.
#: Which stage runs which command is read from dvc.yaml itself (:func:`stage_commands`).
COMMON = ("kdrepro.cli", "kdrepro.pipeline.params", "kdrepro.config", "kdrepro.errors")
DISPATCHERS = ("kdrepro.cli",)
ENTRIES: dict[str, tuple[str, ...]] = {
    "prepare": ("kdrepro.data",),
    "hardware": ("kdrepro.train.hardware",),
    "pretrain": ("kdrepro.train.pretrain",),
    "teacher": ("kdrepro.train.teacher",),
    "train": ("kdrepro.train.seeds", "kdrepro.train.run"),
    "calibrate": ("kdrepro.train.calibrate", "kdrepro.train.hardware"),
    "select": ("kdrepro.analysis.commands",),
    "results": ("kdrepro.analysis.commands",),
    "report-index": ("kdrepro.report.index",),
}
#: A stage whose command runs ``notebooks/<item>.ipynb`` (the report pages) depends on the code its notebooks import.
NOTEBOOK_COMMAND = re.compile(r"\bnotebooks/\$\{item\}\.ipynb\b")


@functools.cache
def stage_commands(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, str]:
    """dvc.yaml stage -> the ``kdrepro <command>`` of :data:`ENTRIES` its ``cmd`` runs (stages that run none, such as
    the report pages, are left out)."""
    import yaml

    commands = {}
    for name, stage in (yaml.safe_load(Path(dvc_yaml).read_text()).get("stages") or {}).items():
        match = re.search(r"(?:^|\s)kdrepro ([\w-]+)", " ".join(str(stage.get("do", stage).get("cmd", "")).split()))
        if match and match.group(1) in ENTRIES:
            commands[name] = match.group(1)
    return commands


def stage_code_files(dvc_yaml: Path, stage: str) -> tuple[Path, ...] | None:
    """Every kdrepro source file a dvc.yaml stage can run: its command's :func:`code_files`, or the union of its
    notebooks' :func:`notebook_code_files`; None for a stage that runs no kdrepro code."""
    import yaml

    if stage in stage_commands(dvc_yaml):
        return code_files(stage_commands(dvc_yaml)[stage])
    body = yaml.safe_load(Path(dvc_yaml).read_text())["stages"].get(stage) or {}
    if not NOTEBOOK_COMMAND.search(str(body.get("do", body).get("cmd", ""))) or not isinstance(body.get("foreach"), list):
        return None
    notebooks = ROOT / "notebooks"
    return tuple(sorted({f for item in body["foreach"] for f in notebook_code_files(notebooks / f"{item}.ipynb")}))


def _module_path(name: str) -> Path | None:
    relative = Path(*name.split("."))
    for candidate in (ROOT / relative / "__init__.py", ROOT / relative.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """kdrepro modules a source file imports anywhere (absolute and relative imports); only its module-level
    statements with ``top_level_only``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             for n in ast.walk(top)] if top_level_only else ast.walk(tree)  # fmt: skip
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from kdrepro import distill`
    if path.name == "__init__.py" and "iter_modules(__path__)" in path.read_text():  # not this module's own text
        found |= {_module_name(child) for child in path.parent.glob("*.py") if child.name != "__init__.py"}
    return {name for name in found if name == "kdrepro" or name.startswith("kdrepro.")}


def module_graph() -> dict[str, set[str]]:
    """Every kdrepro module -> the kdrepro modules it imports by name, anywhere in its source (function-level
    imports included). ``from package import submodule`` is an import of the submodule only, and a package's
    ``__init__`` counts as the package's own module. The import graph ``tests/test_architecture.py`` checks for
    circles and upward imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {_module_name(path) for path in paths}
    graph = {}
    for path in paths:
        own = _module_name(path)
        targets = set()
        for base, aliases in _import_statements(path):
            submodules = {f"{base}.{alias}" for alias in aliases if f"{base}.{alias}" in names}
            targets |= submodules if aliases and len(submodules) == len(aliases) else {base, *submodules}
        if path.name == "__init__.py" and "iter_modules(__path__)" in path.read_text():
            targets |= {_module_name(child) for child in path.parent.glob("*.py") if child.name != "__init__.py"}
        graph[own] = {name for name in targets if name in names and name != own}
    return graph


def _import_statements(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import statement in a source file (``import a.b`` is ``("a.b", [])``)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names]))
    return found


def closure(entries: Iterable[str]) -> set[Path]:
    """Source files of the modules reachable from ``entries`` (and their parent packages)."""
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = _module_path(".".join(parts[:depth]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imports(path, top_level_only=_module_name(path) in DISPATCHERS))
    return seen


@functools.cache
def code_files(stage: str) -> tuple[Path, ...]:
    """Every kdrepro source file the ``stage``'s command can run, sorted (paths relative to the repository)."""
    if stage not in ENTRIES:
        raise KeyError(f"unknown stage {stage!r}; one of {sorted(ENTRIES)}")
    return tuple(sorted(path.relative_to(ROOT) for path in closure([*COMMON, *ENTRIES[stage]])))


def notebook_modules(notebook: Path) -> set[str]:
    """kdrepro modules a notebook's code cells import (a report stage runs them through papermill)."""
    import json

    cells = json.loads(Path(notebook).read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c.get("cell_type") == "code")
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in found if name.startswith("kdrepro")}


def notebook_code_files(notebook: Path) -> tuple[Path, ...]:
    """Every kdrepro source file a report notebook can run."""
    return tuple(sorted(path.relative_to(ROOT) for path in closure(notebook_modules(notebook))))


def config_files(overrides: Iterable[str]) -> set[Path]:
    """The packaged config files a command with these overrides composes (``train.yaml`` and one file per chosen
    option of each group), relative to the repository."""
    from hydra import compose, initialize_config_dir

    conf = PACKAGE / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    files = {conf / "train.yaml"}
    for group, choice in cfg.hydra.runtime.choices.items():
        path = conf / group.split("@")[0] / f"{choice}.yaml"
        if choice is not None and path.is_file():
            files.add(path)
    return {path.relative_to(ROOT) for path in files}


def compact(files: Iterable[Path]) -> list[str]:
    """Files folded into their folder wherever every ``*.py`` of the folder (recursively) is among them."""
    files = {Path(f) for f in files}
    folders = sorted({parent for f in files for parent in f.parents if parent != Path(".")}, key=lambda p: len(p.parts))
    chosen: list[Path] = []
    for folder in folders:
        if any(folder.is_relative_to(c) for c in chosen) or folder == Path("kdrepro"):
            continue
        if all(f.relative_to(ROOT) in files for f in (ROOT / folder).rglob("*.py")):
            chosen.append(folder)
    singles = [f for f in files if not any(f.is_relative_to(c) for c in chosen)]
    return sorted([c.as_posix() for c in chosen] + [f.as_posix() for f in singles])


def code_digest(stage: str) -> bytes:
    """sha256 over the sources of :func:`code_files` (names and bytes)."""
    digest = hashlib.sha256()
    for relative in code_files(stage):
        digest.update(relative.as_posix().encode())
        digest.update((ROOT / relative).read_bytes())
    return digest.digest()


def update_dvc_yaml(path: Path) -> bool:
    """Rewrite the code deps (``- kdrepro/...`` lines outside ``kdrepro/conf``) of every stage of ``path`` that runs
    kdrepro code (:func:`stage_code_files`) to their :func:`compact` form, in place of the first such line (later
    ones are dropped); True when the file changed."""
    original = path.read_text()
    out: list[str] = []
    stage, written, files = None, False, None
    code_line = re.compile(r"^(\s+)- kdrepro/(?!conf/)")
    for line in original.splitlines(keepends=True):
        header = re.match(r"^  (\w+):", line)
        if header:
            stage, written = header.group(1), False
            files = stage_code_files(path, stage)
        match = code_line.match(line)
        if match and files is not None:
            if not written:
                out += [f"{match.group(1)}- {dep}\n" for dep in compact(files)]
                written = True
            continue
        out.append(line)
    text = "".join(out)
    if text != original:
        path.write_text(text)
    return text != original


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        target = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "dvc.yaml"
        print(f"{target}: {'updated' if update_dvc_yaml(target) else 'already up to date'}")
    else:
        dvc_yaml = ROOT / "dvc.yaml"
        for stage in sys.argv[1:] or sorted(stage_commands(dvc_yaml)):
            files = code_files(stage) if stage in ENTRIES else stage_code_files(dvc_yaml, stage)
            print(f"{stage}:")
            for dep in compact(files or ()):
                print(f"  - {dep}")
