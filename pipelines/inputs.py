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
    """Sorted [(path relative to the fixed prefix, full uri, size, version)] of files matching
    `spec` (`source_version`).

    A directory is searched recursively for files with the given extensions; a glob is
    taken as given (a text file named .jpg must still reach the errors table).
    """
    return storage.retrying(lambda: _expand(spec, extensions), f"listing {spec}")


def _expand(spec, extensions):
    fs, path = storage.filesystem(spec)
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
        (
            posixpath.relpath(p, root) if root else p,
            storage.with_protocol(fs, p),
            info.get("size"),
            source_version(info),
        )
        for p, info in sorted(found.items())
    ]


def source_version(info):
    """What changes when an object is rewritten, from an fsspec info dict: the generation on
    GCS, the version id or ETag on S3, the modification time on local disks."""
    for key in ("generation", "VersionId", "ETag", "etag", "md5Hash", "mtime", "LastModified", "updated"):
        if info.get(key) not in (None, ""):
            return str(info[key])
    return None


def stat(uri):
    """(size, version) of one object, or (None, None) when it cannot be read (reported later)."""
    try:
        fs, path = storage.filesystem(uri)
        info = storage.retrying(lambda: fs.info(path), f"reading the size of {uri}")
    except (OSError, ValueError):
        return None, None
    return info.get("size"), source_version(info)


def list_images(spec):
    """(image_id, uri, label=None, size, version) of every image file of a glob or directory."""
    return [(rel, uri, None, size, version) for rel, uri, size, version in expand(spec, IMAGE_EXTENSIONS)]


def list_shards(spec):
    """(uri, size, version) of the tar shards matching `spec`."""
    return [(uri, size, version) for _, uri, size, version in expand(spec, TAR_EXTENSIONS)]


def read_manifest(spec):
    """(image_id, uri, label, size, version) rows of a CSV or Parquet manifest; checks its
    columns. Optional columns `size` and `version` say what the objects are, so that
    incremental runs need not look them up; without them both are None."""
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
    uris = table.column(uri_col).to_pylist()
    labels = table.column(label_col).to_pylist() if label_col else [None] * len(ids)
    sizes = table.column("size").to_pylist() if "size" in names else [None] * len(ids)
    versions = table.column("version").to_pylist() if "version" in names else [None] * len(ids)
    rows = []
    for image_id, uri, label, size, version in zip(ids, uris, labels, sizes, versions):
        if uri and "://" not in uri and not os.path.isabs(uri):
            uri = posixpath.join(base, uri) if base else uri
        label = None if label is None else str(label)
        rows.append((image_id, uri, label, size, None if version is None else str(version)))
    return rows


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
