"""Object storage through fsspec: gs://, s3://, local paths, and anything else fsspec knows.

Every read and write of delf-index goes through this module, so that the backends are
configured in one place (`configure`, called on first use), transient failures are retried
with the same policy everywhere (`retrying`), and folders move between a store and local
disk the same way (`upload_folder`, `fetch_folder`).
"""

import hashlib
import os
import posixpath
import time

import fsspec

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


# -- folders between a store and local disk ----------------------------------------------------
def upload_folder(local_dir, uri, names):
    """Copy `names` from a local folder to `uri` (.json files last: they mark completion)."""
    fs, root = filesystem(uri)
    fs.makedirs(root, exist_ok=True)
    for name in sorted(names, key=lambda n: n.endswith(".json")):
        source, target = os.path.join(local_dir, name), posixpath.join(root, name)
        retrying(lambda s=source, t=target: fs.put_file(s, t), f"uploading {target}")


def default_cache_dir():
    return os.environ.get("DELF_INDEX_CACHE", os.path.expanduser("~/.cache/delf-index"))


def fetch_folder(uri, cache_dir=None):
    """A local folder with the files of `uri`: the folder itself when local, else a cached
    copy (re-downloaded when the remote manifest changed)."""
    if is_local(uri):
        return local_path(uri)
    fs, root = filesystem(uri)
    local = os.path.join(cache_dir or default_cache_dir(), hashlib.sha256(uri.encode()).hexdigest()[:16])
    os.makedirs(local, exist_ok=True)
    for remote in fs.ls(root, detail=False):
        name = posixpath.basename(remote.rstrip("/"))
        target = os.path.join(local, name)
        if name.endswith(".json") or not os.path.exists(target) or os.path.getsize(target) != fs.size(remote):
            retrying(lambda r=remote, t=target: fs.get_file(r, t), f"downloading {remote}")
    return local
