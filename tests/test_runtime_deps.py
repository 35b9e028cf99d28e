"""The worker path needs only the runtime dependencies: no torch, no pandas.

The dev extras install both, so the rest of the suite cannot notice when a runtime module
starts to need them; a fresh `pip install .` would. This runs extract -> fit -> build ->
query in a subprocess where importing torch or pandas fails, from a working directory that
holds its own model/, pipelines/ and schemas.py.
"""

import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import rgb
from tests.test_packaging import make_decoys

BLOCK_AND_RUN = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "pandas"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not a runtime dependency)")

sys.meta_path.insert(0, Blocked())
from delf_index.pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*args, cwd):
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_AND_RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_extract_fit_build_query_without_torch_or_pandas(tmp_path, photos):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        array = np.ascontiguousarray(rgb(photos[name])[::2, ::2])
        for variant, image in (("", array), ("-mirror", np.ascontiguousarray(array[:, ::-1]))):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "JPEG", quality=92)
            (images / f"{name}{variant}.jpg").write_bytes(buf.getvalue())
    repo = tmp_path / "project"  # a user's project, with folders named like delf-index's layers
    make_decoys(repo)
    work = tmp_path / "work"
    cli("extract", "--input", str(images), "--output", str(work / "features"), "--workers", "1", cwd=repo)
    cli("fit", "--features", str(work / "features"), "--output", str(work / "cb"), "--workers", "1", cwd=repo)
    cli(
        "build",
        *("--features", str(work / "features"), "--codebooks", str(work / "cb"), "--output", str(work / "index")),
        *("--workers", "1"),
        cwd=repo,
    )
    out = cli("query", "--index", str(work / "index"), str(images / "coffee-mirror.jpg"), "--json", cwd=repo)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["results"][0]["image_id"] == "coffee-mirror.jpg"
