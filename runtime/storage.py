"""Object storage through fsspec: gs://, s3://, local paths, and anything else fsspec knows.

Every read and write of delf-index goes through this module, so that the backends are
configured in one place (`configure`, called on first use), transient failures end in one
error that names the operation (`retrying`: gcsfs and s3fs retry each request themselves,
other filesystems are retried here), small objects are replaced only if nobody else
replaced them first (`read_versioned`, `write_if`: generation match on GCS, ETag match on S3,
a lock file locally), and folders move between a store and local disk the same way
(`upload_folder`; runtime/cache.py fetches them).
"""

import errno
import hashlib
import os
import posixpath
import uuid

import fsspec
import pyarrow.parquet as pq
import tenacity
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
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if _precondition_failure(error):  # a conditional write lost: trying again cannot win
        return False
    code = getattr(error, "code", None) or getattr(error, "status", None)
    if isinstance(code, int):
        return code in (408, 429) or code >= 500
    return isinstance(error, (OSError, TimeoutError)) or "Timeout" in type(error).__name__


# Backends that retry each request themselves: gcsfs 6 times, with backoff up to 32 s, on 408,
# 429, 5xx and broken connections (gcsfs/retry.py); s3fs 5 times on timeouts, throttling and
# broken reads (s3fs/core.py, _error_wrapper), above botocore's own retries of 5xx.
RETRYING_BACKENDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs"}


def retrying(operation, what, uri, attempts=None):
    """Run `operation()`, an access to `uri`, and turn a transient failure that outlasted the
    retries into a StorageError that says what failed. On gs:// and s3:// the backend has
    retried each request already, so the operation runs once; on other filesystems (local
    disks and mounts, other fsspec backends) tenacity retries it with exponential backoff,
    DELF_INDEX_IO_ATTEMPTS times in all (default 3)."""
    backend = RETRYING_BACKENDS.get(uri.split("://", 1)[0]) if "://" in uri else None
    attempts = 1 if backend else attempts or int(os.environ.get("DELF_INDEX_IO_ATTEMPTS", "3"))
    policy = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=1, max=30),
        retry=tenacity.retry_if_exception(transient),
        reraise=True,
    )
    try:
        return policy(operation)
    except Exception as e:
        if not transient(e):
            raise
        tries = f"{backend}'s retries" if backend else f"{attempts} attempts"
        raise StorageError(f"{what} failed after {tries}: {type(e).__name__}: {e}") from e


def read_bytes(uri):
    """The whole content of one object or file, as it is now: one GET, not pinned to what this
    process's listing cache knows of it (s3fs would refuse an object rewritten since, "file
    expired", on every retry)."""
    if is_local(uri):
        path = local_path(uri)

        def read():
            with open(path, "rb") as f:
                return f.read()

    else:
        fs, path = filesystem(uri)

        def read():
            return fs.cat_file(path)

    return retrying(read, f"reading {uri}", uri)


# -- small objects replaced only by the writer that read them ------------------------------------
class PreconditionFailed(Exception):
    """A conditional write found the object other than the writer last read it."""


def uncached_filesystem(uri):
    """(filesystem, path) with fsspec's listing cache of `uri`'s folder dropped: another process
    may have written there since this one listed it."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(posixpath.dirname(path))
    fs.invalidate_cache(path)
    return fs, path


def read_versioned(uri):
    """(content, token) of a small object, or (None, None) when there is none. `token` names the
    version read (generation on GCS, ETag on S3, inode and mtime locally): `write_if` replaces
    the object only while it is still that version. The token is taken before the content, so
    the content is that version or a newer one, and a write based on it can only fail, never
    overwrite a version its writer has not seen."""
    if is_local(uri):
        path = local_path(uri)
        try:
            token = _local_token(path)
            with open(path, "rb") as f:
                return f.read(), token
        except FileNotFoundError:
            return None, None
    fs, path = uncached_filesystem(uri)
    try:
        info = retrying(lambda: fs.info(path), f"reading {uri}", uri)
        token = _remote_token(fs, info)
        return retrying(lambda: fs.cat_file(path), f"reading {uri}", uri), token
    except FileNotFoundError:
        return None, None


def write_if(uri, data, token=None):
    """Write `data` to `uri` if the object is still the version `token` (`read_versioned`'s), or,
    with token None, only if there is no object yet; returns the new token. Raises
    PreconditionFailed when another writer got there first. On GCS this sends
    ifGenerationMatch, on S3 If-Match / If-None-Match; locally a lock file serialises the
    check and the rename."""
    if is_local(uri) and token is None:  # a hard link is created only where nothing is
        path = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise PreconditionFailed(f"{uri} exists already") from e
        finally:
            os.remove(tmp)
        return _local_token(path)
    if is_local(uri):
        path = local_path(uri)
        with FileLock(path + ".lock"):
            current = _local_token(path) if os.path.exists(path) else None
            if current != token:
                raise PreconditionFailed(f"{uri} is at {current}, not {token}")
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return _local_token(path)
    fs, path = uncached_filesystem(uri)
    protocol = protocol_of(fs)
    try:
        if protocol == "gs" and token is not None:
            _gcs_put_if_generation(fs, path, data, token)
        elif protocol in ("gs", "s3") or token is None:
            kwargs = {"IfMatch": token} if protocol == "s3" and token is not None else {}
            fs.pipe_file(path, data, mode="create" if token is None else "overwrite", **kwargs)
        else:
            raise StorageError(f"conditional writes are not supported on {protocol}:// ({uri})")
    except FileExistsError as e:
        raise PreconditionFailed(f"{uri} exists already") from e
    except Exception as e:
        if _precondition_failure(e):
            raise PreconditionFailed(f"{uri} changed since it was read ({type(e).__name__}: {e})") from e
        raise
    fs.invalidate_cache(path)
    return _remote_token(fs, fs.info(path))


def _local_token(path):
    stat = os.stat(path)
    return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"


def _remote_token(fs, info):
    return str(info.get("generation") if protocol_of(fs) == "gs" else info.get("ETag") or info.get("etag"))


def _precondition_failure(error):
    code = getattr(error, "code", None) or getattr(error, "status", None)
    text = str(error)
    return (
        code == 412
        or "PreconditionFailed" in text
        or "pre-conditions you specified did not hold" in text
        or (isinstance(error, OSError) and error.errno == errno.EINVAL and "condition" in text)
    )


def _gcs_put_if_generation(fs, path, data, generation):
    """One media upload that GCS accepts only while the object is at `generation` (gcsfs's own
    uploads send a precondition only to create)."""
    bucket, key, _ = fs.split_path(path)
    fs.call(
        "POST",
        f"{fs._location}/upload/storage/v1/b/{bucket}/o",
        uploadType="media",
        name=key,
        ifGenerationMatch=str(generation),
        headers={"Content-Type": "application/octet-stream"},
        data=data,
        json_out=True,
    )


# -- files and folders between a store and local disk ------------------------------------------
def sha256_of(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_parquet_rows(uri):
    """All rows of the Parquet files in folder `uri`, in name order, as dicts: small tables
    written whole, such as a match's pairs, clusters and label reports."""
    fs, folder = filesystem(uri)
    rows = []
    for path in sorted(fs.glob(posixpath.join(folder, "*.parquet"))):
        with open_file(with_protocol(fs, path), "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


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
    retrying(lambda: fs.pipe_file(path, data), f"writing {uri}", uri)


def remove(uri):
    """Delete a file or folder (recursively); nothing when it is not there."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        retrying(lambda: fs.rm(path, recursive=True), f"removing {uri}", uri)


def download(uri, target):
    """Copy one object to the local path `target` through a temporary file renamed into place
    (looked up afresh: a listing this process cached may predate the object)."""
    fs, path = uncached_filesystem(uri)
    tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        retrying(lambda: fs.get_file(path, tmp), f"downloading {uri}", uri)
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
        retrying(lambda s=source, t=target: fs.put_file(s, t), f"uploading {target}", uri)


def delta_options(uri):
    """delta-rs's storage options for `uri`, from the environment the fsspec backends read:
    delta-rs talks to the store itself (object_store), not through fsspec. On S3 commits use
    conditional puts (If-None-Match), so concurrent writers need no lock service."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    options = {"conditional_put": "etag"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    return options
