"""An index's versions: the log that names the current one, publishing, pruning (keep, grace)
and pins. What the folders hold is in schemas/artifact.py.

An index is a folder of immutable versions and a log whose newest entry names the current
one. A build or append writes a complete new version, then creates the next log entry with
a conditional write (create-if-absent on GCS, S3 and local disks), so readers load either
the old version or the new, never a mixture; an interrupted build changes nothing they see,
and of two writers that planned on the same version only the first publishes::

    _log/00000000000000000007.json   {"sequence", "version", "previous", "time", ...}: created
                                     once, only if absent; the newest names the current version
    versions/v000007-3f9a2c1e/       a complete version, uploaded before its log entry
    _pins/<id>.json                  a long job's claim on a version, that pruning honours

Indexes written before the log have a CURRENT object instead; they are read as before, and
their first new version starts the log.
"""

import contextlib
import datetime
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid

from delf_index.errors import UserError
from delf_index.indexing.manifests import ArtifactError
from delf_index.runtime import lease, renewal, storage
from delf_index.schemas.artifact import POINTER, STAGING, VERSIONS

LOG, PINS = "_log", "_pins"
DEFAULT_GRACE = 600.0  # seconds a version stays after it stopped being current: readers may be loading it


def grace_seconds(grace=None):
    """`grace`, else DELF_INDEX_GRACE_SECONDS, else DEFAULT_GRACE (the chaos test shortens it so
    that its readers meet prunes)."""
    return float(os.environ.get("DELF_INDEX_GRACE_SECONDS", DEFAULT_GRACE)) if grace is None else grace


class IndexChanged(UserError):
    """Another writer published a version after this one planned on the index; nothing was published."""


def _log_names(uri):
    """(filesystem, log folder, entry names oldest first) of an index, listed afresh."""
    fs, path = storage.uncached_filesystem(posixpath.join(uri.rstrip("/"), LOG, "x"))
    folder = posixpath.dirname(path)
    names = sorted(posixpath.basename(p) for p in fs.ls(folder, detail=False)) if fs.exists(folder) else []
    return fs, folder, [n for n in names if re.fullmatch(r"\d{20}\.json", n)]


def log_entries(uri, newest_only=False):
    """The log entries of an index, oldest first (an index without a log: its CURRENT as one
    entry of sequence 0, or nothing); `newest_only`: the newest alone."""
    fs, folder, names = _log_names(uri)
    if not names:
        pointer = read_legacy_pointer(uri)
        return [{"sequence": 0, "version": pointer["version"], "time": 0.0}] if pointer else []
    names = names[-1:] if newest_only else names
    return [json.loads(storage.read_bytes(storage.with_protocol(fs, posixpath.join(folder, n)))) for n in names]


def current_entry(uri):
    """The newest log entry of an index (what readers load), or None when it has no version."""
    entries = log_entries(uri, newest_only=True)
    return entries[-1] if entries else None


def read_legacy_pointer(uri):
    fs, path = storage.uncached_filesystem(posixpath.join(uri.rstrip("/"), POINTER))
    return json.loads(storage.read_bytes(storage.with_protocol(fs, path))) if fs.exists(path) else None


def is_index(uri):
    """Whether `uri` is an index with versions, or a single version folder (a manifest.json)."""
    return current_entry(uri) is not None or storage_has(uri, "manifest.json")


def storage_has(uri, name):
    fs, path = storage.uncached_filesystem(posixpath.join(uri, name))
    return fs.exists(path)


def current_version(uri):
    """The URI of the version of `uri` that readers load: the one the newest log entry names,
    else `uri` itself (a version folder, or an index written before versions)."""
    entry = current_entry(uri)
    return posixpath.join(uri.rstrip("/"), VERSIONS, entry["version"]) if entry else uri.rstrip("/")


def current_manifest(uri):
    """The manifest of the current version of an index, read alone (no other file fetched)."""
    version = current_version(uri)
    try:
        return json.loads(storage.read_bytes(posixpath.join(version, "manifest.json")))
    except FileNotFoundError as e:
        raise ArtifactError(f"{uri} has no manifest.json: not a finished index (did the build complete?)") from e


def list_versions(uri):
    """Names of the version folders of an index, oldest first."""
    fs, path = storage.uncached_filesystem(posixpath.join(uri, VERSIONS, "x"))
    path = posixpath.dirname(path)
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if re.fullmatch(r"v\d{6}-[0-9a-f]{8}", n))


def new_version_name(base):
    """The name of the version that follows the log entry `base` (None: the first): its
    sequence number and a random part, so that two writers never share a folder."""
    number = (base["sequence"] if base else 0) + 1
    return f"v{number:06d}-{uuid.uuid4().hex[:8]}"


def version_work_folder(uri, version):
    """Where a build assembles a version: next to the versions on a local disk (so that
    publishing is a rename on one filesystem), else a local temporary folder."""
    if storage.is_local(uri):
        folder = os.path.join(storage.local_path(uri), VERSIONS, f".tmp-{version}")
    else:
        folder = os.path.join(tempfile.mkdtemp(prefix="delf-index-version-"), version)
    os.makedirs(folder)
    return folder


def place_version(folder, uri, version):
    """Move or upload the complete version assembled in the local `folder` to
    ``uri/versions/<version>`` (manifest.json last). Readers do not see it until
    `commit_version` names it."""
    target = posixpath.join(uri.rstrip("/"), VERSIONS, version)
    if storage.is_local(uri):
        os.rename(folder, storage.local_path(target))
    else:
        storage.upload_folder(folder, target, os.listdir(folder))
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)  # version_work_folder's temporary folder
    return target


def commit_version(uri, version, base, keep=None, grace=None, info=None, published=None):
    """Make the placed `version` the one readers load, if the index is still at the log entry
    `base` the writer planned on (None: no version yet): create the next log entry, only if it
    does not exist (a conditional write). When another writer created it first, the version
    is removed and IndexChanged raised: nothing was published. Files of earlier versions are
    never rewritten, so readers that mapped them keep working; `keep` prunes old versions
    afterwards (`prune`); `published` is called in between. Returns the log entry."""
    uri = uri.rstrip("/")
    target = posixpath.join(uri, VERSIONS, version)
    sequence = (base["sequence"] if base else 0) + 1
    entry = {
        **(info or {}),
        "sequence": sequence,
        "version": version,
        "previous": base["version"] if base else None,
        "manifest_sha256": hashlib.sha256(storage.read_bytes(posixpath.join(target, "manifest.json"))).hexdigest(),
        "time": time.time(),
    }
    entry_uri = posixpath.join(uri, LOG, f"{sequence:020d}.json")
    try:
        storage.write_if(entry_uri, json.dumps(entry, indent=1, sort_keys=True).encode(), None)
    except storage.PreconditionFailed as e:
        winner = json.loads(storage.read_bytes(entry_uri))
        if winner.get("version") != version:  # not this writer's own entry whose answer was lost
            storage.remove(target)
            raise IndexChanged(
                f"{uri} got version {winner.get('version')} ({winner.get('operation', 'another writer')}) after "
                f"this job planned on {entry['previous'] or 'an empty index'}: nothing was published; run it again"
            ) from e
    if published is not None:
        published()
    if keep:
        prune(uri, keep, grace)
    return entry


def publish_version(folder, uri, version, base, keep=None, grace=None, info=None):
    """`place_version`, then `commit_version`."""
    place_version(folder, uri, version)
    return commit_version(uri, version, base, keep, grace, info)


def prune(uri, keep, grace=None):
    """Remove old versions: all but the current one, the `keep` - 1 that were current before
    it, those that stopped being current less than `grace` seconds ago (a reader may be
    loading them), and those a live pin names (`pin`). A version folder that no log entry
    names (its build crashed before publishing) goes once it is `grace` seconds old. Log
    entries of removed versions go too; the newest stays. Run by the lease holder. `grace`:
    `grace_seconds`."""
    uri, grace = uri.rstrip("/"), grace_seconds(grace)
    entries = log_entries(uri)
    if not entries:
        return
    now = time.time()
    named = [e["version"] for e in entries]
    kept = set(list(dict.fromkeys(reversed(named)))[: max(keep, 1)])
    for older, newer in zip(entries, entries[1:]):
        if now - newer.get("time", 0) < grace:
            kept.add(older["version"])
    kept |= pinned_versions(uri)
    for name in list_versions(uri):
        if name in kept or (name not in named and folder_age(posixpath.join(uri, VERSIONS, name)) < grace):
            continue
        storage.remove(posixpath.join(uri, VERSIONS, name))
    for entry in entries[:-1]:
        if entry["version"] not in kept and entry["sequence"]:
            storage.remove(posixpath.join(uri, LOG, f"{entry['sequence']:020d}.json"))
    for leftover in work_leftovers(uri):
        if folder_age(leftover) >= grace:
            storage.remove(leftover)


def work_leftovers(uri):
    """What builds that died left: local work folders and staged shards."""
    out = []
    if storage.is_local(uri):
        folder = os.path.join(storage.local_path(uri), VERSIONS)
        out += (
            [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(".tmp-")]
            if os.path.isdir(folder)
            else []
        )
    fs, staging = storage.uncached_filesystem(posixpath.join(uri, STAGING, "x"))
    staging = posixpath.dirname(staging)
    if fs.exists(staging):
        out += [storage.with_protocol(fs, p) for p in fs.ls(staging, detail=False)]
    return out


def folder_age(uri):
    """Seconds since anything in a folder last changed (inf when it is gone)."""
    fs, path = storage.uncached_filesystem(posixpath.join(uri, "x"))
    path = posixpath.dirname(path)
    try:
        stamps = [_modified(info) for info in fs.find(path, detail=True).values()]
    except FileNotFoundError:
        stamps = []
    if storage.is_local(uri) and os.path.exists(path):
        stamps.append(os.path.getmtime(path))
    stamps = [t for t in stamps if t is not None]
    return time.time() - max(stamps) if stamps else float("inf")


def _modified(info):
    for key in ("mtime", "LastModified", "updated", "timeCreated"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        if isinstance(value, str):
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return float(value)
    return None


# -- pins: a long job's claim on the version it reads --------------------------------------------
def pinned_versions(uri):
    """Versions that an unexpired pin names."""
    fs, path = storage.uncached_filesystem(posixpath.join(uri, PINS, "x"))
    folder = posixpath.dirname(path)
    out = set()
    for name in fs.ls(folder, detail=False) if fs.exists(folder) else []:
        try:
            pin = json.loads(storage.read_bytes(storage.with_protocol(fs, name)))
        except (FileNotFoundError, ValueError):
            continue
        if pin.get("expires", 0) > time.time():
            out.add(pin["version"])
    return out


@contextlib.contextmanager
def pin_current(uri, holder):
    """The current version of the index `uri`, pinned for the block (`pin`); a version folder
    or an index without versions is yielded as it is."""
    entry = current_entry(uri)
    if entry is None:
        yield uri.rstrip("/")
        return
    with pin(uri, entry["version"], holder):
        yield posixpath.join(uri.rstrip("/"), VERSIONS, entry["version"])


@contextlib.contextmanager
def pin(uri, version, holder, ttl=None):
    """Keep `version` of the index `uri` from pruning while the block runs (batch search and
    match read one version on every worker for as long as they run): a pin object renewed
    (runtime/renewal.py), removed at the end; a crashed job's pin expires."""
    ttl = ttl or lease.seconds()
    target = posixpath.join(uri.rstrip("/"), PINS, f"{uuid.uuid4().hex}.json")

    def write():
        record = {"version": version, "holder": holder, "expires": time.time() + ttl}
        storage.write_bytes(target, json.dumps(record).encode())

    write()
    try:
        with renewal.Renewal(write, ttl / 4, f"pin {target}"):
            yield version
    finally:
        storage.remove(target)
