"""Progress of a long job: done / total, rate and time left, wherever its workers run.

Workers count what they finish with a `Counter` (in a DoFn), which writes its count every few
seconds to a small file of the job's progress folder; the launching process sums them in
`watching`, which logs a line every 30 s (an INFO record marked `console.PROGRESS`: in logs,
Dataflow's, CI's, cron's):

    extract: 1,234 / 10,000 images (12%), 8.1 images/s, 18 min left

or, where the command line asked for bars (`bars`) and stderr is a terminal, shows a bar
(tqdm) instead. A library user sees the lines once they configure logging, and never a bar
unless they set `progress.bars = True`.

The folder is local for a local run and an object-store folder for remote workers (each
worker writes one small object every 15 s there); it is removed at the end.
"""

import contextlib
import json
import logging
import os
import posixpath
import socket
import sys
import threading
import time
import uuid

from tqdm import tqdm

from delf_index.runtime import console, storage

log = logging.getLogger(__name__)
LOG_EVERY = 30.0  # seconds between progress lines when no bar is shown
bars = False  # a bar on a terminal instead of the lines: the command line's choice (pipelines/cli.py)


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
def watching(folder, total, what, unit):
    """Show the progress of the workers counting into `folder` while the block runs: `total`
    units (None: unknown), named `unit`, for the job `what`. Nothing is shown where INFO
    records of this module's logger go nowhere (`-q`, or a library user's default)."""
    stop = threading.Event()
    bar = None
    if bars and sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
        bar = tqdm(total=total, desc=what, unit=f" {unit}", leave=False, dynamic_ncols=True)

    def watch():
        start, logged = time.time(), time.time()
        while not stop.wait(flush_every(folder)):
            if bar is not None:
                bar.update(done(folder) - bar.n)
            elif time.time() - logged >= LOG_EVERY and log.isEnabledFor(logging.INFO):
                logged = time.time()
                log.info(line(what, done(folder), total, unit, time.time() - start), extra=console.PROGRESS)

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
