"""The local cache of remote artifacts: content-addressed, verified once, bounded, shared by
the processes of a machine.

    CACHE/blobs/<sha256>          one verified copy of each file (downloaded, hashed, then
                                  renamed into place under a file lock)
    CACHE/folders/<key>/          one per manifest: hard links to its blobs, and the manifest,
                                  which goes in last (a folder with its manifest is complete)
    CACHE/folders/<key>.lock      a process that loaded the folder holds a shared lock on it;
                                  its modification time is the folder's last use
    CACHE/verified/<key>.json     local folders hashed once: per file (inode, size, mtime, sha256)

CACHE is DELF_INDEX_CACHE (default ~/.cache/delf-index). When the blobs pass the size limit
(`--cache-size`, DELF_INDEX_CACHE_SIZE, default 20G), the least recently used folders that no
process holds are removed, with the blobs no other folder links to.
"""

import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import uuid

from filelock import FileLock

from delf_index.errors import UserError
from delf_index.runtime import storage

DEFAULT_LIMIT = "20G"
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def default_dir():
    return os.environ.get("DELF_INDEX_CACHE", os.path.expanduser("~/.cache/delf-index"))


def parse_size(text):
    """Bytes of a size such as "20G", "512M" or "1000000"; 0 means no limit."""
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in UNITS else ""
    try:
        return int(float(value[: len(value) - len(unit)]) * UNITS[unit])
    except ValueError:
        raise UserError(f"cache size {text!r}: use bytes or a number with K, M, G or T (e.g. 20G)") from None


def limit():
    return parse_size(os.environ.get("DELF_INDEX_CACHE_SIZE", DEFAULT_LIMIT))


class DigestMismatch(storage.StorageError):
    """A downloaded file is not the one its manifest describes."""


def fetch_blob(uri, sha256, size, cache_dir=None):
    """A verified local copy of the object `uri`, whose content the caller knows by sha256:
    ``CACHE/blobs/<sha256>``. Downloaded to a temporary file, checked, renamed into place
    under a file lock, so that processes sharing the cache neither race nor ever see a file
    whose digest does not match; a blob already there is not fetched again."""
    blobs = os.path.join(cache_dir or default_dir(), "blobs")
    path = os.path.join(blobs, sha256)
    if os.path.exists(path):
        return path
    os.makedirs(blobs, exist_ok=True)
    with FileLock(path + ".lock"):
        if os.path.exists(path):  # another process fetched it while this one waited
            return path
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            storage.download(uri, tmp)
            actual, actual_size = storage.sha256_of(tmp), os.path.getsize(tmp)
            if (actual, actual_size) != (sha256, size):
                raise DigestMismatch(
                    f"{uri} has {actual_size} bytes, sha256 {actual[:12]}; its manifest says {size} bytes, sha256 "
                    f"{sha256[:12]}: the object was changed after its manifest was written (copy it again, or rebuild)"
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def fetch_folder(uri, manifest_name, cache_dir=None, size_limit=None):
    """A local folder with the files that the manifest `uri`/`manifest_name` lists (its
    "files": {name: {"sha256", "bytes"}}): the folder itself when local, else a folder of
    the cache, one per manifest, linking to verified blobs (`fetch_blob`). Files the manifest
    does not list are not fetched. Afterwards the cache is brought under its size limit."""
    if storage.is_local(uri):
        return storage.local_path(uri)
    cache_dir = cache_dir or default_dir()
    data = storage.read_bytes(posixpath.join(uri, manifest_name))
    try:
        files = json.loads(data)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise storage.StorageError(
            f"{uri}/{manifest_name} is not a delf-index manifest ({type(e).__name__}: {e})"
        ) from e
    folder = os.path.join(cache_dir, "folders", hashlib.sha256(data).hexdigest()[:32])
    if not os.path.exists(os.path.join(folder, manifest_name)):  # complete: the manifest goes in last
        _assemble(uri, manifest_name, data, files, folder, cache_dir)
    touch(folder)
    evict(cache_dir, limit() if size_limit is None else size_limit, keep=folder)
    return folder


def _assemble(uri, manifest_name, data, files, folder, cache_dir):
    tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    for name, entry in files.items():
        for attempt in range(3):  # an eviction may take a blob between its fetch and its link
            blob = fetch_blob(posixpath.join(uri, name), entry["sha256"], entry["bytes"], cache_dir)
            try:
                os.link(blob, os.path.join(tmp, name))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
            except OSError:  # a filesystem without hard links
                shutil.copyfile(blob, os.path.join(tmp, name))
                break
    with open(os.path.join(tmp, manifest_name), "wb") as f:
        f.write(data)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process made the same folder first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def is_cached(folder, cache_dir=None):
    parent = os.path.join(os.path.abspath(cache_dir or default_dir()), "folders")
    return os.path.dirname(os.path.abspath(folder)) == parent


def touch(folder):
    """Record a use of a cache folder (its lock file's modification time)."""
    with open(folder + ".lock", "a"):
        pass
    os.utime(folder + ".lock")


def mark_in_use(folder):
    """Keep a cache folder from eviction while the returned file is open (a shared lock);
    None for folders outside the cache."""
    if not is_cached(folder):
        return None
    handle = open(folder + ".lock", "a")  # noqa: SIM115 - held for the artifact's lifetime
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def evict(cache_dir, size_limit, keep=None):
    """Remove least recently used folders, and the blobs only they link to, until the blobs take
    at most `size_limit` bytes (0: no limit). A folder some process holds (`mark_in_use`) stays, and
    so does `keep`: the cache may then stay above its limit."""
    if not size_limit:
        return
    blobs, folders = os.path.join(cache_dir, "blobs"), os.path.join(cache_dir, "folders")
    with FileLock(os.path.join(cache_dir, "evict.lock")):
        total = _blob_bytes(blobs)
        if total <= size_limit or not os.path.isdir(folders):
            return
        candidates = [
            os.path.join(folders, n) for n in os.listdir(folders) if not n.endswith(".lock") and ".tmp-" not in n
        ]
        candidates.sort(key=lambda f: os.path.getmtime(f + ".lock") if os.path.exists(f + ".lock") else 0)
        for folder in candidates:
            if total <= size_limit:
                break
            if keep is not None and os.path.abspath(folder) == os.path.abspath(keep):
                continue
            total -= _remove_unheld(folder, blobs)


def _remove_unheld(folder, blobs):
    """Remove a folder nobody holds and the blobs only it linked to; the bytes freed."""
    with open(folder + ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        inodes = {os.stat(os.path.join(folder, n)).st_ino for n in os.listdir(folder)}
        shutil.rmtree(folder, ignore_errors=True)
        os.remove(folder + ".lock")
    freed = 0
    for name, stat in _blob_stats(blobs).items():
        if stat.st_ino in inodes and stat.st_nlink == 1:
            os.remove(os.path.join(blobs, name))
            freed += stat.st_size
    return freed


def _blob_stats(blobs):
    """{sha256: os.stat_result} of the blobs."""
    out = {}
    for name in os.listdir(blobs) if os.path.isdir(blobs) else ():
        if len(name) == 64:
            try:
                out[name] = os.stat(os.path.join(blobs, name))
            except FileNotFoundError:  # evicted meanwhile
                pass
    return out


def _blob_bytes(blobs):
    return sum(stat.st_size for stat in _blob_stats(blobs).values())


def verified_sha256(folder, names, cache_dir=None):
    """{name: sha256} of files of a folder, hashing a file only when it is not known already: a
    cache folder's files are blobs named by their verified digest; a local folder's digests
    are remembered per (inode, size, mtime) in CACHE/verified."""
    if is_cached(folder, cache_dir):
        blobs = {
            stat.st_ino: name for name, stat in _blob_stats(os.path.join(cache_dir or default_dir(), "blobs")).items()
        }
        out = {}
        for name in names:  # a hard link to a verified blob; hashed where the filesystem copied instead
            path = os.path.join(folder, name)
            out[name] = blobs.get(os.stat(path).st_ino) or storage.sha256_of(path)
        return out
    stamp = os.path.join(
        cache_dir or default_dir(),
        "verified",
        hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:32] + ".json",
    )
    try:
        with open(stamp) as f:
            known = json.load(f)
    except (FileNotFoundError, ValueError):
        known = {}
    out, changed = {}, False
    for name in names:
        path = os.path.join(folder, name)
        stat = os.stat(path)
        key = [stat.st_ino, stat.st_size, stat.st_mtime_ns]
        if known.get(name, [None])[:3] == key:
            out[name] = known[name][3]
        else:
            out[name] = storage.sha256_of(path)
            known[name], changed = key + [out[name]], True
    if changed:
        try:
            storage.write_bytes(stamp, json.dumps(known).encode())
        except OSError:  # a read-only cache: hash again next time
            pass
    return out
