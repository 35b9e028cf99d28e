"""The `delf-index` command, and what every job shares: where a Beam job runs, and the
command-line options several commands take.

Each command lives in its own module with a `main(argv)` that only parses its arguments into
that module's Python function (`extract.run(...)`, `fit.run(...)`, ...); modules are imported
only when their command runs, so that `query` never imports Beam and no command but
`export-model` and `train` imports torch.

Where a job runs is one `beam_options` dict, the same for every job and the same from
Python as from the command line (`--workers`, `--threads`, and any Beam option):

    extract.run("gs://b/photos/*.jpg", "gs://b/features", beam_options={"workers": 4})
    extract.run(..., beam_options={"runner": "DataflowRunner", "project": "p", "region": "r",
                                   "temp_location": "gs://b/tmp"})
"""

import argparse
import difflib
import functools
import importlib
import logging
import os
import re
import sys
import warnings

from delf_index.errors import UserError
from delf_index.indexing import synthesis
from delf_index.indexing.retrieval import default_conf as retrieval_defaults
from delf_index.runtime import cache, progress
from delf_index.runtime.extractor import SELECTIONS
from delf_index.runtime.extractor import default_conf as extractor_defaults
from delf_index.version import __version__

COMMANDS = {
    "export-model": ("delf_index.model.export", "export the DELF network to ONNX (needs the [model] extra)"),
    "extract-image": ("delf_index.pipelines.extract_image", "DELF features of one image, with a summary"),
    "train": ("delf_index.model.train", "train the attention head (and optionally fine-tune descriptors)"),
    "extract": (
        "delf_index.pipelines.extract",
        "Beam job: images (glob, tar shards, manifest) -> a features table (Delta Lake)",
    ),
    "fit": ("delf_index.pipelines.fit", "Beam job: the features table -> PCA and PQ codebooks"),
    "build": ("delf_index.pipelines.build", "Beam job: features table + codebooks -> index artifact (or --append)"),
    "update": ("delf_index.pipelines.update", "the scheduled run: extract what is new, append it, publish a version"),
    "search": ("delf_index.pipelines.search", "Beam job: a batch of queries (images or tables) -> results table"),
    "match": ("delf_index.pipelines.match", "Beam job: an index against itself -> match graph, clusters, labels"),
    "remove": ("delf_index.pipelines.remove", "take images down: recorded in the table, honoured by every later job"),
    "restore": ("delf_index.pipelines.remove:restore_main", "lift takedowns: the images are extracted again"),
    "compact": ("delf_index.pipelines.compact", "drop a features table's dead records and unused files"),
    "migrate": ("delf_index.pipelines.migrate", "convert an extract output of an earlier delf-index to a table"),
    "query": ("delf_index.pipelines.query", "search an index with images; ranked results with verified inliers"),
    "evaluate": ("delf_index.pipelines.evaluate", "extract -> fit -> build -> queries -> metrics and report (Beam)"),
}

# -- where jobs run ---------------------------------------------------------------------------
CORES = os.cpu_count() or 1
default_beam_options = {
    # Local worker processes (Beam's FnApiRunner); one per two cores: measured on 2 cores
    # (benchmarks/README.md, "Pipeline overhead"), one process with two threads beat two
    # single-threaded processes, whose start-up Beam pays on every run.
    "workers": max(1, CORES // 2),
    "threads": None,  # onnxruntime threads per worker process; None: cores / workers (locally)
    "runner": None,  # None: this machine (FnApiRunner); else a Beam runner, e.g. "DataflowRunner"
    "flags": (),  # further Beam options as command-line flags ("--project=p", ...)
}


def beam_flags(beam_options=None):
    """(Beam command-line flags, threads per worker process) of a `beam_options` dict; a job
    runs `beam.Pipeline(options=PipelineOptions(flags))`.

    Keys of `default_beam_options`, plus any Beam option by name (project, region,
    temp_location, ...). Without a runner the job runs here on Beam's FnApiRunner: Beam
    2.77's DirectRunner would first try to download the Prism runner, which fails offline.
    """
    options = {**default_beam_options, **(beam_options or {})}
    workers, threads, runner = int(options.pop("workers")), options.pop("threads"), options.pop("runner")
    flags = list(options.pop("flags"))
    if workers < 1:
        raise UserError(f"workers must be at least 1, not {workers}")
    for name, value in options.items():
        if value is True:
            flags.append(f"--{name}")
        elif value not in (False, None):
            flags += [f"--{name}={v}" for v in (value if isinstance(value, (list, tuple)) else [value])]
    if runner is not None:
        flags.append(f"--runner={runner}")
    elif not any(flag.startswith("--runner") for flag in flags):
        mode = "multi_processing" if workers > 1 else "in_memory"
        flags += ["--runner=FnApiRunner", f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
        threads = threads or max(1, CORES // workers)
    return flags, threads


def add_beam_arguments(parser):
    """--workers and --threads; any option the job does not know goes to Beam."""
    group = parser.add_argument_group("where the job runs (any other --option goes to Beam, e.g. --runner)")
    group.add_argument(
        "--workers",
        type=int,
        default=default_beam_options["workers"],
        help=f"local worker processes (default: one per two cores, here {default_beam_options['workers']})",
    )
    group.add_argument("--threads", type=int, help="onnxruntime threads per worker (default: cores / workers)")


def parse_job_args(parser, argv):
    """(args, beam_options) of a job's command line. What the command does not know goes to
    Beam, if Beam knows it: anything else is refused before any work (exit 2), naming the
    closest option, so that a typo never runs with the default silently."""
    parser.passed_on = beam_parser
    args, rest = parser.parse_known_args(argv)
    unknown = parser.unknown(rest)
    if unknown:
        parser.refuse(unknown)
    return args, {"workers": args.workers, "threads": args.threads, "flags": rest}


@functools.cache
def beam_parser():
    """An argument parser of every Beam pipeline option (what PipelineOptions would accept)."""
    # Beam is imported here, not at the top: `query` and the other commands that run no Beam
    # job import this module too, and Beam takes seconds to import
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


class Reparsed(Exception):
    """An error while a command line is parsed again for its unknown words (`Parser.leftover`)."""


class Parser(argparse.ArgumentParser):
    """The argument parser of a `delf-index` command: an unknown option is refused naming the
    closest known one ("unknown option --max-featues (did you mean --max-features?)"), and
    before any other error of the same command line, such as a required option missing: that
    is often the typo itself (`--inptu x` leaves --input missing)."""

    def __init__(self, command, doc, **kwargs):
        super().__init__(prog=f"delf-index {command}", description=doc.split("\n\n")[0], allow_abbrev=False, **kwargs)
        console = self.add_argument_group("console")  # read by cli.main before the command runs
        console.add_argument("-v", "--verbose", action="count", default=0, help="progress of each step (-vv: all)")
        console.add_argument("-q", "--quiet", action="store_true", help="errors only")
        self.passed_on = None  # a job's: the parser of the options it passes on (Beam's)
        self.argv, self.reparsing = [], False

    def parse_known_args(self, args=None, namespace=None):
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        if self.reparsing:
            raise Reparsed(message)
        found = re.match(r"unrecognized arguments: (.*)", message)
        unknown = self.unknown(found.group(1).split()) if found else self.leftover()
        if unknown:
            self.refuse(unknown)
        super().error(message)

    def unknown(self, words):
        """Of the words no option of the command took, those that are not passed on either."""
        if words and self.passed_on:
            _, words = self.passed_on().parse_known_args(words)
        return words

    def leftover(self):
        """The unknown words of the command line, parsed again with every option optional: an
        error raised before argparse names the words it did not know (a required option
        missing, a bad value) must not hide them. Empty where parsing again fails too."""
        required = [a for a in self._actions if a.required] + [g for g in self._mutually_exclusive_groups if g.required]
        for item in required:
            item.required = False
        self.reparsing = True
        try:
            return self.unknown(super().parse_known_args(self.argv)[1])
        except Reparsed:
            return []
        finally:
            self.reparsing = False
            for item in required:
                item.required = True

    def refuse(self, unknown):
        """Exit status 2 naming each unknown word, with the closest option: the command's own
        before those it passes on (--dryr-un is --dry-run, not Beam's --dry_run)."""
        known = [[o for action in self._actions for o in action.option_strings]]
        if self.passed_on:
            known.append([o for action in self.passed_on()._actions for o in action.option_strings])
        said, after_option = [], False
        for word in unknown:
            name = word.split("=")[0]
            if not name.startswith("-"):
                if not after_option:  # else the value of the unknown option before it
                    said.append(f"unexpected argument {word!r}")
                after_option = False
                continue
            after_option = "=" not in word
            close = [c for options in known for c in difflib.get_close_matches(name, options, 1, 0.75)]
            said.append(f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close else ""))
        self.exit(2, f"{self.prog}: error: {'; '.join(said)}; see {self.prog} --help\n")


def add_cache_argument(parser):
    """--cache-size: the bound of the local cache of remote indexes (runtime/cache.py). It is
    passed on as DELF_INDEX_CACHE_SIZE, which local worker processes inherit; set that variable
    in the container of remote workers (Dataflow)."""

    def size(text):
        os.environ["DELF_INDEX_CACHE_SIZE"] = str(cache.parse_size(text))
        return text

    parser.add_argument(
        "--cache-size",
        type=size,
        metavar="SIZE",
        help=f"bound of the local cache of remote indexes, e.g. 5G; 0: no limit (default {cache.DEFAULT_LIMIT})",
    )


def add_extractor_arguments(parser):
    """Command-line options for the knobs of the extractor's conf (None: not given)."""
    group = parser.add_argument_group("extraction (defaults: the official DELF settings, docs/extraction.md)")
    group.add_argument(
        "--model", help="int8 or float32 (shipped; default: the table's, else int8 on CPUs), or an .onnx file"
    )
    group.add_argument(
        "--scales", type=float, nargs="+", help=f"pyramid scales (default {extractor_defaults['scales']})"
    )
    group.add_argument("--max-image-size", type=int, help="largest side before the pyramid, 0 = no limit (1024)")
    group.add_argument("--score-threshold", type=float, help="attention threshold (default: the model's)")
    group.add_argument("--max-features", type=int, help="features kept per image (default 1000)")
    group.add_argument("--nms-iou", type=float, help="NMS on receptive-field boxes at this IoU (default: off)")
    group.add_argument(
        "--selection",
        choices=SELECTIONS,
        help=f"which features are kept: by score over the pyramid, or the best of each level in turn "
        f"(default {extractor_defaults['selection']})",
    )
    group.add_argument(
        "--global-scales",
        type=float,
        nargs="+",
        help=f"pyramid levels averaged into the global descriptor (default {extractor_defaults['global_scales']})",
    )


def extractor_conf_from_args(args):
    """The extractor options given on the command line, as a conf dict."""
    conf = {}
    for key in ("scales", "score_threshold", "max_features", "nms_iou", "global_scales", "selection"):
        if getattr(args, key) is not None:
            conf[key] = tuple(getattr(args, key)) if key in ("scales", "global_scales") else getattr(args, key)
    if args.max_image_size is not None:
        conf["max_image_size"] = args.max_image_size or None
    return conf


# The ranking's numbers, one option each in the group of every command that ranks (query,
# search, match, evaluate): key of indexing.retrieval.default_conf -> (type, what it sets)
RANKING_OPTIONS = {
    "knn": (int, "neighbours per query descriptor"),
    "nprobe": (int, "coarse cells visited per query descriptor"),
    "shortlist": (int, "images verified geometrically per query"),
    "min_inliers": (int, "inliers that make a verified match"),
    "local_weight": (float, "weight of the local votes against the global similarity"),
}


def add_ranking_arguments(parser, flags=None):
    """The options of the ranking (indexing/retrieval.py `default_conf`; not given: its default
    stands), one group for every command that ranks: its numbers and the switches of its later
    stages (query expansion, DBA, view synthesis). `flags` renames an option whose name the
    command uses otherwise (match: its --min-inliers makes a cluster edge)."""
    group = parser.add_argument_group("ranking (docs/index.md)")
    for key, (kind, text) in RANKING_OPTIONS.items():
        flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
        group.add_argument(flag, dest=f"ranking_{key}", type=kind, metavar=key.split("_")[-1].upper(),
                           help=f"{text} (default {retrieval_defaults[key]})")  # fmt: skip
    on_off = argparse.BooleanOptionalAction
    group.add_argument("--expansion", dest="ranking_expansion", action=on_off,
                       help="alpha-QE with the verified results (default: on)")  # fmt: skip
    group.add_argument("--graph-expansion", dest="ranking_graph_expansion", action=on_off,
                       help="verified results vote for their match-graph neighbours "
                       "(default: when the index holds a graph, `match --augment`)")  # fmt: skip
    group.add_argument("--dba", dest="ranking_use_dba", action=on_off,
                       help="rank against neighbour-augmented global descriptors "
                       "(default: when the index holds them, `match --augment`)")  # fmt: skip
    group.add_argument("--synthesis", dest="ranking_synthesis_stages", nargs="*", metavar="STAGE",
                       choices=list(synthesis.STAGES),
                       help=f"view synthesis stages for queries that verify nothing but show evidence of a match, "
                       f"of {list(synthesis.STAGES)}; "
                       f"none given: off (default: {retrieval_defaults['synthesis_stages']})")  # fmt: skip


def ranking_conf_from_args(args):
    """The ranking options given on the command line (`add_ranking_arguments`), as query conf."""
    given = {name: value for name, value in vars(args).items() if value is not None}
    return {name.removeprefix("ranking_"): value for name, value in given.items() if name.startswith("ranking_")}


# -- the command ------------------------------------------------------------------------------
class WorkerLogs(logging.Filter):
    """Beam's local multi-process runner forwards worker logs as protobuf dumps; keep
    delf-index's own messages (progress) and show them as one plain line."""

    message = re.compile(r'message: "(.*?)"\s+(?:instruction_id|transform_id|log_location)', re.S)

    def filter(self, record):
        text = record.getMessage()
        if "delf_index" not in text:
            return False
        found = self.message.search(text)
        record.msg, record.args, record.name = (found.group(1) if found else text), (), "worker"
        return True


class UserErrorsOnce(logging.Filter):
    """Beam logs an exception raised in a step, with its traceback, before the job fails with
    it; the command says a user error in one line itself (bugs keep Beam's log)."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


class BeamRootNotices(logging.Filter):
    """Beam's RunInference warns on the root logger, once per worker, that it cannot read the
    memory it uses (a notice about its own metrics, not about the job)."""

    def filter(self, record):
        return not record.getMessage().startswith("Resource module is not available")


class ConsoleLines(logging.Handler):
    """The lines jobs log for a person at the console (runtime/console.py), plain as `print`
    writes them: summaries on stdout, where scripts read them, progress on stderr. The stream
    is looked up per line, so that a redirected sys.stdout (pytest's) gets them."""

    def filter(self, record):
        return hasattr(record, "console")

    def emit(self, record):
        stream = sys.stdout if record.console == "summary" else sys.stderr
        stream.write(record.getMessage() + "\n")
        stream.flush()


class Diagnostics(logging.Filter):
    """The rest, with time, level and logger: at least `level`; the lines ConsoleLines shows
    are not shown twice."""

    def __init__(self, level):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno >= self.level and not hasattr(record, "console")


def setup_logging(level=0):
    """The console of a command: its summary and progress lines (`ConsoleLines`; a bar on a
    terminal), warnings and errors, and the other INFO lines of delf-index from -v on;
    libraries' messages only at -vv (fsspec's cache notices, Beam's, faiss's loader). -q:
    errors only."""
    logging.basicConfig(
        level=logging.DEBUG if level >= 2 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(Diagnostics(logging.WARNING if level < 1 else logging.NOTSET))
    root.addHandler(ConsoleLines())
    logging.getLogger("delf_index").setLevel(
        logging.ERROR if level < 0 else logging.INFO if level < 2 else logging.DEBUG
    )
    progress.bars = level >= 0
    if level < 2:
        # Beam's batch-size estimator warns of badly conditioned fits; numbers, not news
        warnings.filterwarnings("ignore", module=r"apache_beam\.")
        for noisy in ("apache_beam", "onnxscript", "onnx_ir", "torch", "faiss", "fsspec", "gcsfs", "s3fs", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.ERROR if level < 0 else logging.WARNING)
        if not any(isinstance(f, BeamRootNotices) for f in root.filters):
            root.addFilter(BeamRootNotices())
    logging.getLogger("apache_beam.runners.common").addFilter(UserErrorsOnce())
    forwarded = logging.getLogger("apache_beam.runners.portability.local_job_service")
    forwarded.setLevel(logging.INFO if level >= 1 else logging.WARNING)
    forwarded.addFilter(WorkerLogs())


VERBOSITY = {"-q": -1, "--quiet": -1, "-v": 1, "--verbose": 1, "-vv": 2}


def usage():
    lines = ["usage: delf-index COMMAND [options]   (delf-index COMMAND --help: its options)", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "options:", f"  {'-h, --help':<15} this list", f"  {'--version':<15} the version of delf-index"]
    return "\n".join(lines)


def refuse_command(word):
    """Exit status 2 and the usage for a first word that is no command (nor --help, --version),
    naming the closest one: a typo is never taken for something else."""
    kind, known = ("option", ["--help", "--version"]) if word.startswith("-") else ("command", [*COMMANDS, "help"])
    close = difflib.get_close_matches(word, known, 1, 0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    print(f"{usage()}\n\ndelf-index: error: unknown {kind} {word!r}{hint}", file=sys.stderr)
    return 2


def user_error(error):
    """True for errors the user can fix (bad paths, files, options, storage); False for bugs,
    which keep their traceback."""
    if isinstance(error, (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    # a missing optional package (s3fs for s3://, ...), not a broken import of delf-index itself
    return isinstance(error, ImportError) and not (error.name or "").startswith("delf_index")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a command is needed: a script that forgot it must not look successful
        print(usage(), file=sys.stderr)
        return 2
    command = argv[0]
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command in ("--version", "version"):
        print(f"delf-index {__version__}")
        return 0
    if command not in COMMANDS:
        return refuse_command(command)
    # -q: errors only; default: the summary and progress lines; -v: each step's lines; -vv: everything
    setup_logging(sum(VERBOSITY.get(a, 0) for a in argv[1:]))
    module_name, _, function = COMMANDS[command][0].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name == "torch":
            print(f"delf-index {command} needs PyTorch: pip install 'delf-index[model]'", file=sys.stderr)
            return 2
        raise
    try:
        return getattr(module, function or "main")(argv[1:]) or 0
    except Exception as e:
        if not user_error(e):
            raise
        # Beam appends the step a worker's error came from; the user's fix does not depend on it
        message = re.sub(r" \[while running '[^']*'\]", "", str(e))
        print(f"delf-index {command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
