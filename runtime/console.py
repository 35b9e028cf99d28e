"""What reaches the console: the lines jobs log for it, and C libraries' own output (faiss)
kept out of it.

Jobs log through `logging` (one `delf_index` logger, a child per module) and print nothing
themselves. Two kinds of their INFO records are lines for a person at the console, marked
with `extra`: a job's summary (`log.info(text, extra=console.SUMMARY)`: what it did, one line
at its end) and its progress (`extra=console.PROGRESS`, runtime/progress.py). The command line
shows those plain, summaries on stdout and progress on stderr, and the other INFO records only
from -v on (pipelines/cli.py, `setup_logging`); a library user sees them all as ordinary INFO
records of the loggers they configure, and nothing where they configure none.

faiss prints on the process's C stdout and stderr ("resizing ... to N bytes" when it merges
on-disk lists, a k-means "WARNING clustering ... points to ... centroids" per sub-quantizer),
where Python's logging cannot filter it. `c_output` catches it for a block; the caller logs
it at DEBUG or sums it up in one line.
"""

import contextlib
import ctypes
import os
import sys
import tempfile

SUMMARY = {"console": "summary"}  # a job's summary line: stdout on the command line
PROGRESS = {"console": "progress"}  # a progress line of a long job: stderr on the command line


@contextlib.contextmanager
def c_output(fd=1):
    """Catch what C code writes to file descriptor `fd` (1: stdout, 2: stderr) during the
    block; yields a list that holds the text once the block ends."""
    caught = []
    libc = ctypes.CDLL(None)
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield caught
        finally:
            libc.fflush(None)
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            caught.append(sink.read().decode(errors="replace"))
