"""The `delf-index` command: subcommands, summaries, clear errors instead of tracebacks."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from pipelines.cli import main
from pipelines.extractor import Features


def delf_index(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True)


def test_usage_lists_the_commands():
    out = delf_index("--help")
    assert out.returncode == 0
    for command in ("export-model", "extract-image"):
        assert command in out.stdout
    assert delf_index("no-such-command").returncode == 2


def test_extract_image_summary_and_output(tmp_path, photos, capsys):
    Image.fromarray(photos["coffee"]).save(tmp_path / "coffee.png")
    assert main(["extract-image", str(tmp_path / "coffee.png"), "--output", str(tmp_path / "f.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_features"] == 1000 and info["width"] == photos["coffee"].shape[1]
    assert sum(info["features_per_scale"].values()) == 1000
    assert info["attention_min"] <= info["attention_max"]
    saved = Features.load(tmp_path / "f.npz")
    assert len(saved) == 1000 and np.isfinite(saved.descriptors).all()
    assert main(["extract-image", str(tmp_path / "coffee.png"), "--max-features", "10", "--scales", "1"]) == 0
    assert "10 features" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path):
    (tmp_path / "bad.jpg").write_text("<html>not an image</html>")
    out = delf_index("extract-image", str(tmp_path / "bad.jpg"))
    assert out.returncode == 1
    assert "cannot decode" in out.stderr and "Traceback" not in out.stderr
    out = delf_index("extract-image", str(tmp_path / "missing.jpg"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    out = delf_index("extract-image", str(tmp_path / "bad.jpg"), "--model", str(tmp_path / "bad.jpg"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
