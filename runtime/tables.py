"""Reading the tables that `delf-index extract` writes (docs/tables.md).

An extract output holds the files of every run; the live rows are those that no row of the
superseded table names (an image that changed, disappeared or was retried in a later run).
`live_tables` says, per features file, which of its image_ids are no longer live; everything
that reads features for fit, build or queries goes through it.
"""

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from delf_index.errors import SchemaError
from delf_index.runtime import storage
from delf_index.runtime.features import Features
from delf_index.schemas.features import descriptors_of, read_table_metadata

TABLE_NOUNS = {"features": "feature", "errors": "error"}


def output_root(spec):
    """The extract output folder of a features spec (the folder itself, or the parent of its
    features/ folder); None for a glob or a folder of loose tables."""
    fs, path = storage.filesystem(spec)
    path = path.rstrip("/")
    if any(c in path for c in "*?["):
        return None
    if fs.isdir(posixpath.join(path, "features")):
        return storage.with_protocol(fs, path)
    if posixpath.basename(path) == "features" and fs.isdir(path):
        return storage.with_protocol(fs, posixpath.dirname(path))
    return None


def holds_feature_tables(spec):
    """True when `spec` names feature tables (an extract output, its features/ folder, or
    Parquet files whose metadata say so), not images or a manifest."""
    if output_root(spec) is not None:
        return True
    if not spec.lower().endswith(".parquet"):
        return False
    uris = list_tables(spec, required=False)
    try:
        return bool(uris) and table_info(uris[0])[1]["table"] == "features"
    except SchemaError:  # a Parquet manifest of images
        return False


def list_tables(spec, name="features", required=True):
    """Sorted URIs of the `name` Parquet files of `spec`: an extract output folder, its
    features/ folder, or a glob (features only)."""
    fs, path = storage.filesystem(spec)
    root = output_root(spec)
    if root is not None:
        paths = fs.glob(posixpath.join(storage.filesystem(root)[1], name, "*.parquet"))
    elif name != "features":
        paths = []
    elif any(c in path for c in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = fs.glob(posixpath.join(path, "*.parquet"))
    else:
        paths = [path] if fs.exists(path) else []
    if not paths and required:
        raise FileNotFoundError(f"no {TABLE_NOUNS.get(name, name)} tables at {spec}")
    return [storage.with_protocol(fs, p) for p in sorted(paths)]


def open_table(uri):
    """A pyarrow ParquetFile over fsspec (the caller keeps it open while reading)."""
    return pq.ParquetFile(storage.open_file(uri, "rb").open())


def table_info(uri):
    """(rows, delf_index metadata) of one table, reading only its footer."""
    f = open_table(uri)
    try:
        return f.metadata.num_rows, read_table_metadata(f.schema_arrow)
    except SchemaError as e:
        raise SchemaError(f"{uri}: {e}") from e


def same_model(infos, what="feature tables"):
    """The one model fingerprint of several tables' metadata, or a clear error; the tables must
    also share their extraction settings."""
    fingerprints, settings = {}, {}
    for uri, meta in infos:
        fingerprints.setdefault(meta["model_fingerprint"], []).append(uri)
        settings.setdefault(repr(sorted(meta["extractor"].items())), []).append(uri)
    if len(fingerprints) != 1:
        detail = "; ".join(f"{fp[:12]}: {len(uris)} files, e.g. {uris[0]}" for fp, uris in fingerprints.items())
        raise SchemaError(f"{what} come from {len(fingerprints)} different models ({detail}); use one model")
    if len(settings) != 1:
        examples = "; ".join(f"{len(uris)} files like {uris[0]}" for uris in settings.values())
        raise SchemaError(f"{what} were extracted with {len(settings)} different settings ({examples}); use one")
    return next(iter(fingerprints))


def superseded(spec):
    """{run: set of image_ids} of the rows that later runs replaced, from the superseded
    tables of the extract output of `spec` (empty for a glob or loose tables)."""
    out = {}
    for uri in list_tables(spec, "superseded", required=False):
        table = pq.read_table(storage.open_file(uri, "rb").open(), columns=["image_id", "run"])
        for image_id, run in zip(table.column("image_id").to_pylist(), table.column("run").to_pylist()):
            out.setdefault(run, set()).add(image_id)
    return out


def live_tables(spec):
    """[(uri, rows, metadata, stale image_ids)] of the features tables of `spec`: `rows` counts
    the live rows, stale ones are in the file but replaced by a later run."""
    replaced = superseded(spec)
    tables = []
    for uri in list_tables(spec):
        rows, meta = table_info(uri)
        stale = set()
        if replaced.get(meta["run"]):
            ids = pq.read_table(storage.open_file(uri, "rb").open(), columns=["image_id"]).column("image_id")
            stale = set(ids.to_pylist()) & replaced[meta["run"]]
        tables.append((uri, rows - len(stale), meta, frozenset(stale)))
    return tables


def iter_batches(uri, columns, rows=100, skip=frozenset()):
    """pyarrow Tables of at most `rows` rows of one file, in file order, without the rows of
    the image_ids in `skip`."""
    f = open_table(uri)
    wanted = None if columns is None else list(dict.fromkeys([*columns, "image_id"])) if skip else columns
    for batch in f.iter_batches(batch_size=rows, columns=wanted):
        table = pa.Table.from_batches([batch])
        if skip:
            table = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(sorted(skip), pa.string()))))
            if columns is not None:
                table = table.select(columns)
        if table.num_rows:
            yield table


def iter_features(spec, image_ids=None):
    """(image_id, Features) of every live row of the tables of `spec` (only `image_ids` when given)."""
    for uri, _, _, stale in live_tables(spec):
        for table in iter_batches(uri, None, skip=stale):
            for row in table.to_pylist():
                if image_ids is None or row["image_id"] in image_ids:
                    yield row["image_id"], Features.from_row(row)


def read_descriptors(spec):
    """All descriptors of the live rows [N, D] (stored dtype) and the row number of each one's image."""
    descriptors, image_of, offset = [], [], 0
    for uri, _, _, stale in live_tables(spec):
        for table in iter_batches(uri, ["num_features", "descriptors"], skip=stale):
            descriptors.append(descriptors_of(table))
            counts = np.asarray(table.column("num_features").to_numpy(), np.int64)
            image_of.append(np.repeat(np.arange(offset, offset + len(counts)), counts))
            offset += len(counts)
    return np.concatenate(descriptors), np.concatenate(image_of)
