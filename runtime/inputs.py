"""Where images come from: globs of files, tar shards, manifests, on any fsspec filesystem.

`--input` forms (docs/pipelines.md):

- a glob or a directory of image files: ``gs://bucket/photos/**/*.jpg``, ``/data/photos``;
  image_id = path relative to the glob's fixed prefix (the directory before the first
  wildcard);
- tar shards, WebDataset / Google-Landmarks-v2 style: ``s3://bucket/shards/images_*.tar``
  (also .tar.gz, .tgz); members are streamed, never unpacked to disk; image_id = member name;
- a manifest, CSV or Parquet, with columns ``id``, ``uri`` (or ``url`` / ``path``; relative
  paths are relative to the manifest) and optionally ``label`` (or ``landmark_id``), the
  shape of Google-Landmarks-v2's train.csv; image_id = id.

Every function here is plain Python over fsspec (runtime/storage.py), so that the Beam steps
stay thin.
"""

import concurrent.futures
import csv
import hashlib
import os
import posixpath
import re
import tarfile

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from delf_index.errors import UserError
from delf_index.runtime import storage
from delf_index.runtime.images import IMAGE_EXTENSIONS

MANIFEST_EXTENSIONS = (".csv", ".csv.gz", ".parquet")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")


def input_kind(spec):
    """ "manifest", "tar" or "images" for an --input value."""
    lowered = spec.lower()
    if lowered.endswith(MANIFEST_EXTENSIONS):
        return "manifest"
    if lowered.endswith(TAR_EXTENSIONS):
        return "tar"
    return "images"


def _fixed_prefix(path):
    """The directory part of a path before its first wildcard."""
    match = _GLOB_CHARS.search(path)
    if not match:
        return path.rstrip("/")
    return posixpath.dirname(path[: match.start()])


def expand(spec, extensions):
    """Sorted [(path relative to the fixed prefix, full uri, size, version, content hash)] of
    files matching `spec` (`source_of`).

    A directory is searched recursively for files with the given extensions; a glob is
    taken as given (a text file named .jpg must still reach the failure records).
    """
    return storage.retrying(lambda: _expand(spec, extensions), f"listing {spec}", spec)


def _expand(spec, extensions):
    fs, path = storage.filesystem(spec)
    fs.invalidate_cache()  # a scheduled run lists what is there now, not what this process saw before
    if _GLOB_CHARS.search(path):
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
        root = _fixed_prefix(path)
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = {
            p: info
            for p, info in fs.find(path, detail=True).items()
            if p.lower().endswith(extensions) and not posixpath.basename(p).startswith(".")
        }
    elif fs.exists(path):
        root, found = posixpath.dirname(path), {path: fs.info(path)}
    else:
        raise FileNotFoundError(f"no such input: {spec}")
    return [
        (posixpath.relpath(p, root) if root else p, storage.with_protocol(fs, p), *source_of(info))
        for p, info in sorted(found.items())
    ]


def source_of(info):
    """(size, version, content hash) of an object, from an fsspec info dict. The version is
    what changes when an object is rewritten (the generation on GCS, the version id or ETag on
    S3, the modification time on local disks); the content hash is the store's digest of the
    bytes, where it keeps one (GCS's md5 or crc32c, S3's ETag), so that identical bytes
    uploaded again count as unchanged. Local files have none: a run hashes their bytes itself
    (`content_hash`, `hash_of`; pipelines/extract.py)."""
    version = next((str(info[k]) for k in VERSION_KEYS if info.get(k) not in (None, "")), None)
    content = None
    for key, name in (("md5Hash", "md5"), ("crc32c", "crc32c"), ("ETag", "etag"), ("etag", "etag")):
        if info.get(key) not in (None, ""):
            content = name + ":" + str(info[key]).strip('"')
            break
    return info.get("size"), version, content


VERSION_KEYS = ("generation", "VersionId", "ETag", "etag", "md5Hash", "mtime", "LastModified", "updated")


def content_hash(data):
    """The content hash a record keeps of bytes whose store gives none (local files): identical
    bytes written again (a copy, a restore from a backup) are unchanged, whatever their mtime."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_of(uri):
    """`content_hash` of the object at `uri`, read in 4 MiB blocks; None when it cannot be read
    (it went since it was listed: the run records that when it reads it)."""
    digest = hashlib.sha256()
    try:
        with storage.open_file(uri, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    except OSError:
        return None
    return "sha256:" + digest.hexdigest()


def stat(uri):
    """(size, version, content hash) of one object; raises when it cannot be read."""
    fs, path = storage.filesystem(uri)
    return source_of(storage.retrying(lambda: fs.info(path), f"reading the size of {uri}", uri))


def list_image_files(spec):
    """(image_id, uri, label=None, size, version, hash) of every image file of a glob or directory."""
    return [(rel, uri, None, *source) for rel, uri, *source in expand(spec, IMAGE_EXTENSIONS)]


def list_shards(spec):
    """(uri, size, version, hash) of the tar shards matching `spec`."""
    return [(uri, *source) for _, uri, *source in expand(spec, TAR_EXTENSIONS)]


def read_input_manifest(spec):
    """(image_id, uri, label, size, version, hash) rows of a CSV or Parquet manifest; checks
    its columns. Optional columns `size`, `version` and `hash` say what the objects are, so
    that incremental runs need not look them up; without them they are None."""
    with storage.open_file(spec, "rb", compression="infer") as f:
        table = pq.read_table(f) if spec.lower().endswith(".parquet") else pacsv.read_csv(f)
    names = set(table.column_names)
    id_col = next((c for c in ("id", "image_id") if c in names), None)
    uri_col = next((c for c in ("uri", "url", "path") if c in names), None)
    label_col = next((c for c in ("label", "landmark_id") if c in names), None)
    if id_col is None or uri_col is None:
        raise UserError(
            f"manifest {spec} needs an 'id' column and a 'uri' (or 'url', 'path') column; it has {sorted(names)}"
        )
    base = posixpath.dirname(spec)
    ids = [None if v is None else str(v) for v in table.column(id_col).to_pylist()]

    def column(name):
        values = table.column(name).to_pylist() if name in names else [None] * len(ids)
        return [None if v is None else v if name == "size" else str(v) for v in values]

    rows = []
    for image_id, uri, label, size, version, content in zip(
        ids,
        table.column(uri_col).to_pylist(),
        column(label_col or ""),
        column("size"),
        column("version"),
        column("hash"),
    ):
        if uri and "://" not in uri and not os.path.isabs(uri):
            uri = posixpath.join(base, uri) if base else uri
        rows.append((image_id, uri, label, size, version, content))
    return rows


def list_input(spec):
    """(items, unreadable) of an --input. Items are images (image_id, uri, label, size, version,
    hash) of a glob, directory or manifest, or tar shards (uri, size, version, hash). Manifest
    rows without a size are looked up, in parallel; `unreadable` holds (item, reason) of the
    rows whose lookup failed, for the run to record as failures (never as changed)."""
    kind = input_kind(spec)
    items = {"manifest": read_input_manifest, "tar": list_shards}.get(kind, list_image_files)(spec)
    if not items:
        raise UserError(f"--input {spec} matched nothing")
    unreadable = []
    if kind == "manifest":
        with concurrent.futures.ThreadPoolExecutor(STAT_THREADS) as pool:
            looked_up = list(pool.map(with_stat, items))
        items = [item for item, problem in looked_up if problem is None]
        unreadable = [(item, problem) for item, problem in looked_up if problem is not None]
    return items, unreadable


STAT_THREADS = 32  # object lookups at once for a manifest without sizes (latency-bound)


def with_stat(item):
    """(manifest item with the size, version and hash of its object, None), or (item, the
    reason it cannot be looked up). A manifest's own size column spares the lookup."""
    image_id, uri, label, size, version, content = item
    if size is None and uri:
        try:
            size, version, content = stat(uri)
        except (OSError, ValueError) as e:  # missing, forbidden, or the store kept failing
            return item, f"{type(e).__name__}: {e}"
    return (image_id, uri, label, size, version, content), None


def iter_tar(uri):
    """Stream (member name, bytes) of the image members of a tar shard.

    Members are read in order from the stream, never unpacked to disk. A shard that breaks
    off mid-way raises `TruncatedShard` after yielding the members before the break.
    """
    last = None
    with storage.open_file(uri, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    if not name.lower().endswith(IMAGE_EXTENSIONS):
                        continue  # WebDataset sidecars (.json, .cls, .txt)
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise TruncatedShard(f"member {name} is cut short ({len(data)} of {member.size} bytes)")
                    last = name
                    yield name, data
        except (tarfile.TarError, EOFError, OSError) as e:
            after = f" after member {last}" if last else ""
            raise TruncatedShard(f"unreadable tar stream{after}: {type(e).__name__}: {e}") from e


class TruncatedShard(Exception):
    """A tar shard that cannot be read to its end."""


def read_ids(spec):
    """image_ids of a CSV (an `image_id` or `id` column, else the first) or text file, one per
    line (any fsspec URI); or of a comma-separated list when `spec` names no file."""
    fs, path = storage.filesystem(spec)
    if not fs.exists(path):
        if spec.lower().endswith((".csv", ".txt")):
            raise FileNotFoundError(f"no such file: {spec}")
        return [i.strip() for i in spec.split(",") if i.strip()]
    rows = list(csv.reader(storage.read_bytes(spec).decode().splitlines()))
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    column = next((header.index(c) for c in ("image_id", "id") if c in header), None)
    body = rows[1:] if column is not None else rows
    return [row[column or 0].strip() for row in body if row and row[column or 0].strip()]
