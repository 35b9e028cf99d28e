"""The codebooks (`delf-index fit`) and the index artifact (`delf-index build`) on any fsspec
store: writing, publishing, checking and loading them. What the folders hold is in
schemas/artifact.py.

An index is a folder of immutable versions and a log whose newest entry names the current
one. A build or append writes a complete new version, then creates the next log entry with
a conditional write (create-if-absent on GCS, S3 and local disks), so readers load either
the old version or the new, never a mixture; an interrupted build changes nothing they see,
and of two writers that planned on the same version only the first publishes. Remote
folders are loaded from a bounded, content-addressed local cache (runtime/cache.py).
"""

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import uuid

import faiss
import numpy as np
import pyarrow.parquet as pq

from delf_index.errors import UserError
from delf_index.indexing import asmk, expansion
from delf_index.indexing import pca as pca_lib
from delf_index.runtime import cache, console, lease, storage
from delf_index.schemas.artifact import (
    ARTIFACT_FORMAT,
    ARTIFACT_READS,
    CODEBOOKS_FORMAT,
    CODEBOOKS_VERSION,
    FEATURE_BITS,
    POINTER,
    STAGING,
    VERSIONS,
)
from delf_index.version import __version__

WORDS_FILE = "asmk_words.npy"
log = logging.getLogger(__name__)


class ArtifactError(UserError):
    """An artifact or codebooks folder that cannot be used as it is; the message says why and what to do."""


def feature_ids(image_id, count):
    return (np.int64(image_id) << FEATURE_BITS) | np.arange(count, dtype=np.int64)


def split_ids(ids):
    ids = np.asarray(ids, np.int64)
    return ids >> FEATURE_BITS, ids & ((1 << FEATURE_BITS) - 1)


def pack_geometry(x, y, scale):
    """[N, 3] uint16: x and y rounded to pixels, scale as float16 bits (range checked by the build)."""
    out = np.empty((len(x), 3), np.uint16)
    out[:, 0] = np.rint(x)
    out[:, 1] = np.rint(y)
    out[:, 2] = np.asarray(scale, np.float16).view(np.uint16)
    return out


def unpack_geometry(rows):
    """[N, 3] uint16 -> (xy [N, 2] float32, scale [N] float32)."""
    rows = np.asarray(rows)
    return rows[:, :2].astype(np.float32), rows[:, 2].copy().view(np.float16).astype(np.float32)


def file_entries(folder, names):
    return {
        n: {"sha256": storage.sha256_of(os.path.join(folder, n)), "bytes": os.path.getsize(os.path.join(folder, n))}
        for n in names
    }


# -- codebooks --------------------------------------------------------------------------------
def write_codebooks(uri, pca, trained, info, words=None):
    """Save PCA + trained index (+ ASMK word centroids) + codebooks.json (info: fingerprint,
    parameters, sample stats)."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "pca.npz"), "wb") as f:
            f.write(pca_lib.pca_to_bytes(pca))
        faiss.write_index(trained, os.path.join(tmp, "trained.faiss"))
        names = ["pca.npz", "trained.faiss"]
        if words is not None:
            np.save(os.path.join(tmp, WORDS_FILE), np.ascontiguousarray(words, np.float32))
            names.append(WORDS_FILE)
        manifest = {
            "format": CODEBOOKS_FORMAT,
            "format_version": CODEBOOKS_VERSION,
            **info,
            "delf_index_version": __version__,
            "files": file_entries(tmp, names),
        }
        with open(os.path.join(tmp, "codebooks.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        storage.upload_folder(tmp, uri, names + ["codebooks.json"])
    return manifest


def read_folder_manifest(folder, name, expected_format, expected_version):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise ArtifactError(f"{folder} has no {name}: not a finished {expected_format} folder (did the job complete?)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != expected_format:
        raise ArtifactError(f"{path} is a {manifest.get('format')!r}, expected {expected_format!r}")
    readable = expected_version if isinstance(expected_version, tuple) else (expected_version,)
    if manifest.get("format_version") not in readable:
        raise ArtifactError(
            f"{path} has format version {manifest.get('format_version')}; this delf-index reads version "
            f"{' or '.join(map(str, readable))}. Rebuild it with this version (delf-index fit / build)"
        )
    return manifest


def verify_files(folder, manifest):
    """Refuse missing, truncated or altered files, naming them. Each file is hashed once: the
    cache's files are verified when fetched, a local folder's digests are remembered
    (runtime/cache.py, `verified_sha256`)."""
    bad, present = [], []
    for name, entry in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            bad.append(f"{name} is missing")
        elif os.path.getsize(path) != entry["bytes"]:
            bad.append(f"{name} has {os.path.getsize(path)} bytes, expected {entry['bytes']} (truncated?)")
        else:
            present.append(name)
    digests = cache.verified_sha256(folder, present)
    bad += [
        f"{name} does not match its sha256 (altered or corrupted)"
        for name in present
        if digests[name] != manifest["files"][name]["sha256"]
    ]
    if bad:
        raise ArtifactError(f"{folder}: " + "; ".join(bad) + ". Rebuild it, or copy it again from its source")


def codebooks_folder(uri):
    """(local folder, manifest name, manifest) of a codebooks folder, or of the current version
    of an index (whose pca.npz and trained.faiss are the codebooks it was built with)."""
    if is_index(uri):
        uri, name, expected = current_version(uri), "manifest.json", (ARTIFACT_FORMAT, ARTIFACT_READS)
    else:
        name, expected = "codebooks.json", (CODEBOOKS_FORMAT, CODEBOOKS_VERSION)
    folder = fetch_manifested(uri, name, expected[0])
    return folder, name, read_folder_manifest(folder, name, *expected)


def load_codebooks(uri, verify=True):
    """(pca, trained index, manifest) of a codebooks folder, or of an index's codebooks."""
    folder, _, manifest = codebooks_folder(uri)
    if verify:
        files = {n: e for n, e in manifest["files"].items() if n in ("pca.npz", "trained.faiss")}
        verify_files(folder, {"files": files})
    with open(os.path.join(folder, "pca.npz"), "rb") as f:
        pca = pca_lib.pca_from_bytes(f.read())
    return pca, faiss.read_index(os.path.join(folder, "trained.faiss")), manifest


def load_words(uri):
    """The ASMK word centroids [words, d] of a codebooks folder or an index, or None."""
    folder, _, manifest = codebooks_folder(uri)
    if WORDS_FILE not in manifest["files"]:
        return None
    verify_files(folder, {"files": {WORDS_FILE: manifest["files"][WORDS_FILE]}})
    return np.load(os.path.join(folder, WORDS_FILE), allow_pickle=False)


def fetch_manifested(uri, name, what):
    """The local folder of `uri` (cache.fetch_folder), with a clear error when it holds no
    manifest `name`."""
    try:
        return cache.fetch_folder(uri, name)
    except FileNotFoundError as e:
        raise ArtifactError(f"{uri} has no {name}: not a finished {what} folder (did the job complete?)") from e


def check_source(index, manifest, snap):
    """Refuse, naming both, a features table other than the one the index was built from, or
    an older version of it (a stale copy, a table restored from a backup), before any work.
    `snap` is a snapshot of the table (runtime/tables.py). Indexes built before tables had an
    id recorded are checked by the table's URI."""
    source = manifest.get("features") or {}
    if not source:
        return
    built = f"{index} was built from {source['uri']} version {source['table_version']}"
    if source.get("table_id") and source["table_id"] != snap.table_id:
        raise ArtifactError(
            f"{snap.uri} is another features table (id {snap.table_id}) than the one {built} (id "
            f"{source['table_id']}): check --features, or build a new index from it with --codebooks"
        )
    if not source.get("table_id") and storage.filesystem(source["uri"])[1] != storage.filesystem(snap.uri)[1]:
        raise ArtifactError(f"{snap.uri} is not the features table {built}: check --features")
    if snap.version < source["table_version"]:
        raise ArtifactError(
            f"{snap.uri} is at version {snap.version}, older than the one {built} (a stale copy, or a table restored "
            "from a backup?): point --features at the table the index follows"
        )


def check_fingerprint(expected, actual, what):
    if expected != actual:
        raise ArtifactError(
            f"{what} come from model {actual[:12]}, but the index/codebooks were made for model {expected[:12]}: "
            "extract them with the same model, or fit new codebooks for this model"
        )


# -- versions ---------------------------------------------------------------------------------
# An index is a folder of immutable versions and a log of which one is current:
#   _log/00000000000000000007.json   {"sequence", "version", "previous", "time", ...}: created
#                                     once, only if absent; the newest names the current version
#   versions/v000007-3f9a2c1e/       a complete version, uploaded before its log entry
#   _pins/<id>.json                   a long job's claim on a version, that pruning honours
# (indexes written before the log have a CURRENT object instead; they are read as before, and
# their first new version starts the log)
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


def read_file(version, manifest, name):
    """One file of a version, checked against its manifest (no other file fetched)."""
    data = storage.read_bytes(posixpath.join(version, name))
    entry = manifest["files"][name]
    if (len(data), hashlib.sha256(data).hexdigest()) != (entry["bytes"], entry["sha256"]):
        raise ArtifactError(f"{version}/{name} does not match its manifest (altered or corrupted): rebuild it")
    return data


def indexed_images(version, manifest):
    """(image_ids, runs, hidden rows) of a version, reading only its image table and hidden list:
    what an append plans with."""
    images = pq.read_table(io.BytesIO(read_file(version, manifest, "images.parquet")), columns=["image_id", "run"])
    hidden = np.load(io.BytesIO(read_file(version, manifest, "hidden.npy")), allow_pickle=False)
    return images.column("image_id").to_pylist(), images.column("run").to_pylist(), hidden


def read_images(uri):
    """(image_ids, uris, labels) of the images a query can find in the current version of an
    index, reading only its image table and hidden list."""
    version = current_version(uri)
    images = pq.read_table(io.BytesIO(storage.read_bytes(posixpath.join(version, "images.parquet"))))
    hidden = set(np.load(io.BytesIO(storage.read_bytes(posixpath.join(version, "hidden.npy")))).tolist())
    live = [row for row in range(images.num_rows) if row not in hidden]
    columns = [images.column(c).to_pylist() for c in ("image_id", "uri", "label")]
    return tuple([column[row] for row in live] for column in columns)


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
def pinned(uri, holder):
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
    match read one version on every worker for as long as they run): a pin object renewed by
    a thread, removed at the end; a crashed job's pin expires."""
    ttl = ttl or lease.seconds()
    target = posixpath.join(uri.rstrip("/"), PINS, f"{uuid.uuid4().hex}.json")

    def write():
        record = {"version": version, "holder": holder, "expires": time.time() + ttl}
        storage.write_bytes(target, json.dumps(record).encode())

    write()
    stop = threading.Event()

    def renew():
        while not stop.wait(ttl / 4):
            with contextlib.suppress(OSError):
                write()

    thread = threading.Thread(target=renew, name=f"pin {target}", daemon=True)
    thread.start()
    try:
        yield version
    finally:
        stop.set()
        thread.join()
        storage.remove(target)


# -- the index artifact ---------------------------------------------------------------------
class Artifact:
    """A loaded version of an index: faiss indexes memory-mapped, image table, geometry and
    the images hidden since they were indexed."""

    def __init__(self, folder, manifest, uri=None):
        self.folder, self.manifest, self.uri = folder, manifest, uri or folder
        self._in_use = cache.mark_in_use(folder)  # a cache folder in use is never evicted
        with open(os.path.join(folder, "pca.npz"), "rb") as f:
            self.pca = pca_lib.pca_from_bytes(f.read())
        files = manifest["files"]
        # k-NN voting's lists. IO_FLAG_ONDISK_SAME_DIR: index.ivfdata is found next to
        # index.faiss wherever the folder was copied; MMAP keeps the inverted lists out of RAM
        self.index = None
        if "index.faiss" in files:
            with console.c_output() as said:  # faiss announces the re-pointing on C's stdout
                self.index = faiss.read_index(
                    os.path.join(folder, "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
                )
            log.debug("faiss: %s", said[0].strip())
        # ASMK's inverted file (memory-mapped), word index and per-descriptor codes
        self.asmk, self.asmk_words, self.codes = None, None, None
        if "asmk_offsets.npy" in files:
            self.asmk = asmk.open_lists(folder)
            self.asmk_words = faiss.read_index(os.path.join(folder, "asmk_words.faiss"))
            # exact centroids for the residuals (the word index may hold them in float16)
            self.asmk_centroids = np.load(os.path.join(folder, WORDS_FILE), allow_pickle=False)
            self.codes = np.load(os.path.join(folder, "codes.npy"), mmap_mode="r")
            self.trained = faiss.read_index(os.path.join(folder, "trained.faiss"))
        self.global_index = faiss.read_index(os.path.join(folder, "global.faiss"))
        images = pq.read_table(os.path.join(folder, "images.parquet"))
        self.image_ids = images.column("image_id").to_pylist()
        self.uris = images.column("uri").to_pylist()
        self.labels = images.column("label").to_pylist()
        self.runs = images.column("run").to_pylist()
        self.sizes = np.stack([images.column("width").to_numpy(), images.column("height").to_numpy()], axis=1)
        self.num_features = images.column("num_features").to_numpy()
        self.geometry_offset = images.column("geometry_offset").to_numpy()
        self.geometry = np.load(os.path.join(folder, "geometry.npy"), mmap_mode="r")
        self.hidden = np.load(os.path.join(folder, "hidden.npy"), allow_pickle=False)
        self.live = np.ones(len(self.image_ids), bool)
        self.live[self.hidden] = False
        self.row_of = {image_id: row for row, image_id in enumerate(self.image_ids) if self.live[row]}
        # written by `delf-index match --augment`: the verified neighbour graph and the
        # neighbour-augmented global descriptors (indexing/expansion.py); an append drops them
        self.graph = expansion.read_graph(folder)
        dba = os.path.join(folder, expansion.DBA_FILE)
        self.dba_index = faiss.read_index(dba) if os.path.exists(dba) else None
        # the descriptors of hidden images are skipped inside faiss's search, so that the
        # neighbours and votes are those of an index built without them
        self.selector = None
        if len(self.hidden):
            ids = np.concatenate([feature_ids(row, self.num_features[row]) for row in self.hidden])
            hidden_ids = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            self.selector = faiss.IDSelectorNot(hidden_ids)
            self._keep_alive = hidden_ids  # IDSelectorNot holds a bare pointer to it

    @classmethod
    def load(cls, uri, verify=True, model_fingerprint=None):
        """Load the current version of an index (or a version folder); checks format, checksums
        and, when given, that it was built from `model_fingerprint`'s features. A version that
        vanished while it was being fetched (pruned after a newer one was published) is
        followed by reading the log once more, also when it vanished while it was being opened
        (a local version is read in place)."""
        for attempt in range(2):
            version = current_version(uri)
            try:
                folder = fetch_manifested(version, "manifest.json", ARTIFACT_FORMAT)
                manifest = read_folder_manifest(folder, "manifest.json", ARTIFACT_FORMAT, ARTIFACT_READS)
                if verify:
                    verify_files(folder, manifest)
                if model_fingerprint is not None:
                    check_fingerprint(manifest["model_fingerprint"], model_fingerprint, "query features")
                return cls.opened(folder, manifest, version)
            except (ArtifactError, FileNotFoundError) as e:
                if attempt or version == uri.rstrip("/") or current_version(uri) == version:
                    fs, path = storage.uncached_filesystem(uri.rstrip("/"))
                    if not fs.exists(path):  # a mistyped path, not an unfinished build
                        raise ArtifactError(f"no index at {uri}: check the path (--index)") from e
                    raise

    @classmethod
    def opened(cls, folder, manifest, version):
        try:
            return cls(folder, manifest, version)
        except RuntimeError as e:  # faiss refuses a damaged file it was asked to read unverified, or a pruned one
            if not os.path.exists(os.path.join(folder, "manifest.json")):
                raise FileNotFoundError(f"{folder} was removed while it was opened") from e
            raise ArtifactError(f"{folder}: cannot read the index ({e}); rebuild it") from e

    @property
    def num_rows(self):
        """Images in the files, hidden ones included (int ids are 0 .. num_rows - 1)."""
        return len(self.image_ids)

    def __len__(self):
        """Images that queries can find."""
        return len(self.row_of)

    @property
    def fingerprint(self):
        return self.manifest["model_fingerprint"]

    def reduced_descriptors(self, images):
        """{row: PCA-reduced descriptors [N, d]} of images (rows), decoded from their compact
        codes (an index with ASMK; what its verification matches against). One faiss call
        for all: each call wakes faiss's OpenMP threads, which costs ~10 ms after numpy's BLAS
        has run (measured; decoding one image's codes takes 25 us)."""
        counts = [int(self.num_features[row]) for row in images]
        codes = [
            self.codes[self.geometry_offset[row] : self.geometry_offset[row] + n] for row, n in zip(images, counts)
        ]
        dim = self.pca["components"].shape[0]
        decoded = self.trained.sa_decode(np.concatenate(codes)) if sum(counts) else np.zeros((0, dim), np.float32)
        return dict(zip(images, np.split(decoded, np.cumsum(counts)[:-1])))

    def geometry_of(self, image, features):
        """(xy [N, 2], scale [N]) of features (indices) of one image (row)."""
        rows = self.geometry[self.geometry_offset[image] + np.asarray(features, np.int64)]
        return unpack_geometry(rows)
