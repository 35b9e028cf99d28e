"""Jobs log through `logging` and print nothing themselves: from Python, nothing reaches the
console until the user configures logging, and then the lines the command line prints."""

import os
import re
import subprocess
import sys
import textwrap

from tests.conftest import put

# a takedown (which warns: no index given), extract and build, from Python with logging as it
# is (`plain`), then with a handler of the user's (`configured`), then as the command line;
# each phase on its own outputs, and a line on both streams between phases. The takedown
# comes first: Beam itself calls logging.basicConfig() when a job makes its pipeline, after
# which warnings (of any library) reach stderr (docs/pipelines.md, "Logging")
SCRIPT = textwrap.dedent(
    """
    import logging, os, shutil, sys
    from delf_index.pipelines import build, cli, extract, remove

    images, built, root = sys.argv[1:]
    codebooks = os.path.join(built, "codebooks")
    for phase in ("plain", "configured", "command"):
        print(f"== {phase}", flush=True)
        print(f"== {phase}", file=sys.stderr, flush=True)
        out = os.path.join(root, phase)
        features, index = os.path.join(out, "features"), os.path.join(out, "index")
        if phase == "command":
            for argv in (["extract", "--input", images, "--output", features],
                         ["build", "--features", features, "--codebooks", codebooks, "--output", index]):
                assert cli.main(argv + ["--workers", "1"]) == 0
            continue
        if phase == "configured":
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout, force=True)
        shutil.copytree(os.path.join(built, "features"), os.path.join(out, "taken"))
        remove.run(os.path.join(out, "taken"), ["coffee.jpg"], max_change=None)
        extract.run(images, features, beam_options={"workers": 1})
        build.run(features, index, codebooks=codebooks, beam_options={"workers": 1})
    """
)


def phases(text):
    """{phase: its lines} of the script's output on one stream."""
    found = re.split(r"^== (\w+)\n", text, flags=re.M)
    return {name: body.splitlines() for name, body in zip(found[1::2], found[2::2])}


def masked(line, root):
    """A line without what differs between runs: the phase's folder, index version names,
    numbers (run ids, seconds)."""
    line = re.sub(r"\bv\d+-[0-9a-f]+\b", "VERSION", re.sub(re.escape(root) + r"/\w+/", "OUT/", line))
    return re.sub(r"\d+(\.\d+)?", "N", line)


def test_jobs_print_nothing_unless_logging_is_configured(built, pictures, tmp_path):
    images = str(tmp_path / "images")
    put(images, pictures, ["coffee.jpg", "rocket.jpg"])
    root = str(tmp_path / "runs")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, images, str(built), root],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},  # a library's deprecation notices are not the jobs'
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out, err = phases(done.stdout), phases(done.stderr)
    # from Python, logging left as it is: not a line, not even the takedown's warning
    assert out["plain"] == [] and err["plain"] == []
    # a handler of the user's gets each job's lines, under the job's module's logger
    logged = out["configured"]
    assert any(line.startswith("delf_index.pipelines.extract: extract: run ") for line in logged)
    assert any(line.startswith("delf_index.pipelines.build: build: version ") for line in logged)
    assert any(line.startswith("delf_index.pipelines.remove: ") and "serves them" in line for line in logged)
    # the command line prints the same summary lines, on stdout, and no step lines
    printed = out["command"]
    assert [line.split(":")[0] for line in printed] == ["extract", "build"]
    messages = {masked(line.split(": ", 1)[1], root) for line in logged}
    for line in printed:
        assert masked(line, root) in messages
