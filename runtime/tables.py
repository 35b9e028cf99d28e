"""Reading the feature tables that `delf-index extract` writes (docs/tables.md)."""

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_index.errors import SchemaError
from delf_index.runtime import storage
from delf_index.runtime.features import Features
from delf_index.schemas.features import descriptors_of, read_table_metadata


def list_tables(spec):
    """Sorted URIs of the features Parquet files of `spec`: an extract output folder, its
    features/ folder, or a glob."""
    fs, path = storage.filesystem(spec)
    if any(c in path for c in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(posixpath.join(path, "features")):
        paths = fs.glob(posixpath.join(path, "features", "*.parquet"))
    elif fs.isdir(path):
        paths = fs.glob(posixpath.join(path, "*.parquet"))
    else:
        paths = [path] if fs.exists(path) else []
    if not paths:
        raise FileNotFoundError(f"no feature tables at {spec}")
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
    """The one model fingerprint of several tables' metadata, or a clear error."""
    fingerprints = {}
    for uri, meta in infos:
        fingerprints.setdefault(meta["model_fingerprint"], []).append(uri)
    if len(fingerprints) != 1:
        detail = "; ".join(f"{fp[:12]}: {len(uris)} files, e.g. {uris[0]}" for fp, uris in fingerprints.items())
        raise SchemaError(f"{what} come from {len(fingerprints)} different models ({detail}); use one model")
    return next(iter(fingerprints))


def iter_batches(uri, columns, rows=100):
    """pyarrow Tables of at most `rows` rows of one file, in file order."""
    f = open_table(uri)
    for batch in f.iter_batches(batch_size=rows, columns=columns):
        yield pa.Table.from_batches([batch])


def iter_features(spec, image_ids=None):
    """(image_id, Features) of every row of the tables of `spec` (only `image_ids` when given)."""
    for uri in list_tables(spec):
        for table in iter_batches(uri, None):
            for row in table.to_pylist():
                if image_ids is None or row["image_id"] in image_ids:
                    yield row["image_id"], Features.from_row(row)


def read_descriptors(spec):
    """All descriptors of all tables [N, D] (stored dtype) and the row number of each one's image."""
    descriptors, image_of, offset = [], [], 0
    for uri in list_tables(spec):
        for table in iter_batches(uri, ["num_features", "descriptors"]):
            descriptors.append(descriptors_of(table))
            counts = np.asarray(table.column("num_features").to_numpy(), np.int64)
            image_of.append(np.repeat(np.arange(offset, offset + len(counts)), counts))
            offset += len(counts)
    return np.concatenate(descriptors), np.concatenate(image_of)
