"""Progress of a long job: done / total, rate and time left, wherever its workers run.

Workers count what they finish with a `Counter` (in a DoFn), which writes its count every few
seconds to a small file of the job's progress folder; the launching process sums them in
`watching`, and shows a bar on a terminal (tqdm) or, in logs (Dataflow, CI, cron), a line
every 30 s:

    extract: 1,234 / 10,000 images (12%), 8.1 images/s, 18 min left

The folder is local for a local run and an object-store folder for remote workers (each
worker writes one small object every 15 s there); it is removed at the end.
"""

import contextlib
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid

from tqdm import tqdm

from delf_index.runtime import storage

LOG_EVERY = 30.0  # seconds between progress lines when the console is not a terminal


def flush_every(folder):
    return 1.0 if storage.is_local(folder) else 15.0


class Counter:
    """A worker's count of finished units, written to `folder` now and then (call `flush` at
    the end of a bundle)."""

    def __init__(self, folder):
        self.folder, self.count, self.written, self.last = folder, 0, 0, 0.0
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.path = posixpath.join(folder, name) if folder else None

    def add(self, n=1):
        self.count += n
        if self.folder and time.time() - self.last > flush_every(self.folder):
            self.flush()

    def flush(self):
        if self.folder and self.count != self.written:  # no folder: counted for nobody (search's extraction)
            with contextlib.suppress(OSError):  # progress is a courtesy: never fail a job for it
                storage.write_bytes(self.path, json.dumps(self.count).encode())
                self.written, self.last = self.count, time.time()


def done(folder):
    """The sum of the workers' counts in `folder`."""
    fs, path = storage.uncached_filesystem(posixpath.join(folder, "x"))
    total = 0
    try:
        names = fs.ls(posixpath.dirname(path), detail=False)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.endswith(".json"):
            with contextlib.suppress(OSError, ValueError):
                total += int(json.loads(fs.cat_file(name)))
    return total


@contextlib.contextmanager
def watching(folder, total, what, unit, show=True):
    """Show the progress of the workers counting into `folder` while the block runs: `total`
    units (None: unknown), named `unit`, for the job `what`."""
    stop = threading.Event()
    bar = None
    if show and sys.stderr.isatty():
        bar = tqdm(total=total, desc=what, unit=f" {unit}", leave=False, dynamic_ncols=True)

    def watch():
        start, logged = time.time(), time.time()
        while not stop.wait(flush_every(folder)):
            count = done(folder)
            if bar is not None:
                bar.update(count - bar.n)
            elif show and time.time() - logged >= LOG_EVERY:
                logged = time.time()
                print(line(what, count, total, unit, time.time() - start), file=sys.stderr, flush=True)

    thread = threading.Thread(target=watch, name=f"progress {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if bar is not None:
            bar.close()
        storage.remove(folder)


def line(what, count, total, unit, seconds):
    """One progress line: done / total (share), rate, time left."""
    rate = count / seconds if seconds > 0 else 0.0
    if not total:
        return f"{what}: {count:,} {unit} ({rate:.1f} {unit}/s)"
    left = (total - count) / rate if rate > 0 else None
    eta = "" if left is None else f", {left / 60:.0f} min left" if left >= 90 else f", {left:.0f} s left"
    return f"{what}: {count:,} / {total:,} {unit} ({count / total:.0%}), {rate:.1f} {unit}/s{eta}"
