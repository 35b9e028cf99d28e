"""The package's layers point one way (import-linter's contracts), and nothing is imported
lazily or for a side effect without a reason (docs/architecture.md)."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the folders that install as delf_index.<folder>; delf_index/ holds the public API and the error base
FOLDERS = ("schemas", "runtime", "indexing", "model", "pipelines")
# imports allowed inside functions, each with a comment saying why: heavy optional dependencies,
# and Beam where a module that commands without a Beam job import (cli.py) needs it for jobs
LAZY_OK = ("torch", "torchvision", "onnxscript", "skimage", "delf_index.model", "apache_beam")


def package_modules():
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield folder, path
    yield "errors", ROOT / "delf_index" / "errors.py"
    yield "api", ROOT / "delf_index" / "__init__.py"
    yield "pipelines", ROOT / "delf_index" / "__main__.py"


def imported_modules(node):
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        assert node.level == 0, "relative imports: use delf_index.<layer> names"
        return [node.module]
    return []


def function_level_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def test_the_import_contracts_hold(tmp_path):
    """import-linter's contracts (.importlinter): the layers point one way, and what workers
    and the query module run needs neither Beam nor torch. The folders install as
    delf_index.<folder> through setup.py's package_dir, which import-linter cannot follow, so
    it reads a tree of links laid out as the installed package."""
    package = tmp_path / "delf_index"
    package.mkdir()
    for path in (ROOT / "delf_index").glob("*.py"):
        (package / path.name).symlink_to(path)
    for folder in FOLDERS:
        (package / folder).symlink_to(ROOT / folder)
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    result = subprocess.run(
        [lint, "--config", str(ROOT / ".importlinter"), "--no-cache"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in result.stdout


def test_no_bare_imports_and_lazy_imports_only_with_a_reason():
    """Imports name delf_index.<layer>, never a bare folder; an import inside a function is a
    heavy dependency that only some commands need, with a comment saying why."""
    for _, path in package_modules():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            for module in imported_modules(node):
                assert module.split(".")[0] not in FOLDERS, f"{path.name}:{node.lineno}: bare import of {module}"
        for node in function_level_imports(tree):
            for module in imported_modules(node):
                assert module.startswith(LAZY_OK), f"{path.name}:{node.lineno}: {module} imported inside a function"
                context = lines[node.lineno - 1] + lines[node.lineno - 2]
                assert "#" in context, f"{path.name}:{node.lineno}: say in a comment why {module} is imported lazily"


def test_nothing_is_imported_for_a_side_effect():
    for _, path in package_modules():
        text = path.read_text()
        assert "noqa: F401" not in text, f"{path.name} imports something it does not use"
        tree = ast.parse(text)
        for node in tree.body:  # statements run on import: no environment changes
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            source = ast.get_source_segment(text, node) or ""
            assert "os.environ" not in source, f"{path.name}:{node.lineno} changes the environment on import"


LONG = 80  # lines of a function, from its `def` to its last line, that fit a screen
LONG_REASON = "over 80 lines because"  # what the docstring of a longer one says, with the reason


def long_functions():
    """(where, lines, docstring) of the package's functions and methods over LONG lines."""
    for _, path in package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONG:
                    yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", lines, ast.get_docstring(node) or ""


def test_functions_fit_a_screen():
    """At most three functions over 80 lines in the package, each saying why in its docstring
    ("over 80 lines because ..."); tests and benchmarks apart."""
    found = list(long_functions())
    assert len(found) <= 3, f"more than three functions over {LONG} lines: {[(w, n) for w, n, _ in found]}"
    for where, lines, doc in found:
        assert LONG_REASON in " ".join(doc.split()), f"{where} has {lines} lines: split it, or say why ({LONG_REASON})"


def test_one_resolve_conf():
    """A conf is resolved by one function (runtime/conf.py), in every module that takes one."""
    defined = [path.name for _, path in package_modules() if "def resolve_conf(" in path.read_text()]
    assert defined == ["conf.py"]
