"""Reading the feature tables that `delf-index extract` wrote (docs/tables.md)."""

import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import inputs  # noqa: F401  (sets the gcsfs environment before gcsfs loads)
from schemas.features import descriptors_of, read_table_metadata


def list_tables(spec):
    """Sorted URIs of the features Parquet files of `spec`: an extract output folder, its
    features/ folder, or a glob."""
    fs, path = fsspec.core.url_to_fs(spec)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
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
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in sorted(paths)]


def open_table(uri):
    """A pyarrow ParquetFile over fsspec (the caller keeps it open while reading)."""
    return pq.ParquetFile(fsspec.open(uri, "rb").open())


def table_info(uri):
    """(rows, delf_index metadata) of one table, reading only its footer."""
    f = open_table(uri)
    try:
        return f.metadata.num_rows, read_table_metadata(f.schema_arrow)
    except ValueError as e:
        raise ValueError(f"{uri}: {e}") from e


def same_model(infos, what="feature tables"):
    """The one model fingerprint of several tables' metadata, or a clear error."""
    fingerprints = {}
    for uri, meta in infos:
        fingerprints.setdefault(meta["model_fingerprint"], []).append(uri)
    if len(fingerprints) != 1:
        detail = "; ".join(f"{fp[:12]}: {len(uris)} files, e.g. {uris[0]}" for fp, uris in fingerprints.items())
        raise ValueError(f"{what} come from {len(fingerprints)} different models ({detail}); use one model")
    return next(iter(fingerprints))


def iter_batches(uri, columns, rows=100):
    """pyarrow Tables of at most `rows` rows of one file, in file order."""
    f = open_table(uri)
    for batch in f.iter_batches(batch_size=rows, columns=columns):
        yield batch_to_table(batch)


def batch_to_table(batch):
    return pa.Table.from_batches([batch])


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
