"""`delf-index`: one command, one subcommand per pipeline step.

Each subcommand lives in its own module with a `main(argv)`; modules are imported only when
their command runs, so that commands which need no torch never import it.
"""

import importlib
import logging
import re
import sys

COMMANDS = {
    "export-model": ("model.export", "export the DELF network to ONNX (needs the [model] extra)"),
    "extract-image": ("pipelines.extract_image", "extract DELF features from one image and summarise them"),
    "train": ("model.train", "train the attention head (and optionally fine-tune descriptors) on labelled images"),
    "extract": ("pipelines.extract", "Beam job: images (glob, tar shards, manifest) -> Parquet feature tables"),
    "fit": ("pipelines.fit", "Beam job: feature tables -> PCA and PQ codebooks"),
    "build": ("pipelines.build", "Beam job: feature tables + codebooks -> index artifact (or --append to one)"),
    "query": ("pipelines.query", "search an index with images; ranked results with verified inliers"),
    "evaluate": ("pipelines.evaluate", "extract -> fit -> build -> queries -> metrics and report (Beam)"),
}


class WorkerLogs(logging.Filter):
    """Beam's local multi-process runner forwards worker logs as protobuf dumps; keep
    delf-index's own messages (progress) and show them as one plain line."""

    message = re.compile(r'message: "(.*?)"\s+(?:instruction_id|transform_id|log_location)', re.S)

    def filter(self, record):
        text = record.getMessage()
        if "/pipelines/" not in text and "/indexing/" not in text:
            return False
        found = self.message.search(text)
        record.msg, record.args, record.name = (found.group(1) if found else text), (), "worker"
        return True


def setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "onnxscript", "onnx_ir", "torch", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    forwarded = logging.getLogger("apache_beam.runners.portability.local_job_service")
    forwarded.setLevel(logging.INFO)
    forwarded.addFilter(WorkerLogs())


def usage():
    lines = ["usage: delf-index COMMAND [options]   (delf-index COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"delf-index: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    setup_logging()
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name == "torch":
            print(f"delf-index {command} needs PyTorch: pip install 'delf-index[model]'", file=sys.stderr)
            return 2
        raise
    try:
        return module.main(argv[1:]) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        # user errors (bad paths, bad files, bad options): one clear line, no traceback
        print(f"delf-index {command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
