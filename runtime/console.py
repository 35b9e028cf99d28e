"""What reaches the console: C libraries' own output (faiss) is kept out of it.

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
