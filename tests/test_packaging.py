"""delf-index installs as one import package, `delf_index`, and works whatever the working
directory holds: users' projects have their own model/ folders and schemas.py files."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from PIL import Image

from tests.conftest import rgb

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "README.md", "delf_index", "pipelines", "indexing", "runtime", "schemas", "model")

API = """
import json, sys
import numpy as np
import delf_index
from delf_index import Extractor, Features
features = Extractor().extract_image(sys.argv[1])
assert isinstance(features, Features) and len(features) == 1000
print(json.dumps({"file": delf_index.__file__, "num_features": len(features),
                  "decoys": sorted(m for m in sys.modules if m.split(".")[0] in ("model", "pipelines", "schemas"))}))
"""


def make_decoys(folder):
    """What a user's project may hold: folders and modules named like delf-index's layers,
    which fail loudly when imported."""
    for package in ("model", "pipelines", "indexing", "runtime"):
        (folder / package / "default").mkdir(parents=True)
        (folder / package / "__init__.py").write_text(f"raise RuntimeError('the decoy {package}/ was imported')\n")
    (folder / "schemas.py").write_text("raise RuntimeError('the decoy schemas.py was imported')\n")


def run(args, cwd, env=None):
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("project")
    make_decoys(folder)
    Image.fromarray(rgb(photos["coffee"])).save(folder / "coffee.png")
    return folder


def check_api_and_cli(project, env=None):
    api = json.loads(run([sys.executable, "-c", API, "coffee.png"], project, env).splitlines()[-1])
    assert api["num_features"] == 1000 and api["decoys"] == []
    summary = run([sys.executable, "-m", "delf_index", "extract-image", "coffee.png", "--json"], project, env)
    assert json.loads(summary.splitlines()[-1])["num_features"] == 1000
    usage = run([sys.executable, "-m", "delf_index", "--help"], project, env)
    assert "extract" in usage and "evaluate" in usage
    return api["file"]


def test_installed_package_ignores_the_working_directory(project):
    assert check_api_and_cli(project).startswith(str(ROOT))


def test_a_built_wheel_holds_delf_index_alone_and_works(project, tmp_path):
    source = tmp_path / "source"  # a clean copy: the build leaves build/ and egg-info behind
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."], source)
    (wheel,) = (source / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"delf_index"}
    assert "delf_index/model/default/delf-efficientnet_lite0.onnx" in names
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], tmp_path)
    installed = check_api_and_cli(project, env={**os.environ, "PYTHONPATH": str(target)})
    assert installed.startswith(str(target))
