"""The features table that `delf-index extract` writes (docs/tables.md), version 3.

The table is a Delta Lake table (delta-rs): Parquet files plus a commit log, `_delta_log/`.
Each extract run, removal, restoration or compaction is one atomic commit; readers read a
snapshot (a table version). A row is a *record* about one image, written by one run:

==================  ===============  ==========================================================
column              type             meaning
==================  ===============  ==========================================================
image_id            string           stable id (manifest id, path relative to the input root, or
                                     tar member name)
status              string           extracted | failed | deleted | removed | restored (STATUSES)
run                 string           the run that wrote it; run ids sort in commit order
uri                 string           where the image was read
label               string           manifest label, if any
width, height       int32            original image size (pixels)
num_features        int32            N
x, y                list<float32>    keypoint column and row in original pixels, pixel centres
                                     at integers
scale               list<float32>    1 / pyramid scale (x size limit)
attention           list<float32>    score, descending
descriptors         binary           [N, D] L2-normalised local descriptors, row-major,
                                     little-endian float16 (or float32: the field's metadata
                                     ``delf_index.dtype`` and ``delf_index.dim`` say)
global_descriptor   list<float32>    [G] L2-normalised GeM descriptor
source_size         int64            bytes of the object read (of the tar shard for members)
source_version      string           the store's generation, ETag or mtime of that object
source_hash         string           its content hash where the store gives one
                                     ("md5:<hex>", "crc32c:<base64>")
stage               string           failed: list | read | decode | size | extract
error               string           failed: the reason; removed / restored: the note
warnings            string           extracted: what the image decoder warned of (e.g. corrupt
                                     EXIF data), one per line; null when nothing
==================  ===============  ==========================================================

What is live (`runtime/tables.py`, `resolve`): per image, its newest ``extracted`` record,
unless a ``deleted`` or ``removed`` record came after it, or its newest ``removed`` record
is newer than its newest ``restored`` one (a takedown: nothing of it is extracted, built or
appended until `delf-index restore`). A ``failed`` record never hides earlier features: an
image whose new attempt failed keeps them, and its newest failure is retried later.
Descriptors are binary because Delta Lake has no 16-bit float; the feature arrays stay
lists, so that SQL can unnest them.

Table properties (the Delta metadata's configuration): ``delf_index.table`` (features),
``delf_index.schema_version``, ``delf_index.model_fingerprint``, ``delf_index.model`` (the
model's metadata JSON), ``delf_index.extractor`` (the extraction settings JSON),
``delf_index.descriptor_dtype``. Each Parquet file also carries them in its key-value
metadata, with ``delf_index.run``. Tables of versions 1 and 2 (Parquet folders with a
superseded table) are converted by `delf-index migrate`.
"""

import json

import numpy as np
import pyarrow as pa

from delf_index.errors import SchemaError

SCHEMA_VERSION = 3
# extraction settings added after tables and indexes began recording theirs, with the value
# every earlier table was extracted with: one that lacks a setting was made with this value
LATER_SETTINGS = {"selection": "score"}
MIGRATES_VERSIONS = (1, 2)  # the Parquet folders before Delta Lake: `delf-index migrate` converts them
DESCRIPTOR_DTYPES = {"float16": np.float16, "float32": np.float32}
STATUSES = ("extracted", "failed", "deleted", "removed", "restored")
ERROR_STAGES = ("list", "read", "decode", "size", "extract", "search")
# the columns that say what a record is about; enough to resolve what is live and to plan a run
STATE_COLUMNS = ["image_id", "status", "run", "uri", "source_size", "source_version", "source_hash"]


def records_schema(descriptor_dtype="float16", descriptor_dim=0, metadata=None):
    """The Arrow schema of the records; the descriptors field's metadata names their dtype and
    dimension, so that a file read alone decodes them (`descriptors_of`)."""
    if descriptor_dtype not in DESCRIPTOR_DTYPES:
        raise SchemaError(f"descriptor_dtype {descriptor_dtype!r}: use one of {sorted(DESCRIPTOR_DTYPES)}")
    floats = pa.list_(pa.float32())
    described = {"delf_index.dtype": descriptor_dtype, "delf_index.dim": str(int(descriptor_dim))}
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("run", pa.string(), nullable=False),
            pa.field("uri", pa.string()),
            pa.field("label", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("num_features", pa.int32()),
            pa.field("x", floats),
            pa.field("y", floats),
            pa.field("scale", floats),
            pa.field("attention", floats),
            pa.field("descriptors", pa.binary(), metadata=described),
            pa.field("global_descriptor", floats),
            pa.field("source_size", pa.int64()),
            pa.field("source_version", pa.string()),
            pa.field("source_hash", pa.string()),
            pa.field("stage", pa.string()),
            pa.field("error", pa.string()),
            pa.field("warnings", pa.string()),
        ],
        metadata=metadata,
    )


def table_properties(model_fingerprint, model_metadata=None, extractor_conf=None, descriptor_dtype="float16"):
    """What identifies a features table: the model and settings its features come from."""
    return {
        "delf_index.table": "features",
        "delf_index.schema_version": str(SCHEMA_VERSION),
        "delf_index.model_fingerprint": model_fingerprint,
        "delf_index.model": json.dumps(model_metadata or {}, sort_keys=True),
        "delf_index.extractor": json.dumps(extractor_conf or {}, sort_keys=True),
        "delf_index.descriptor_dtype": descriptor_dtype,
    }


def read_properties(raw, where="the table"):
    """The delf_index properties of a table (its Delta configuration, or a Parquet file's
    key-value metadata), decoded; refuses other tables and versions."""
    raw = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()
    }
    if raw.get("delf_index.table") != "features":
        raise SchemaError(f"{where} is not a delf-index features table (no delf_index.table property)")
    version = int(raw.get("delf_index.schema_version", 0))
    if version in MIGRATES_VERSIONS:
        raise SchemaError(f"{where} is a version {version} table: convert it once with `delf-index migrate`")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{where} has table version {version}; this delf-index reads {SCHEMA_VERSION}: upgrade it")
    return {
        "schema_version": version,
        "model_fingerprint": raw["delf_index.model_fingerprint"],
        "model": json.loads(raw["delf_index.model"]),
        "extractor": complete_settings(json.loads(raw["delf_index.extractor"])),
        "descriptor_dtype": raw["delf_index.descriptor_dtype"],
    }


def complete_settings(settings):
    """Recorded extraction settings with the settings added since they were recorded filled in
    (LATER_SETTINGS), so that a table or index made before them compares equal to a run with
    the same extraction; None stays None."""
    return None if settings is None else {**LATER_SETTINGS, **settings}


def feature_record(image_id, uri, label, features, descriptor_dtype="float16", source=(None, None, None), warned=()):
    """An ``extracted`` record (a dict of Python/numpy values) from a delf_index.runtime
    Features; `source`: (size, version, content hash) of the object read; `warned`: the
    decoder's warnings. The writer fills in the run."""
    descriptors = np.ascontiguousarray(features.descriptors, DESCRIPTOR_DTYPES[descriptor_dtype])
    return {
        **_source(source),
        "image_id": image_id,
        "status": "extracted",
        "uri": uri,
        "label": label,
        "width": int(features.width),
        "height": int(features.height),
        "num_features": len(features),
        "x": features.x,
        "y": features.y,
        "scale": features.scale,
        "attention": features.attention,
        "descriptors": descriptors.astype(descriptors.dtype.newbyteorder("<"), copy=False).tobytes(),
        "global_descriptor": features.global_descriptor,
        "warnings": "\n".join(warned) or None,
    }


def failure_record(image_id, uri, stage, error, source=(None, None, None)):
    """A ``failed`` record: the image could not be listed, read, decoded or extracted."""
    assert stage in ERROR_STAGES, stage
    return {**_source(source), "image_id": image_id, "status": "failed", "uri": uri, "stage": stage,
            "error": str(error)[:2000]}  # fmt: skip


def status_record(image_id, status, uri=None, note=None, source=(None, None, None)):
    """A ``deleted``, ``removed`` or ``restored`` record."""
    assert status in ("deleted", "removed", "restored"), status
    return {**_source(source), "image_id": image_id, "status": status, "uri": uri, "error": note}


def _source(source):
    size, version, content_hash = (tuple(source) + (None, None, None))[:3]
    return {"source_size": size, "source_version": version, "source_hash": content_hash}


def rows_to_table(rows, schema):
    """An Arrow table from records (dicts); list columns are built from flat buffers."""
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        columns[field.name] = _column(values, field.type)
    return pa.table(columns, schema=schema)


def _column(values, arrow_type):
    if pa.types.is_list(arrow_type) and not pa.types.is_string(arrow_type.value_type):
        present = [v for v in values if v is not None]
        dtype = numpy_dtype(arrow_type.value_type)
        counts = [0 if v is None else len(v) for v in values]
        flat = np.concatenate([np.asarray(v, dtype).reshape(-1) for v in present]) if present else np.zeros(0, dtype)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())
        mask = pa.array([v is None for v in values]) if len(present) < len(values) else None
        return pa.ListArray.from_arrays(offsets, pa.array(flat, arrow_type.value_type), mask=mask)
    return pa.array(values, arrow_type)


def numpy_dtype(arrow_type):
    """The numpy dtype of a numeric Arrow type, without pyarrow's pandas-based mapping
    (workers have no pandas)."""
    assert pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type), arrow_type
    kind = "f" if pa.types.is_floating(arrow_type) else "i" if pa.types.is_signed_integer(arrow_type) else "u"
    return np.dtype(f"{kind}{arrow_type.bit_width // 8}")


def descriptor_layout(schema):
    """(numpy dtype, dimension) of the descriptors of a records schema (its field metadata)."""
    meta = schema.field("descriptors").metadata or {}
    try:
        return np.dtype(DESCRIPTOR_DTYPES[meta[b"delf_index.dtype"].decode()]).newbyteorder("<"), int(
            meta[b"delf_index.dim"]
        )
    except KeyError as e:
        raise SchemaError("the descriptors column does not say its dtype and dimension (not a version 3 table)") from e


def descriptors_of(table):
    """All local descriptors of the records of a table as one [sum N, D] numpy array, read in
    place from the binary column (no copy per row)."""
    dtype, dim = descriptor_layout(table.schema)
    column = table.column("descriptors").combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # an empty table
        return np.zeros((0, dim), dtype)
    _, offsets, data = column.buffers()
    bounds = np.frombuffer(offsets, np.int32, len(column) + 1, column.offset * 4)
    if data is None or bounds[-1] == bounds[0]:
        return np.zeros((0, dim), dtype)
    return np.frombuffer(data, dtype, (bounds[-1] - bounds[0]) // dtype.itemsize, bounds[0]).reshape(-1, dim)


def descriptor_array(value, num_features, dtype, dim):
    """The [N, D] descriptors of one record's binary value."""
    if not num_features:
        return np.zeros((0, dim), dtype)
    return np.frombuffer(value, dtype).reshape(num_features, dim)
