"""The package's layers point one way, and nothing is imported lazily or for a side effect
without a reason (docs/architecture.md)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the folders that install as delf_index.<folder>; delf_index/ holds the public API and the error base
FOLDERS = ("schemas", "runtime", "indexing", "model", "pipelines")
# what each layer may import at module level
ALLOWED = {
    "errors": set(),
    "schemas": {"errors"},
    "runtime": {"errors", "schemas"},
    "indexing": {"errors", "schemas", "runtime"},
    "model": {"errors", "schemas", "runtime", "indexing"},  # training and export use the runtime
    "pipelines": {"errors", "schemas", "runtime", "indexing"},  # torch modules only lazily, below
    "api": {"errors", "schemas", "runtime", "indexing"},  # delf_index/__init__.py: no Beam, no torch
}
# imports allowed inside functions: heavy optional dependencies, each with a comment saying why
LAZY_OK = ("torch", "torchvision", "onnxscript", "skimage", "delf_index.model")


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


def layer_of(module):
    """The layer of a delf_index module name, or None for third-party modules."""
    parts = module.split(".")
    if parts[0] != "delf_index" or len(parts) == 1:
        return None
    return parts[1]


def function_level_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


@pytest.mark.parametrize("layer,path", list(package_modules()), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_layers_point_one_way(layer, path):
    tree = ast.parse(path.read_text())
    lazy = set(map(id, function_level_imports(tree)))
    for node in ast.walk(tree):
        for module in imported_modules(node):
            assert module.split(".")[0] not in FOLDERS, f"{path.name}:{node.lineno}: bare import of {module}"
            target = layer_of(module)
            if target is None or target == layer or id(node) in lazy:
                continue
            assert target in ALLOWED[layer], f"{path.name}:{node.lineno}: {layer} must not import {module}"


@pytest.mark.parametrize("layer,path", list(package_modules()), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_lazy_imports_are_heavy_optional_ones_with_a_reason(layer, path):
    lines = path.read_text().splitlines()
    for node in function_level_imports(ast.parse("\n".join(lines))):
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


def test_the_runtime_needs_neither_beam_nor_torch():
    for layer, path in package_modules():
        if layer not in ("schemas", "runtime", "indexing", "api", "errors"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            for module in imported_modules(node):
                assert not module.startswith(("apache_beam", "torch")), f"{path.name}:{node.lineno}: {module}"
