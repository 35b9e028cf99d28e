"""Arrow schemas of the tables `delf-index extract` writes (docs/tables.md).

Every run of extract writes its own files (the run id is in their names, their metadata and
a column); a later run supersedes an image's row when the image changed, disappeared or is
retried, and says so in the superseded table. The live rows are the rows no superseded row
names: what fit and build read.

Features table, one row per image (version 2):

==================  ===========================================  ==============================
column              type                                         meaning
==================  ===========================================  ==============================
image_id            string                                       stable id (manifest id, path
                                                                 relative to the input root, or
                                                                 tar member name)
uri                 string                                       where the image was read
label               string, nullable                             manifest label, if any
width, height       int32                                        original image size (pixels)
num_features        int32                                        N
x, y                list<float32> [N]                            keypoint column and row in
                                                                 original pixels, pixel centres
                                                                 at integers
scale               list<float32> [N]                            1 / pyramid scale (x size limit)
attention           list<float32> [N]                            score, descending
descriptors         list<fixed_size_list<float16|float32, D>>    L2-normalised local descriptors
global_descriptor   fixed_size_list<float32, G>                  L2-normalised GeM descriptor
run                 string                                       the extract run that wrote it
source_size         int64, nullable                              bytes of the object read (of
                                                                 the tar shard for members)
source_version      string, nullable                             the store's generation, ETag
                                                                 or mtime of that object
==================  ===========================================  ==============================

Errors table, one row per image that could not be processed: image_id, uri, stage
(list | read | decode | size | extract), error, run, source_size, source_version.

Superseded table, one row per (image_id, run) row that a later run replaced: image_id, run
(of the replaced row), by_run, reason (changed | removed | retried | recomputed).

File metadata (Parquet key-value) of all three: ``delf_index.table`` (features | errors |
superseded), ``delf_index.schema_version``, ``delf_index.run``,
``delf_index.model_fingerprint``, ``delf_index.model`` (the model's metadata JSON) and
``delf_index.extractor`` (the extraction settings JSON). Version 1 tables (one run, no run or
source columns) are still read; their run is "".
"""

import json

import numpy as np
import pyarrow as pa

from delf_index.errors import SchemaError

SCHEMA_VERSION = 2
READS_VERSIONS = (1, 2)
DESCRIPTOR_DTYPES = {"float16": (pa.float16(), np.float16), "float32": (pa.float32(), np.float32)}
ERROR_STAGES = ("list", "read", "decode", "size", "extract", "search")
SUPERSEDED_REASONS = ("changed", "removed", "retried", "recomputed")
RUN_COLUMNS = [
    pa.field("run", pa.string()),
    pa.field("source_size", pa.int64()),
    pa.field("source_version", pa.string()),
]


def features_schema(descriptor_dim, global_dim, descriptor_dtype="float16", metadata=None):
    arrow_type = DESCRIPTOR_DTYPES[descriptor_dtype][0]
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("uri", pa.string()),
            pa.field("label", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("num_features", pa.int32()),
            pa.field("x", pa.list_(pa.float32())),
            pa.field("y", pa.list_(pa.float32())),
            pa.field("scale", pa.list_(pa.float32())),
            pa.field("attention", pa.list_(pa.float32())),
            pa.field("descriptors", pa.list_(pa.list_(arrow_type, descriptor_dim))),
            pa.field("global_descriptor", pa.list_(pa.float32(), global_dim)),
            *RUN_COLUMNS,
        ],
        metadata=metadata,
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error", pa.string()),
        *RUN_COLUMNS,
    ]
)

SUPERSEDED_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("run", pa.string()),
        pa.field("by_run", pa.string()),
        pa.field("reason", pa.string()),
    ]
)


def table_metadata(table, model_fingerprint, model_metadata=None, extractor_conf=None, run=""):
    """Parquet key-value metadata identifying a table, its run and the model that produced it."""
    return {
        "delf_index.table": table,
        "delf_index.schema_version": str(SCHEMA_VERSION),
        "delf_index.run": run,
        "delf_index.model_fingerprint": model_fingerprint,
        "delf_index.model": json.dumps(model_metadata or {}, sort_keys=True),
        "delf_index.extractor": json.dumps(extractor_conf or {}, sort_keys=True),
    }


def read_table_metadata(schema):
    """The delf_index entries of a Parquet file's schema metadata, decoded; checks the version."""
    raw = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"delf_index.")}
    if "delf_index.table" not in raw:
        raise SchemaError("not a delf-index table (no delf_index.* metadata)")
    version = int(raw["delf_index.schema_version"])
    if version not in READS_VERSIONS:
        raise SchemaError(
            f"table schema version {version}, this delf-index reads versions {READS_VERSIONS}: "
            "re-extract with this version's `delf-index extract`"
        )
    return {
        "table": raw["delf_index.table"],
        "schema_version": version,
        "run": raw.get("delf_index.run", ""),
        "model_fingerprint": raw["delf_index.model_fingerprint"],
        "model": json.loads(raw["delf_index.model"]),
        "extractor": json.loads(raw["delf_index.extractor"]),
    }


def feature_row(image_id, uri, label, features, descriptor_dtype="float16", source=(None, None)):
    """A features-table row (dict of Python/numpy values) from a delf_index.runtime Features;
    `source`: (size, version) of the object read. The writer fills in the run."""
    return {
        "image_id": image_id,
        "uri": uri,
        "label": label,
        "width": int(features.width),
        "height": int(features.height),
        "num_features": len(features),
        "x": features.x,
        "y": features.y,
        "scale": features.scale,
        "attention": features.attention,
        "descriptors": features.descriptors.astype(DESCRIPTOR_DTYPES[descriptor_dtype][1]),
        "global_descriptor": features.global_descriptor,
        "source_size": source[0],
        "source_version": source[1],
    }


def error_row(image_id, uri, stage, error, source=(None, None)):
    assert stage in ERROR_STAGES, stage
    return {
        "image_id": image_id,
        "uri": uri,
        "stage": stage,
        "error": str(error)[:2000],
        "source_size": source[0],
        "source_version": source[1],
    }


def superseded_row(image_id, run, by_run, reason):
    assert reason in SUPERSEDED_REASONS, reason
    return {"image_id": image_id, "run": run, "by_run": by_run, "reason": reason}


def rows_to_table(rows, schema):
    """An Arrow table from feature or error rows; descriptors are built from flat buffers."""
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        columns[field.name] = _column(values, field.type)
    return pa.table(columns, schema=schema)


def _column(values, arrow_type):
    if pa.types.is_list(arrow_type) and pa.types.is_fixed_size_list(arrow_type.value_type):
        # list<fixed_size_list<T, D>>: one flat buffer, offsets per row
        inner = arrow_type.value_type
        dim, dtype = inner.list_size, numpy_dtype(inner.value_type)
        counts = [len(v) for v in values]
        flat = np.concatenate([np.asarray(v, dtype).reshape(-1) for v in values]) if values else np.zeros(0, dtype)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        items = pa.FixedSizeListArray.from_arrays(pa.array(flat, inner.value_type), dim)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items)
    if pa.types.is_fixed_size_list(arrow_type):
        dim = arrow_type.list_size
        flat = np.concatenate([np.asarray(v, np.float32) for v in values]) if values else np.zeros(0, np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, arrow_type.value_type), dim)
    if pa.types.is_list(arrow_type) and not pa.types.is_string(arrow_type.value_type):
        counts = [len(v) for v in values]
        dtype = numpy_dtype(arrow_type.value_type)
        flat = np.concatenate([np.asarray(v, dtype) for v in values]) if values else np.zeros(0, dtype)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, arrow_type.value_type))
    return pa.array(values, arrow_type)


def numpy_dtype(arrow_type):
    """The numpy dtype of a numeric Arrow type, without pyarrow's pandas-based mapping
    (workers have no pandas)."""
    assert pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type), arrow_type
    kind = "f" if pa.types.is_floating(arrow_type) else "i" if pa.types.is_signed_integer(arrow_type) else "u"
    return np.dtype(f"{kind}{arrow_type.bit_width // 8}")


def descriptors_of(table):
    """All local descriptors of a features table as one [sum N, D] numpy array (no copy per row)."""
    items = table.column("descriptors").combine_chunks().flatten()  # fixed_size_list<T, D>
    return items.flatten().to_numpy(zero_copy_only=False).reshape(-1, items.type.list_size)
