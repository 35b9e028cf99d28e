"""`delf-index migrate`: convert an extract output of an earlier delf-index (table versions 1
and 2: Parquet folders features/, errors/, superseded/) into a features table, in place.

    delf-index migrate --features gs://bucket/features

Its live rows become records of the same runs (features -> extracted, errors -> failed;
version 1 rows, which have no run, get the run 19700101T000000000000Z), written next to the
old folders and committed as one table version. Indexes built from the old tables keep
working: an append compares their (image_id, run) pairs with the table's live records, which
are the same. The old folders are left as they were (nothing reads them any more); delete
them when you are satisfied, or `--delete-old` does it after the commit. Otherwise
`delf-index compact` deletes them once they are older than its retention.
"""

import json
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_index.errors import SchemaError, UserError
from delf_index.pipelines import cli
from delf_index.runtime import console, lease, storage, tables
from delf_index.schemas import features as schema

log = logging.getLogger(__name__)
FIRST_RUN = "19700101T000000000000Z"  # the run of version 1 rows, which had none


def legacy_files(uri, name):
    fs, path = storage.filesystem(posixpath.join(uri, name))
    return [storage.with_protocol(fs, p) for p in sorted(fs.glob(posixpath.join(path, "*.parquet")))]


def read_legacy(path):
    """(table, its delf_index metadata) of one legacy Parquet file."""
    with storage.open_file(path, "rb") as f:
        table = pq.read_table(f)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k.startswith(b"delf_index.")}
    if int(meta.get("delf_index.schema_version", 0)) not in schema.MIGRATES_VERSIONS:
        raise SchemaError(f"{path} is not a table of version {schema.MIGRATES_VERSIONS}: nothing to migrate")
    return table, meta


def superseded_pairs(uri):
    out = set()
    for path in legacy_files(uri, "superseded"):
        table, _ = read_legacy(path)
        out |= set(zip(table.column("image_id").to_pylist(), table.column("run").to_pylist()))
    return out


def records_of(table, status, replaced, dtype):
    """The live rows of a legacy features or errors table as records (dicts, descriptors as bytes)."""
    rows = []
    for row in table.to_pylist():
        run = row.get("run") or FIRST_RUN
        if (row["image_id"], row.get("run") or "") in replaced:
            continue
        record = {
            **{c: row.get(c) for c in ("image_id", "uri", "source_size", "source_version")},
            "status": status,
            "run": run,
        }
        if status == "extracted":
            descriptors = np.asarray(row["descriptors"] or [], np.float32)
            record.update({c: row[c] for c in ("label", "width", "height", "num_features", "x", "y", "scale")})
            record.update(attention=row["attention"], global_descriptor=row["global_descriptor"])
            record["descriptors"] = descriptors.astype(dtype).tobytes()
        else:
            record.update(stage=row["stage"], error=row["error"])
        rows.append(record)
    return rows


def run(features, delete_old=False, wait=False):
    """Convert the legacy extract output `features` into a features table in place; returns the
    counts."""
    features = features.rstrip("/")
    if tables.exists(features):
        raise UserError(f"{features} is a features table already: nothing to migrate")
    if not tables.is_legacy(features):
        raise UserError(f"{features} holds no tables of an earlier delf-index (features/, errors/, superseded/)")
    with lease.writing(features, "migrate", wait=wait) as held:
        replaced = superseded_pairs(features)
        sources = [(p, "extracted") for p in legacy_files(features, "features")]
        sources += [(p, "failed") for p in legacy_files(features, "errors")]
        properties, records_schema, entries, counts = None, None, [], {"extracted": 0, "failed": 0}
        for index, (path, status) in enumerate(sources):
            table, meta = read_legacy(path)
            if properties is None:
                stored = table.schema.field("descriptors").type.value_type.value_type if status == "extracted" else None
                dtype = "float32" if stored == pa.float32() else "float16"
                model, extractor = json.loads(meta["delf_index.model"]), json.loads(meta["delf_index.extractor"])
                properties = schema.table_properties(meta["delf_index.model_fingerprint"], model, extractor, dtype)
                records_schema = schema.records_schema(dtype, model["descriptor_dim"])
            rows = records_of(table, status, replaced, schema.DESCRIPTOR_DTYPES[dtype])
            if not rows:
                continue
            counts[status] += len(rows)
            run = rows[0]["run"]
            file_schema = records_schema.with_metadata({**properties, "delf_index.run": run})
            name = f"part-migrated-{index:05d}.parquet"
            entries.append(tables.write_table(schema.rows_to_table(rows, file_schema), posixpath.join(features, name)))
        if properties is None:
            raise UserError(f"{features} holds no legacy tables with rows")
        held.check()
        counts["table_version"] = tables.commit(features, entries, properties, None, FIRST_RUN, "migrate", counts)
    if delete_old:
        for name in tables.LEGACY_FOLDERS:
            storage.remove(posixpath.join(features, name))
    log.info(
        f"migrate: {counts['extracted']} live images and {counts['failed']} failures of {features} are now table "
        f"version {counts['table_version']}" + ("; old folders deleted" if delete_old else "; old folders kept"),
        extra=console.SUMMARY,
    )
    return counts


def main(argv=None):
    parser = cli.Parser("migrate", __doc__)
    parser.add_argument("--features", required=True, help="an extract output of delf-index before table version 3")
    parser.add_argument("--delete-old", action="store_true", help="delete features/, errors/, superseded/ after")
    parser.add_argument("--wait", action="store_true", help="wait for another writer instead of failing")
    args = parser.parse_args(argv)
    run(args.features, args.delete_old, args.wait)
