"""`delf-index compact`: drop the dead records of a features table, and the files no version needs.

    delf-index compact --features gs://bucket/features
    delf-index compact --features gs://bucket/features --retention-hours 24

A record is dead when nothing reads it any more: features a later record replaced, ended
(deleted) or took down, failures older than the image's features, removals a restoration
lifted. Compaction rewrites only the data files that hold dead records, keeping per image
its live features, its newest failure when that is newer, and the removal that keeps it
down; the kept records keep their runs. It is one commit (the old files removed, the new
ones added, no data change), so readers of earlier versions are unaffected until the
vacuum: files that only versions older than `--retention-hours` use are deleted then, with
the files of runs that never committed (a killed extract). A takedown's features are gone
for good after compaction and vacuum. `update` compacts by itself when dead records pass a
quarter of the table.
"""

import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable

from delf_index.pipelines import cli
from delf_index.runtime import console, failpoints, lease, storage, tables

log = logging.getLogger(__name__)
DEFAULT_RETENTION_HOURS = 168  # Delta Lake's default: a week of time travel


def kept_records(records):
    """The records (image_id, status, run, file) compaction keeps: each image's live features,
    its newest failure when newer than them, and the removal that keeps it down."""
    resolved = tables.resolve(records)
    live = tables.live_records(records, resolved).select(["image_id", "status", "run"])
    failing = resolved.filter(pc.is_valid(resolved.column("failed")))
    failed = pa.table({"image_id": failing.column("image_id"), "status": pa.array(["failed"] * failing.num_rows,
                       pa.string()), "run": failing.column("failed")})  # fmt: skip
    down = records.filter(pc.equal(records.column("status"), "removed"))
    blocked = resolved.filter(resolved.column("blocked")).select(["image_id"])
    newest = down.join(blocked, "image_id", join_type="inner").group_by("image_id").aggregate([("run", "max")])
    removed = pa.table({"image_id": newest.column("image_id"), "status": pa.array(["removed"] * newest.num_rows,
                        pa.string()), "run": newest.column("run_max")})  # fmt: skip
    plain = pa.schema([("image_id", pa.string()), ("status", pa.string()), ("run", pa.string())])
    return pa.concat_tables([t.cast(plain) for t in (live, failed, removed)])


def key(table):
    return pc.binary_join_element_wise(table.column("image_id"), table.column("status"), table.column("run"), "\x00")


def dead_share(uri):
    """The share of a table's records that compaction would drop (0 for an empty table)."""
    records = tables.snapshot(uri).read(["image_id", "status", "run"])
    return 1 - kept_records(records).num_rows / records.num_rows if records.num_rows else 0.0


def run(features, rows_per_file=1000, retention_hours=DEFAULT_RETENTION_HOURS, wait=False):
    """Compact the features table `features` as one commit, then vacuum it. Returns the counts."""
    with lease.writing(features, "compact", wait=wait) as held:
        snap = tables.snapshot(features)
        records = snap.read(["image_id", "status", "run"])
        keep_keys = key(kept_records(records))
        alive = pc.is_in(key(records), keep_keys).to_numpy(zero_copy_only=False)
        files = records.column("file").to_numpy()
        rewrite = sorted({int(f) for f in files[~alive]})
        counts = {"records": records.num_rows, "dead": int((~alive).sum()), "files_rewritten": len(rewrite)}
        if rewrite:
            run_id = tables.new_run_id(snap.newest_run(records))
            entries = write_compacted(snap, [snap.files[i] for i in rewrite], keep_keys, run_id, rows_per_file)
            failpoints.reach("compact:written")
            held.check()
            removed = [snap.files[i] for i in rewrite]
            counts["table_version"] = tables.commit(
                features, entries, snap.raw_properties, snap, run_id, "compact", counts, removed, data_change=False
            )
            counts["files_written"] = len(entries)
        delta = DeltaTable(features.rstrip("/"), storage_options=storage.delta_options(features))
        vacuumed = delta.vacuum(int(retention_hours), dry_run=False, enforce_retention_duration=False, full=True)
        counts["files_vacuumed"] = len(vacuumed)
    log.info(
        f"compact: {counts['dead']} of {counts['records']} records dropped from {counts['files_rewritten']} files; "
        f"{counts['files_vacuumed']} unused files deleted; {features}"
        + (f" version {counts['table_version']}" if "table_version" in counts else ""),
        extra=console.SUMMARY,
    )
    return counts


def write_compacted(snap, uris, keep_keys, run, rows_per_file):
    """The kept records of the files `uris`, rewritten into files of `rows_per_file` records."""
    file_schema = snap.records_schema.with_metadata({**snap.raw_properties, "delf_index.run": run})
    entries, pending = [], []

    def flush():
        name = f"part-{run}-compact-{len(entries):05d}.parquet"
        path = posixpath.join(snap.uri, name)
        table = pa.concat_tables(pending).cast(file_schema)
        entries.append(tables.write_table(table, path))
        pending.clear()

    for uri in uris:
        with tables.opened(uri) as f:
            table = pq.read_table(f)
        pending.append(table.filter(pc.is_in(key(table), keep_keys)))
        if sum(t.num_rows for t in pending) >= rows_per_file:
            flush()
    if any(t.num_rows for t in pending):
        flush()
    return entries


def main(argv=None):
    parser = cli.Parser("compact", __doc__)
    parser.add_argument("--features", required=True, help="the features table")
    parser.add_argument("--rows-per-file", type=int, default=1000, help="records per rewritten file (1000)")
    parser.add_argument(
        "--retention-hours",
        type=int,
        default=DEFAULT_RETENTION_HOURS,
        help=f"keep the files of versions this recent, for time travel ({DEFAULT_RETENTION_HOURS})",
    )
    parser.add_argument("--wait", action="store_true", help="wait for another writer instead of failing")
    args = parser.parse_args(argv)
    run(args.features, args.rows_per_file, args.retention_hours, args.wait)
