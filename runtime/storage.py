"""Object storage through fsspec: gs://, s3://, local paths, and anything else fsspec knows.

Every read and write of delf-index goes through this module, so that the backends are
configured in one place (`configure`, called on first use), transient failures are retried
with the same policy everywhere (`retrying`), and folders move between a store and local
disk the same way (`upload_folder`, `fetch_folder`).
"""

import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid

import fsspec
from filelock import FileLock

from delf_index.errors import UserError

_configured = False


def configure():
    """Settings the fsspec backends need before their first use (idempotent).

    gcsfs probes every bucket for hierarchical namespaces, which stalls about a minute per
    bucket where the probe gets no answer (emulators, restricted networks), unless
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is false when gcsfs is imported. Users who want that
    feature set the variable to true themselves.
    """
    global _configured
    if not _configured:
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        _configured = True


def filesystem(uri):
    """(fsspec filesystem, path within it) of a URI or local path."""
    configure()
    return fsspec.core.url_to_fs(uri)


def open_file(uri, mode="rb", **kwargs):
    """An fsspec OpenFile (use it with `with`)."""
    configure()
    return fsspec.open(uri, mode, **kwargs)


def protocol_of(fs):
    return fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol


def with_protocol(fs, path):
    """The URI of `path` on `fs` (plain paths stay plain)."""
    protocol = protocol_of(fs)
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def is_local(uri):
    return "://" not in uri or uri.startswith("file://")


def local_path(uri):
    return uri[len("file://") :] if uri.startswith("file://") else uri


# -- retries -----------------------------------------------------------------------------------
class StorageError(UserError, OSError):
    """Object storage kept failing after retries; the message names the operation and cause."""


def transient(error):
    """Worth retrying: network trouble, timeouts, 408/429/5xx; not missing files or permissions."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    code = getattr(error, "code", None) or getattr(error, "status", None)
    if isinstance(code, int):
        return code in (408, 429) or code >= 500
    return isinstance(error, (OSError, TimeoutError)) or "Timeout" in type(error).__name__


def retrying(operation, what, attempts=None, delay=1.0):
    """Run `operation()`; retry transient failures with exponential backoff, then raise a
    StorageError that says what failed. fsspec backends (gcsfs, s3fs) also retry each request
    themselves; this covers whole operations (an upload cut short, a listing) and plain
    filesystems. DELF_INDEX_IO_ATTEMPTS sets the number of attempts (default 3)."""
    attempts = attempts or int(os.environ.get("DELF_INDEX_IO_ATTEMPTS", "3"))
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as e:
            if not transient(e):
                raise
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempts: {type(e).__name__}: {e}") from e
            time.sleep(delay * 2 ** (attempt - 1))


def read_bytes(uri):
    """The whole content of one object or file."""

    def read():
        with open_file(uri, "rb") as f:
            return f.read()

    return retrying(read, f"reading {uri}")


# -- files and folders between a store and local disk ------------------------------------------
def sha256_of(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(uri, data):
    """Replace the object or file at `uri` with `data` in one step: readers see the old
    content or the new, never a part (a single upload on object stores; a temporary file
    renamed over the target on local disks)."""
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri)
    retrying(lambda: fs.pipe_file(path, data), f"writing {uri}")


def remove(uri):
    """Delete a file or folder (recursively); nothing when it is not there."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        retrying(lambda: fs.rm(path, recursive=True), f"removing {uri}")


def download(uri, target):
    """Copy one object to the local path `target` through a temporary file renamed into place."""
    fs, path = filesystem(uri)
    tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        retrying(lambda: fs.get_file(path, tmp), f"downloading {uri}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def upload_folder(local_dir, uri, names):
    """Copy `names` from a local folder to `uri` (.json files last: they mark completion)."""
    fs, root = filesystem(uri)
    fs.makedirs(root, exist_ok=True)
    for name in sorted(names, key=lambda n: n.endswith(".json")):
        source, target = os.path.join(local_dir, name), posixpath.join(root, name)
        retrying(lambda s=source, t=target: fs.put_file(s, t), f"uploading {target}")


def default_cache_dir():
    return os.environ.get("DELF_INDEX_CACHE", os.path.expanduser("~/.cache/delf-index"))


class DigestMismatch(StorageError):
    """A downloaded file is not the one its manifest describes."""


def fetch_blob(uri, sha256, size, cache_dir=None):
    """A verified local copy of the object `uri`, whose content the caller knows by sha256:
    ``CACHE/blobs/<sha256>``. Downloaded to a temporary file, checked, renamed into place
    under a file lock, so that processes sharing the cache neither race nor ever see a file
    whose digest does not match; a blob already there is not fetched again."""
    blobs = os.path.join(cache_dir or default_cache_dir(), "blobs")
    path = os.path.join(blobs, sha256)
    if os.path.exists(path):
        return path
    os.makedirs(blobs, exist_ok=True)
    with FileLock(path + ".lock"):
        if os.path.exists(path):  # another process fetched it while this one waited
            return path
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            download(uri, tmp)
            actual, actual_size = sha256_of(tmp), os.path.getsize(tmp)
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


def fetch_folder(uri, manifest_name, cache_dir=None):
    """A local folder with the files that the manifest `uri`/`manifest_name` lists (its
    "files": {name: {"sha256", "bytes"}}): the folder itself when local, else a folder of
    the cache, one per manifest, linking to verified blobs (`fetch_blob`). Files the
    manifest does not list are not fetched."""
    if is_local(uri):
        return local_path(uri)
    cache_dir = cache_dir or default_cache_dir()
    data = read_bytes(posixpath.join(uri, manifest_name))
    try:
        files = json.loads(data)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{uri}/{manifest_name} is not a delf-index manifest ({type(e).__name__}: {e})") from e
    folder = os.path.join(cache_dir, "folders", hashlib.sha256(data).hexdigest()[:32])
    if os.path.exists(os.path.join(folder, manifest_name)):  # complete: the manifest goes in last
        return folder
    blobs = {
        name: fetch_blob(posixpath.join(uri, name), e["sha256"], e["bytes"], cache_dir) for name, e in files.items()
    }
    tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    for name, blob in blobs.items():
        try:
            os.link(blob, os.path.join(tmp, name))
        except OSError:  # a filesystem without hard links
            shutil.copyfile(blob, os.path.join(tmp, name))
    with open(os.path.join(tmp, manifest_name), "wb") as f:
        f.write(data)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process made the same folder first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
