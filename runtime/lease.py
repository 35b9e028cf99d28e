"""One writer at a time: a lease object beside what it guards (a features table, an index).

    with lease.writing("gs://bucket/index", "build --append", wait=False) as held:
        ...                       # plan, write files
        held.check()              # right before the commit: still ours?
        ...                       # commit

The lease is ``<root>/_lease.json``, taken with a conditional write (create-if-absent, then
generation / ETag match: storage.write_if), renewed by a thread every quarter of its time to
live, and released at the end. A lease belongs to the process that took it by a random token
made once per process (`process_token`), never by hostname and pid, which two containers can
share. A holder that crashed stops renewing, so its lease expires (DELF_INDEX_LEASE_SECONDS,
default 300, after its last renewal); one whose process ran on this machine and is gone is
taken over at once: each process holds a lock on a file named by its token in the machine's
temporary folder while it lives, and a file found here and not locked is a dead holder's
(a holder elsewhere, another machine or a container with its own /tmp, leaves no file here,
and its lease is waited out). A second writer waits (`wait=True`) or fails naming the
holder and since when. Leases are re-entrant within a thread: `update` holds the table's
and the index's while the extract and the build it runs take them again.
"""

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import posixpath
import re
import socket
import tempfile
import threading
import time
import uuid

from delf_index.errors import UserError
from delf_index.runtime import renewal, storage

LEASE = "_lease.json"
POLL_SECONDS = 2.0
# a lock file per live process of this user that took a lease (another user's holders are waited out)
LOCKS = os.path.join(tempfile.gettempdir(), f"delf-index-leases-{os.getuid()}")
_process = {}  # this process's token and its locked file, made on its first lease
_process_guard = threading.Lock()


class LeaseHeld(UserError):
    """Another writer holds the lease; the message names it and since when."""


class LeaseLost(UserError):
    """This writer's lease expired and another writer took it: nothing may be committed."""


def seconds():
    return float(os.environ.get("DELF_INDEX_LEASE_SECONDS", "300"))


def utc(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(holder):
    """One line about a lease's holder, for messages."""
    left = holder["expires"] - time.time()
    return (
        f"`{holder['holder']}` on {holder['host']} (pid {holder['pid']}) since {utc(holder['since'])}, "
        f"lease {f'expires in {left:.0f} s' if left > 0 else 'expired'}"
    )


class Lease:
    def __init__(self, root, holder, ttl=None):
        self.uri = posixpath.join(root.rstrip("/"), LEASE)
        self.root, self.ttl = root.rstrip("/"), ttl or seconds()
        now = time.time()
        self.record = {
            "id": uuid.uuid4().hex,
            "holder": holder,
            "owner": process_token(),
            "host": socket.gethostname(),  # host and pid: for messages only
            "pid": os.getpid(),
            "since": now,
            "expires": now + self.ttl,
            "released": False,
        }
        self.token, self.lost, self.depth = None, None, 0
        self._renewal = None

    # -- taking and giving back -------------------------------------------------------------
    def acquire(self, wait=False, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while True:
            data, token = storage.read_versioned(self.uri)
            current = _parse(data)
            if current is None or _free(current):
                self.record["expires"] = time.time() + self.ttl
                try:
                    self.token = storage.write_if(self.uri, _dump(self.record), token)
                except storage.PreconditionFailed:
                    continue  # another writer took it meanwhile: look again
                self._renewal = renewal.Renewal(self._renew, self.ttl / 4, f"lease {self.uri}").start()
                return self
            if not wait or (deadline is not None and time.time() > deadline):
                raise LeaseHeld(
                    f"{self.root} is being written by {describe(current)}: pass --wait to wait for it, or stop that "
                    "job (a crashed holder's lease expires by itself)"
                )
            time.sleep(POLL_SECONDS)

    def release(self):
        if self._renewal is not None:
            self._renewal.stop()
        if self.lost is None:
            with contextlib.suppress(storage.PreconditionFailed, OSError):
                storage.write_if(self.uri, _dump({**self.record, "released": True}), self.token)

    # -- while held ------------------------------------------------------------------------
    def _renew(self):
        """Extend the lease by its time to live; False once another writer took it (`lost`
        names that writer). A store hiccup (OSError) is the Renewal's: it tries again."""
        self.record["expires"] = time.time() + self.ttl
        try:
            self.token = storage.write_if(self.uri, _dump(self.record), self.token)
        except storage.PreconditionFailed:
            data, _ = storage.read_versioned(self.uri)
            self.lost = _parse(data) or {"holder": "nobody (the lease object is gone)"}
            return False
        return True

    def check(self):
        """Raise LeaseLost unless this writer still holds the lease (call it right before a commit)."""
        data, _ = storage.read_versioned(self.uri)
        current = _parse(data)
        if self.lost is None and (current is None or current.get("id") != self.record["id"]):
            self.lost = current or {"holder": "nobody (the lease object is gone)"}
        if self.lost is not None:
            who = describe(self.lost) if "host" in self.lost else self.lost["holder"]
            raise LeaseLost(
                f"this job's lease on {self.root} was lost to {who} (did the job stall past its {self.ttl:.0f} s "
                "lease?): nothing was committed; run it again"
            )


_held = threading.local()  # lease uri -> Lease of this thread (re-entrant in one thread, exclusive across)


@contextlib.contextmanager
def writing(root, holder, wait=False, timeout=None):
    """Hold the lease of `root` for the block (see the module's docstring); yields the Lease."""
    uri = posixpath.join(root.rstrip("/"), LEASE)
    held = _held.__dict__
    lease = held.get(uri)
    if lease is None:
        lease = held[uri] = Lease(root, holder).acquire(wait, timeout)
    lease.depth += 1
    try:
        yield lease
    finally:
        lease.depth -= 1
        if lease.depth == 0:
            held.pop(uri, None)
            lease.release()


def process_token():
    """This process's random token; the first call also creates and locks its file in LOCKS,
    which the lock keeps marked alive until the process ends (a kill included)."""
    with _process_guard:
        if _process.get("pid") != os.getpid():  # first use, or a forked child: a token of its own
            token, handle = uuid.uuid4().hex, None
            try:
                os.makedirs(LOCKS, exist_ok=True)
                _sweep()
                handle = open(os.path.join(LOCKS, token), "w")
                fcntl.flock(handle, fcntl.LOCK_EX)
                atexit.register(_forget, handle.name)
            except OSError:  # no writable temporary folder: its leases are only waited out
                pass
            _process.update(pid=os.getpid(), token=token, handle=handle)
        return _process["token"]


def _forget(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def _sweep():
    """Delete the lock files of processes that ended (killed: no exit handler ran) longer ago
    than a lease lives: any lease of theirs has expired, the file proves nothing more."""
    for name in os.listdir(LOCKS):
        path = os.path.join(LOCKS, name)
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(path) > 2 * seconds() and _gone(name):
                _forget(path)


def _free(record):
    """A lease nobody holds: released, expired (not renewed in time), or its holder's process
    ran on this machine and is gone."""
    if record.get("released") or record.get("expires", 0) < time.time():
        return True
    return _gone(record.get("owner"))


def _gone(token):
    """Whether the process of `token` ran on this machine and ended: its lock file is here and
    nobody holds its lock. (No file: a process elsewhere, or a lease of an earlier delf-index.)"""
    if not isinstance(token, str) or not re.fullmatch(r"[0-9a-f]{32}", token):
        return False
    path = os.path.join(LOCKS, token)
    try:
        handle = open(path)
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: the process lives (this one's own, from another thread, too)
            return False
        return True


def _parse(data):
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:  # a torn or foreign object: treat it as free, the conditional write settles it
        return {"released": True}


def _dump(record):
    return json.dumps(record, sort_keys=True).encode()
