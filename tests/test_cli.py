"""The `delf-index` command: every subcommand, summaries, one-line messages for user errors
that name the problem, tracebacks for bugs."""

import importlib
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from delf_index.errors import UserError
from delf_index.indexing.retrieval import Result
from delf_index.pipelines import cli
from delf_index.runtime.features import Features
from tests import conftest


def delf_index(*args):
    return subprocess.run([sys.executable, "-m", "delf_index", *args], capture_output=True, text=True)


def test_usage_lists_the_commands(capsys):
    out = delf_index("--help")
    assert out.returncode == 0
    listed = out.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in listed] == list(cli.COMMANDS)
    assert "--version" in out.stdout.split("options:")[1]
    assert "Parquet" not in out.stdout and "a features table (Delta Lake)" in out.stdout  # what extract writes
    assert cli.main([]) == 2  # no command: a script that forgot it must not look successful
    bare = capsys.readouterr()
    assert not bare.out and bare.err == cli.usage() + "\n"


@pytest.mark.parametrize(
    "word, closest",
    [("udpate", "update"), ("qurey", "query"), ("extract-imgae", "extract-image"), ("--verison", "--version"),
     ("--hepl", "--help"), ("xyzzy", None)],
)  # fmt: skip
def test_a_mistyped_command_names_the_closest(word, closest, capsys):
    assert cli.main([word, "--input", "x"]) == 2
    captured = capsys.readouterr()
    said = captured.err.strip().splitlines()[-1]  # the last line, under the list of commands
    kind = "option" if word.startswith("-") else "command"
    assert said.startswith(f"delf-index: error: unknown {kind} {word!r}") and "update  " in captured.err
    assert (f"(did you mean {closest}?)" in said) if closest else "did you mean" not in said
    assert not captured.out


def options_of(command, monkeypatch):
    """The long options of a command's parser (cli.Parser), read off the parser itself."""

    class Built(Exception):
        pass

    def record(parser, args=None, namespace=None):
        raise Built(parser)

    monkeypatch.setattr(cli.Parser, "parse_known_args", record)
    with pytest.raises(Built) as built:
        cli.main([command])
    monkeypatch.undo()
    return [o for action in built.value.args[0]._actions for o in action.option_strings if o.startswith("--")]


PARSED = [c for c in cli.COMMANDS if c not in ("export-model", "train")]  # those two: model/, plain argparse


@pytest.mark.parametrize("command", PARSED)
def test_a_mistyped_option_is_named_before_missing_ones(command, monkeypatch, capsys):
    """Every option of every command, mistyped (two neighbouring letters swapped) and given
    alone: the typo is named with a known option close to it, even where the command's
    required options are missing too (the typo usually is the missing option)."""
    random = np.random.default_rng(34)
    options = options_of(command, monkeypatch)
    assert "--help" in options and len(options) >= 3
    for option in options:
        swaps = [i for i in range(3, len(option) - 1) if option[i] != option[i + 1]]
        if not swaps:
            continue
        i = int(random.choice(swaps))
        typo = option[:i] + option[i + 1] + option[i] + option[i + 2 :]
        if typo in options:
            continue
        with pytest.raises(SystemExit) as done:
            cli.main([command, typo, "x"])
        said = capsys.readouterr().err
        assert done.value.code == 2 and "required" not in said, (typo, said)
        found = re.search(rf"unknown option {re.escape(typo)} \(did you mean (--[a-z0-9-]+)\?\)", said)
        assert found and found.group(1) in options, (typo, said)


def test_the_issue_typo_names_input(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["update", "--inptu", "x", "--features", "y", "--index", "z"])
    said = capsys.readouterr().err
    assert done.value.code == 2
    assert said.strip() == (
        "delf-index update: error: unknown option --inptu (did you mean --input?); see delf-index update --help"
    )
    with pytest.raises(SystemExit):  # a Beam option is no typo: the missing option is said
        cli.main(["search", "--index", "i", "--output", "o", "--runner", "DirectRunner"])
    assert "the following arguments are required: --input" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_its_options(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: delf-index {command}")
    if command in ("extract", "fit", "build", "evaluate"):  # the Beam jobs: one meaning of --workers
        assert "--workers" in out and "one per two cores" in out
    if "--cache-size" in out:
        assert "0: no limit" in out


# the commands that rank, with the required arguments that bring them to their run
RANKING = {
    "query": ["--index", "i", "a.jpg"],
    "search": ["--input", "x", "--index", "i", "--output", "o"],
    "match": ["--index", "i", "--output", "o"],
    "evaluate": ["--images", "x", "--groups", "g.csv", "--workdir", "w"],
}


def query_conf_handed_on(command, argv, monkeypatch):
    """The query conf `delf-index COMMAND ARGV` hands on: to Index.load (query), else in the
    conf of the job's run, which does not run."""
    seen = []

    class Index:
        @staticmethod
        def load(uri, model=None, conf=None):
            seen.append(conf)
            raise UserError("loaded nothing")

    def run(*args, **kwargs):
        seen.append(next(a for a in (*args, *kwargs.values()) if isinstance(a, dict) and "query" in a))

    module = importlib.import_module(f"delf_index.pipelines.{command}")
    monkeypatch.setattr(module, "Index", Index) if command == "query" else monkeypatch.setattr(module, "run", run)
    assert cli.main([command, *argv]) == (1 if command == "query" else 0)
    return seen[0] if command == "query" else seen[0]["query"]


@pytest.mark.parametrize("command", list(RANKING))
def test_one_ranking_group_for_every_command_that_ranks(command, monkeypatch):
    """Random command lines of the ranking options: every option given reaches the ranking's
    conf under its key, and no option not given does (its default stands)."""
    random = np.random.default_rng(len(command))
    for _ in range(12):
        argv, expected = list(RANKING[command]), {}
        for key, (kind, _) in cli.RANKING_OPTIONS.items():
            if random.random() < 0.5:
                value = int(random.integers(1, 200)) if kind is int else float(random.integers(1, 40)) / 4
                flag = "--pair-inliers" if (command, key) == ("match", "min_inliers") else f"--{key.replace('_', '-')}"
                argv += [flag, str(value)]
                expected[key] = value
        for flag, key in (("expansion", "expansion"), ("graph-expansion", "graph_expansion"), ("dba", "use_dba")):
            on = random.choice([None, True, False])
            if on is not None:
                argv.append(f"--{flag}" if on else f"--no-{flag}")
                expected[key] = on
        stages = [None, [], ["rotations"], ["rotations", "tilt2"]][int(random.integers(4))]
        if stages is not None:
            argv += ["--synthesis", *stages]
            expected["synthesis_stages"] = stages
        if command == "match":  # match's own --min-inliers makes a cluster edge, not a verified match
            argv += ["--min-inliers", "31"]
        conf = query_conf_handed_on(command, argv, monkeypatch)
        ranking = set(cli.RANKING_OPTIONS) | {"expansion", "graph_expansion", "use_dba", "synthesis_stages"}
        assert {k: v for k, v in conf.items() if k in ranking} == expected, argv
        monkeypatch.undo()


def test_query_says_how_results_are_ordered(monkeypatch, capsys):
    """Results come ordered by verified inliers, not by score: the listing says so."""
    results = [Result("b", "b.jpg", "", 3.433, 0.8, 0.2, 289), Result("a", "a.jpg", "", 3.439, 0.8, 0.2, 278),
               Result("c", "c.jpg", "", 3.5, 0.9, 0.2, 0)]  # fmt: skip

    class Index:
        @staticmethod
        def load(uri, model=None, conf=None):
            return Index()

        def search(self, path, top_k):
            return results

        def __len__(self):
            return 186

    monkeypatch.setattr("delf_index.pipelines.query.Index", Index)
    assert cli.main(["query", "--index", "i", "photo.jpg"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("photo.jpg: 3 results from 186 images (") and "most verified inliers first" in out[0]
    assert [line.split()[1] for line in out[1:]] == ["b", "a", "c"] and "not verified" in out[3]


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


def test_user_errors_are_one_line_that_names_the_problem(tmp_path, capsys):
    """In this process (cli.main, as `delf-index` calls it): a subprocess per case cost 2 s of
    imports each; a bug would raise here (test_a_bug_keeps_its_traceback)."""
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
        code, out = cli.main(list(args)), capsys.readouterr()
        assert code == 1, (args, out.err[-2000:])
        message = [line for line in out.err.splitlines() if line.startswith(f"delf-index {args[0]}: error:")]
        assert len(message) == 1 and "Traceback" not in out.err, (args, out.err[-2000:])
        for text in expected:
            assert text in message[0], (args, message[0])
    out = delf_index(*cases[2][0])  # and once through `python -m delf_index`: exit status 1, the line alone
    assert out.returncode == 1 and out.stderr.strip().startswith("delf-index extract-image: error:")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(argv):
        raise ValueError("operands could not be broadcast together")  # as numpy says it

    monkeypatch.setattr("delf_index.pipelines.extract_image.main", broken)
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["extract-image", "x.jpg"])


def test_the_test_run_says_first_what_will_skip(monkeypatch, tmp_path):
    """`./run_local.sh test` on a machine without Chromium or landmarks-dev: when collection is
    done, before the first test, which tests will skip and the command that runs them
    (tests/conftest.py; a pytest in a subprocess would cost 6 s of imports)."""
    written = []

    class Reporter:
        def write_sep(self, sep, title="", **markup):
            written.append(f"{sep * 3} {title}")

        def write_line(self, line, **markup):
            written.append(line)

    def session(*items):
        plugins = SimpleNamespace(get_plugin=lambda name: Reporter() if name == "terminalreporter" else None)
        return SimpleNamespace(items=items, config=SimpleNamespace(pluginmanager=plugins))

    pages = [SimpleNamespace(nodeid=f"tests/test_pages.py::test_{i}", fixturenames=["browser", "x"]) for i in "ab"]
    landmarks = SimpleNamespace(nodeid="tests/test_extract_pipeline.py::test_l", fixturenames=["landmarks_dir"])
    other = SimpleNamespace(nodeid="tests/test_cli.py::test_x", fixturenames=["tmp_path"])
    monkeypatch.setattr(conftest, "chromium", lambda: None)
    monkeypatch.setattr(conftest, "LANDMARKS", str(tmp_path / "none"))
    conftest.pytest_collection_finish(session(*pages, landmarks, other))
    assert written[0] == "!!! tests skipped on this machine" and len(written) == 4
    assert written[1] == ("2 tests of tests/test_pages.py will skip: no Chromium: the HTML reports are not opened "
                          "in a browser; to run them: sudo apt-get install chromium")  # fmt: skip
    assert written[2].startswith("1 tests of tests/test_extract_pipeline.py will skip: no landmarks-dev data set")
    assert written[2].endswith("to run them: LANDMARKS_DEV=/path/to/landmarks-dev ./run_local.sh test")
    written.clear()
    conftest.pytest_collection_finish(session(other))  # none of them collected: nothing said
    monkeypatch.setattr(conftest, "chromium", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(conftest, "playwright", lambda: False)
    conftest.pytest_collection_finish(session(*pages, other))
    assert written[1].endswith("no Playwright: the HTML reports are not opened in a browser; to run them: "
                               "pip install -e '.[dev]'") and len(written) == 3  # fmt: skip
    written.clear()
    monkeypatch.setattr(conftest, "playwright", lambda: True)
    monkeypatch.setattr(conftest, "LANDMARKS", str(tmp_path))
    (tmp_path / "groups.csv").write_text("image,group\n")
    conftest.pytest_collection_finish(session(*pages, landmarks, other))  # all there: nothing said
    assert written == []


@pytest.mark.parametrize(
    "job, conf, refused",
    [
        ("extract", {"extractor": {"max_featues": 10}}, "unknown extractor options ['max_featues']"),
        ("extract", "delf-v2", "unknown extract preset 'delf-v2'; presets: ['default', 'delf-v1']"),
        ("fit", {"pca": 40}, "unknown fit options ['pca']"),
        ("search", {"query": {"knm": 5}}, "unknown query options ['knm']"),
        ("match", {"query": {"knm": 5}}, "unknown query options ['knm']"),
        ("evaluate", {"fitt": {}}, "unknown evaluate options ['fitt']"),
    ],
)
def test_a_job_refuses_an_unknown_conf_key_before_any_work(job, conf, refused, tmp_path):
    """Every job's conf goes through runtime.conf.resolve_conf first: a typo is named, nested
    or not, before any path is read."""
    module = importlib.import_module(f"delf_index.pipelines.{job}")
    missing = str(tmp_path / "missing")
    arguments = (missing,) * (3 if job == "search" else 2)
    keywords = {"groups": missing} if job == "evaluate" else {}
    with pytest.raises(UserError) as refusal:
        module.run(*arguments, conf=conf, **keywords)
    assert refused in str(refusal.value)
