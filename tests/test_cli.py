"""The `delf-index` command: every subcommand, summaries, one-line messages for user errors
that name the problem, tracebacks for bugs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from delf_index.pipelines import cli
from delf_index.runtime.features import Features


def delf_index(*args):
    return subprocess.run([sys.executable, "-m", "delf_index", *args], capture_output=True, text=True)


def test_usage_lists_the_commands():
    out = delf_index("--help")
    assert out.returncode == 0
    assert [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")] == list(cli.COMMANDS)
    unknown = delf_index("no-such-command")
    assert unknown.returncode == 2 and "unknown command 'no-such-command'" in unknown.stderr


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_its_options(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: delf-index {command}")
    if command in ("extract", "fit", "build", "evaluate"):  # the Beam jobs: one meaning of --workers
        assert "--workers" in out and "one per two cores" in out


def test_extract_image_summary_and_output(tmp_path, photos, capsys):
    Image.fromarray(photos["coffee"]).save(tmp_path / "coffee.png")
    assert cli.main(["extract-image", str(tmp_path / "coffee.png"), "--output", str(tmp_path / "f.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_features"] == 1000 and info["width"] == photos["coffee"].shape[1]
    assert sum(info["features_per_scale"].values()) == 1000
    assert info["attention_min"] <= info["attention_max"]
    saved = Features.load(tmp_path / "f.npz")
    assert len(saved) == 1000 and np.isfinite(saved.descriptors).all()
    assert cli.main(["extract-image", str(tmp_path / "coffee.png"), "--max-features", "10", "--scales", "1"]) == 0
    assert "10 features" in capsys.readouterr().out


def test_user_errors_are_one_line_that_names_the_problem(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("<html>not an image</html>")
    (tmp_path / "only-bad").mkdir()
    (tmp_path / "only-bad" / "bad.jpg").write_text("<html>not an image</html>")
    cases = [
        (("extract", "--input", str(tmp_path / "only-bad"), "--output", str(tmp_path / "f")), ["every one of the 1"]),
        (("extract-image", str(bad)), ["bad.jpg", "cannot decode", "<html>"]),
        (("extract-image", str(tmp_path / "missing.jpg")), ["missing.jpg", "No such file"]),
        (("extract-image", str(bad), "--model", str(bad)), ["bad.jpg is not an ONNX model"]),
        (
            ("fit", "--features", str(tmp_path / "nothing"), "--output", str(tmp_path / "cb")),
            ["no features table at", "run `delf-index extract"],
        ),
        (("query", "--index", str(tmp_path), str(bad)), ["has no manifest.json", "did the job complete"]),
        (
            ("extract", "--input", str(tmp_path / "none" / "*.jpg"), "--output", str(tmp_path / "o")),
            ["matched nothing"],
        ),
    ]
    for args, expected in cases:
        out = delf_index(*args)
        assert out.returncode == 1, (args, out.stderr[-2000:])
        message = [line for line in out.stderr.splitlines() if line.startswith(f"delf-index {args[0]}: error:")]
        assert len(message) == 1 and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
        for text in expected:
            assert text in message[0], (args, message[0])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(argv):
        raise ValueError("operands could not be broadcast together")  # as numpy says it

    monkeypatch.setattr("delf_index.pipelines.extract_image.main", broken)
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["extract-image", "x.jpg"])
