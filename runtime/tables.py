"""The features table (schemas/features.py): snapshots, what is live in them, and commits.

A features table is a Delta Lake table (delta-rs). Readers take a `Snapshot` (one table
version) and `resolve` its records into what is live per image; the jobs read the data
files of a snapshot directly with pyarrow (`live_tables`, `iter_batches`), so that Beam
workers need no Delta client. Writers write Parquet files into the table folder (invisible
until committed), then `commit` them in one step, conditional on the version they planned
on: a commit never lands on a table that changed under its writer.
"""

import concurrent.futures
import contextlib
import datetime
import json
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction

from delf_index.errors import SchemaError, UserError
from delf_index.runtime import failpoints, lease, storage
from delf_index.runtime.features import Features
from delf_index.schemas import features as schema
from delf_index.version import __version__

LEGACY_FOLDERS = ("features", "errors", "superseded")  # schema versions 1 and 2: Parquet folders, no log
READ_THREADS = 16  # data files whose state columns are read at once (object stores: latency-bound)


class TableChanged(UserError):
    """The table got a commit after the writer planned on it; nothing was committed."""


class FileGone(UserError, FileNotFoundError):
    """A data file that the table version being read names is gone: a takedown deleted it, or
    compaction's vacuum did once the version was older than its retention."""

    def __init__(self, message, uri=None):
        super().__init__(message)
        self.uri = uri


class Snapshot:
    """One version of a features table: its properties and data files."""

    def __init__(self, uri, version=None):
        self.uri = uri.rstrip("/")
        try:
            self.delta = DeltaTable(self.uri, version=version, storage_options=storage.delta_options(self.uri))
        except TableNotFoundError as e:
            raise missing_table(self.uri) from e
        self.version = self.delta.version()
        self.table_id = self.delta.metadata().id  # Delta's table id: the same in every copy, version and location
        self.raw_properties = dict(self.delta.metadata().configuration)
        self.properties = schema.read_properties(self.raw_properties, self.uri)
        self.files = sorted(self.delta.file_uris())

    @property
    def records_schema(self):
        return schema.records_schema(self.properties["descriptor_dtype"], self.properties["model"]["descriptor_dim"])

    def newest_run(self, records):
        """The newest run among `records` (read from this snapshot): a new run's id must sort after it."""
        return (pc.max(records.column("run")).as_py() or "") if records.num_rows else ""

    def read(self, columns=schema.STATE_COLUMNS):
        """The `columns` of every record, with "file" (the index of its file in `files`)."""
        try:
            with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
                parts = list(pool.map(lambda uri: read_columns(uri, columns), self.files))
        except FileGone as e:
            raise FileGone(
                f"version {self.version} of {self.uri} can no longer be read: {e.uri} is gone (deleted by a takedown, "
                "or vacuumed by `delf-index compact` once the version was older than --retention-hours): use a newer "
                "version",
                e.uri,
            ) from e
        for index, part in enumerate(parts):
            parts[index] = part.append_column("file", pa.array(np.full(part.num_rows, index, np.int32)))
        fields = [schema.records_schema().field(c) for c in columns] + [pa.field("file", pa.int32())]
        return pa.concat_tables(parts) if parts else pa.schema(fields).empty_table()


def read_columns(uri, columns):
    with opened(uri) as f:
        return pq.read_table(f, columns=columns)


@contextlib.contextmanager
def opened(uri):
    """A data file opened for reading; FileGone when a takedown or a vacuum deleted it. A file
    this process's listing cache does not know yet (s3fs answers from a listing it cached
    before the file was written) is looked up again first."""
    for attempt in range(2):
        try:
            handle = storage.open_file(uri, "rb").open()
            break
        except FileNotFoundError as e:
            if attempt:
                raise FileGone(
                    f"the data file {uri} is gone: a takedown or compaction deleted it after the table version being "
                    "read named it; run the job again (it reads the current version)",
                    uri,
                ) from e
            storage.uncached_filesystem(uri)
    with handle:
        yield handle


def missing_table(uri):
    """The error for a `--features` that holds no table, naming the migration for old folders."""
    if is_legacy(uri):
        return SchemaError(
            f"{uri} holds feature tables of an earlier delf-index (Parquet folders without a commit log): convert it "
            f"once with `delf-index migrate --features {uri}`"
        )
    return FileNotFoundError(f"no features table at {uri} (run `delf-index extract --output {uri}` first)")


def is_legacy(uri):
    fs, path = storage.filesystem(uri)
    return any(fs.exists(posixpath.join(path, name)) for name in LEGACY_FOLDERS) and not fs.exists(
        posixpath.join(path, "_delta_log")
    )


def exists(uri):
    """Whether `uri` holds a features table. (Not DeltaTable.is_deltatable: against moto's S3
    server it times out; opening the table answers at once.)"""
    try:
        DeltaTable(uri.rstrip("/"), storage_options=storage.delta_options(uri))
    except TableNotFoundError:
        return False
    return True


def snapshot(uri, version=None):
    return Snapshot(uri, version)


# -- what is live -----------------------------------------------------------------------------
def resolve(records):
    """Per image of `records` (at least image_id, status, run): the run of its live features
    ("features", null when none), of its newest failure when that is newer than them
    ("failed": it is retried), and whether it is taken down ("blocked"). See
    schemas/features.py: a deletion or removal ends the features before it; a removal blocks
    the image until a newer restoration."""
    newest = {}
    for status in schema.STATUSES:
        chosen = records.filter(pc.equal(records.column("status"), status))
        newest[status] = chosen.group_by("image_id").aggregate([("run", "max")]).rename_columns(["image_id", status])
    out = pa.table({"image_id": pc.unique(records.column("image_id"))})
    for runs in newest.values():
        out = out.join(runs, "image_id", join_type="left outer")
    run = {status: pc.coalesce(out.column(status), "") for status in schema.STATUSES}  # "" sorts before every run
    ended = pc.max_element_wise(run["deleted"], run["removed"])
    blocked = pc.greater(run["removed"], run["restored"])
    has_features = pc.and_(pc.greater(run["extracted"], ended), pc.invert(blocked))
    failing = pc.and_(pc.greater(run["failed"], pc.max_element_wise(run["extracted"], ended)), pc.invert(blocked))
    nothing = pa.nulls(out.num_rows, pa.string())
    return pa.table(
        {
            "image_id": out.column("image_id"),
            "features": pc.if_else(has_features, out.column("extracted"), nothing),
            "failed": pc.if_else(failing, out.column("failed"), nothing),
            "blocked": blocked,
        }
    )


def live_records(records, resolved=None):
    """The records of `records` that hold live features: one per image that has them."""
    resolved = resolve(records) if resolved is None else resolved
    wanted = resolved.filter(pc.is_valid(resolved.column("features"))).select(["image_id", "features"])
    extracted = records.filter(pc.equal(records.column("status"), "extracted"))
    return extracted.join(wanted.rename_columns(["image_id", "run"]), ["image_id", "run"], join_type="inner")


def file_skips(snap, records, live):
    """[(file uri, live rows, stale image_ids)] of the files of a snapshot that hold live rows:
    `stale` are the extracted records of the file that are not live (`iter_batches` skips them)."""
    extracted = records.filter(pc.equal(records.column("status"), "extracted"))
    key = lambda t: pc.binary_join_element_wise(t.column("image_id"), t.column("run"), "\x00")  # noqa: E731
    is_live = pc.is_in(key(extracted), key(live))
    files = extracted.column("file").to_numpy()
    counts = np.bincount(files[is_live.to_numpy(zero_copy_only=False)], minlength=len(snap.files))
    stale = {}
    dead = extracted.filter(pc.invert(is_live))
    for index, image_id in zip(dead.column("file").to_pylist(), dead.column("image_id").to_pylist()):
        stale.setdefault(index, set()).add(image_id)
    return [(snap.files[i], int(counts[i]), frozenset(stale.get(i, ()))) for i in np.nonzero(counts)[0]]


def live_tables(uri, version=None):
    """(snapshot, [(file uri, live rows, stale image_ids)]) of the live features of a table:
    what fit, build and batch searches read."""
    snap = snapshot(uri, version)
    records = snap.read(["image_id", "status", "run"])
    return snap, file_skips(snap, records, live_records(records))


def iter_batches(uri, columns, rows=100, skip=frozenset()):
    """pyarrow Tables of at most `rows` extracted records of one data file, in file order,
    without those of the image_ids in `skip`."""
    with opened(uri) as handle:
        f = pq.ParquetFile(handle)
        wanted = None if columns is None else list(dict.fromkeys([*columns, "image_id", "status"]))
        for batch in f.iter_batches(batch_size=rows, columns=wanted):
            table = pa.Table.from_batches([batch])
            keep = pc.equal(table.column("status"), "extracted")
            if skip:
                keep = pc.and_(keep, pc.invert(pc.is_in(table.column("image_id"), pa.array(sorted(skip), pa.string()))))
            table = table.filter(keep)
            if columns is not None:
                table = table.select(columns)
            if table.num_rows:
                yield table


def record_features(table):
    """(image_id, Features) of each record of a pyarrow table of whole records."""
    dtype, dim = schema.descriptor_layout(table.schema)
    for row in table.to_pylist():
        yield row["image_id"], Features.from_row(row, dtype, dim)


def iter_features(uri, image_ids=None, version=None):
    """(image_id, Features) of every live record of the table (only `image_ids` when given)."""
    _, files = live_tables(uri, version)
    for path, _, stale in files:
        for table in iter_batches(path, None, skip=stale):
            if image_ids is not None:
                table = table.filter(pc.is_in(table.column("image_id"), pa.array(sorted(image_ids), pa.string())))
            yield from record_features(table)


def read_descriptors(uri):
    """All live descriptors [N, D] (stored dtype) and the row number of each one's image."""
    descriptors, image_of, offset = [], [], 0
    for path, _, stale in live_tables(uri)[1]:
        for table in iter_batches(path, ["num_features", "descriptors"], skip=stale):
            descriptors.append(schema.descriptors_of(table))
            counts = np.asarray(table.column("num_features").to_numpy(), np.int64)
            image_of.append(np.repeat(np.arange(offset, offset + len(counts)), counts))
            offset += len(counts)
    return np.concatenate(descriptors), np.concatenate(image_of)


# -- writing and committing -------------------------------------------------------------------
def new_run_id(after=""):
    """A run id that sorts in time order, UTC to the microsecond, and after `after` (the newest
    run of the table: a clock behind it must not put this run's records before older ones)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if after:
        floor = datetime.datetime.strptime(after, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=datetime.timezone.utc)
        now = max(now, floor + datetime.timedelta(microseconds=1))
    return now.strftime("%Y%m%dT%H%M%S%fZ")


def take_down(uri, ids, restore=False, note=None, max_change=None, wait=False, allow_unknown=False):
    """Record the removal of `ids` (status removed), or with `restore` their restoration, in the
    table `uri` as one commit, under its lease. Ids the table never held are refused before
    anything is written, unless `allow_unknown`; ids already in that state are left alone; a
    removal of more than `max_change` of the live images is refused. A removal leaves no
    other record of the images on storage: the commit also rewrites the data files that hold
    them without them (a Delta delete of those files alone), and the files it replaced, and
    any file older versions or dead runs left that holds them, are deleted once it is
    committed (`purge`). Returns the counts: removed / restored, unchanged, table_version,
    and for a removal files_rewritten, files_deleted."""
    ids = sorted(set(ids))
    verb = "restored" if restore else "removed"
    if not exists(uri):  # before the lease: a mistyped --features must not create a folder
        raise missing_table(uri.rstrip("/"))
    with lease.writing(uri, f"{'restore' if restore else 'remove'} {len(ids)} images", wait=wait) as held:
        snap = snapshot(uri)
        records = snap.read(["image_id", "status", "run"])
        if not failpoints.broken("known-ids"):
            check_known(uri, ids, records, verb, allow_unknown)
        resolved = resolve(records)
        blocked = set(resolved.filter(resolved.column("blocked")).column("image_id").to_pylist())
        live = set(resolved.filter(pc.is_valid(resolved.column("features"))).column("image_id").to_pylist())
        targets = [i for i in ids if (i in blocked) == restore]
        taken = sum(i in live for i in targets) if not restore else 0
        if max_change is not None and live and taken > max_change * len(live):
            raise UserError(
                f"removing {taken} of the {len(live)} live images ({taken / len(live):.0%}) is more than "
                f"--max-change {max_change:g}: check the ids, or allow it with --max-change 1"
            )
        counts = {verb: len(targets), "unchanged": len(ids) - len(targets), "table_version": snap.version}
        run = new_run_id(snap.newest_run(records))
        entries = []
        if targets:
            rows = [schema.status_record(i, verb, note=note) for i in targets]
            entries.append(write_records(uri, f"part-{run}-{verb}.parquet", rows, snap.records_schema,
                                         snap.raw_properties, run))  # fmt: skip
        replaced, rewritten = ([], []) if restore else rewrite_without(snap, records, ids, run)
        if entries or replaced:
            failpoints.reach("remove:written")
            held.check()
            counts["table_version"] = commit(uri, entries + rewritten, snap.raw_properties, snap, run, verb[:-1],
                                             counts, removed=replaced)  # fmt: skip
            failpoints.reach("remove:committed")
        if not restore:
            counts.update(files_rewritten=len(replaced), files_deleted=purge(uri, ids, replaced))
    return counts


def check_known(uri, ids, records, verb, allow_unknown):
    """Refuse, before anything is written, image_ids the table never held (a typo, another
    table's ids), naming up to 10 of them."""
    known = set(pc.unique(records.column("image_id")).to_pylist())
    unknown = [i for i in ids if i not in known]
    if not unknown or allow_unknown:
        return
    shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    allowed = "take down images not listed yet" if verb == "removed" else "skip them"
    raise UserError(
        f"{len(unknown)} of the {len(ids)} image_ids were never in {uri}: {shown}; nothing was {verb}. Check them (a "
        f"typo? another table?), or pass --allow-unknown to {allowed}"
    )


def held_by(table, ids):
    """Whether a table of records holds a record of `ids` other than a removal."""
    mine = pc.is_in(table.column("image_id"), pa.array(sorted(ids), pa.string()))
    return pc.and_(mine, pc.not_equal(table.column("status"), "removed"))


def rewrite_without(snap, records, ids, run):
    """(the data files of `snap` that hold a record of `ids` other than a removal, the
    `file_entry`s of their rewrites without those records): one file each, its other records
    as they were, named after the run `run`; a file with nothing else left is not rewritten."""
    holding = records.filter(held_by(records, ids))
    replaced = sorted({int(i) for i in holding.column("file").to_pylist()})
    rewritten = []
    file_schema = snap.records_schema.with_metadata({**snap.raw_properties, "delf_index.run": run})
    for n, index in enumerate(replaced):
        with opened(snap.files[index]) as f:
            table = pq.read_table(f)
        kept = table.filter(pc.invert(held_by(table, ids)))
        if kept.num_rows:
            path = posixpath.join(snap.uri, f"part-{run}-takedown-{n:05d}.parquet")
            rewritten.append(write_table(kept.cast(file_schema), path))
    return [snap.files[i] for i in replaced], rewritten


def purge(uri, ids, replaced):
    """Delete the data files `replaced` (no version from now on names them), and every other
    data file in the table's folder that no current record names and that holds a record of
    `ids` other than a removal: files of earlier versions (time travel to them ends) and of
    runs that never committed. Returns the number deleted. Run under the table's lease, once
    the removal is committed: a removal killed before it is completed by running it again."""
    path_of = lambda u: storage.filesystem(u)[1]  # noqa: E731 - delta-rs names file:// URIs, fsspec plain paths
    current, dropped = {path_of(u) for u in snapshot(uri).files}, {path_of(u) for u in replaced}
    fs, root = storage.uncached_filesystem(posixpath.join(uri.rstrip("/"), "x"))
    deleted = 0
    for path in sorted(fs.ls(posixpath.dirname(root), detail=False)):
        if not path.endswith(".parquet") or path in current:
            continue
        name = storage.with_protocol(fs, path)
        if path not in dropped:
            try:
                if not pc.any(held_by(read_columns(name, ["image_id", "status"]), ids)).as_py():
                    continue
            except FileGone:
                continue
        storage.remove(name)
        deleted += 1
    return deleted


def write_records(table_uri, name, rows, records_schema, properties, run):
    """Write records to a new data file `name` of the table (not yet committed); returns its
    `file_entry`. The file carries the table's properties and its run in its metadata."""
    meta = {**properties, "delf_index.run": run}
    table = schema.rows_to_table([{**row, "run": run} for row in rows], records_schema.with_metadata(meta))
    return write_table(table, posixpath.join(table_uri.rstrip("/"), name))


def write_table(table, path, row_group_rows=100):
    """Write an Arrow table of records to the data file `path` (retrying transient failures);
    returns its `file_entry`."""

    def write():
        fs, target = storage.filesystem(path)
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        with fs.open(target, "wb") as f:
            with pq.ParquetWriter(f, table.schema, compression="zstd") as writer:
                for start in range(0, max(table.num_rows, 1), row_group_rows):
                    writer.write_table(table.slice(start, row_group_rows))

    storage.retrying(write, f"writing {path}", path)
    return file_entry(path, table)


def file_entry(path, table):
    """What a commit needs of a data file: its path, size, rows and Delta statistics (record
    count, min and max of image_id, status and run), from the records it holds."""
    stats = {"numRecords": table.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for column in [c for c in ("image_id", "status", "run") if c in table.column_names]:
        if table.num_rows:
            bounds = pc.min_max(table.column(column))
            stats["minValues"][column], stats["maxValues"][column] = bounds["min"].as_py(), bounds["max"].as_py()
        stats["nullCount"][column] = 0
    fs, target = storage.filesystem(path)
    return {"path": path, "bytes": int(fs.size(target)), "rows": table.num_rows, "stats": stats}


def commit(table_uri, entries, properties, base, run, operation, summary=None, removed=(), data_change=True):
    """Commit data files (`file_entry`s) as one new version of the table, planned on the
    snapshot `base` (None: the table does not exist yet; it is created first, as version 0);
    `removed`: data files the commit drops (a compaction, which changes no data: `data_change`
    False). Raises TableChanged, committing nothing, when another commit came first. Returns
    the new version."""
    table_uri = table_uri.rstrip("/")
    options = storage.delta_options(table_uri)
    records_schema = schema.records_schema(properties["delf_index.descriptor_dtype"], _dim(properties))
    version = create(table_uri, records_schema, properties) if base is None else base.version
    now = int(time.time() * 1000)
    adds = [
        AddAction(relative(table_uri, e["path"]), e["bytes"], {}, now, data_change, json.dumps(e["stats"]))
        for e in entries
    ]
    removes = [RemoveAction(relative(table_uri, uri), data_change, now) for uri in removed]
    metadata = {"delf_index.run": run, "delf_index.operation": operation, "delf_index.summary": summary or {},
                "delf_index.version": __version__}  # fmt: skip
    props = CommitProperties(custom_metadata=metadata, max_commit_retries=0)
    table = DeltaTable(table_uri, version=version, storage_options=options)
    try:
        table.create_write_transaction([*adds, *removes], "append", records_schema, commit_properties=props)
    except CommitFailedError as e:
        raise TableChanged(
            f"{table_uri} got a commit ({latest_commit(table_uri)}) after this {operation} planned on version "
            f"{version}: nothing was committed; run it again"
        ) from e
    return version + 1


def derive(source_uri, target_uri, select, extractor_conf, rows_per_file=200):
    """A new table at `target_uri` whose images are the live images of `source_uri` with their
    features passed through `select` ((image_id, Features) -> Features: fewer features,
    another order),
    committed as one version; labels, sources and warnings are kept, failures are copied, and
    what is not live (replaced, deleted or removed images) is left out.
    `extractor_conf`: the settings recorded for the new table (what `select` amounts to, e.g.
    a smaller `max_features`). Returns the number of images written."""
    if exists(target_uri):
        raise UserError(f"{target_uri} already holds a features table: derive into a new folder")
    snap, files = live_tables(source_uri)
    properties = {**snap.raw_properties, "delf_index.extractor": json.dumps(extractor_conf, sort_keys=True)}
    dtype = snap.properties["descriptor_dtype"]
    run = new_run_id()
    entries, rows, count = [], [], 0

    def flush():
        name = f"derived-{run}-{len(entries):05d}.parquet"
        entries.append(write_records(target_uri, name, rows, snap.records_schema, properties, run))
        rows.clear()

    for path, _, stale in files:
        for table in iter_batches(path, None, skip=stale):
            layout = schema.descriptor_layout(table.schema)
            for row in table.to_pylist():
                features = select(row["image_id"], Features.from_row(row, *layout))
                source = (row["source_size"], row["source_version"], row["source_hash"])
                warned = row["warnings"].split("\n") if row["warnings"] else ()
                rows.append(schema.feature_record(row["image_id"], row["uri"], row["label"], features, dtype,
                                                  source, warned))  # fmt: skip
                count += 1
                if len(rows) == rows_per_file:
                    flush()
    records = snap.read(["image_id", "status", "run", "uri", "stage", "error"])
    failing = resolve(records).filter(pc.is_valid(pc.field("failed"))).select(["image_id", "failed"])
    failures = records.filter(pc.equal(records.column("status"), "failed"))
    failures = failures.join(failing.rename_columns(["image_id", "run"]), ["image_id", "run"], join_type="inner")
    rows += [schema.failure_record(r["image_id"], r["uri"], r["stage"], r["error"]) for r in failures.to_pylist()]
    if rows or not entries:
        flush()
    commit(target_uri, entries, properties, None, run, "derive", {"images": count, "source": source_uri})
    return count


def create(table_uri, records_schema, properties):
    """Create an empty features table (version 0) with the table's properties; TableChanged
    when another writer created it first."""
    try:
        DeltaTable.create(
            table_uri,
            DeltaSchema.from_arrow(records_schema),
            mode="error",
            name="features",
            description="DELF features and what happened to each image (delf-index)",
            configuration=properties,
            storage_options=storage.delta_options(table_uri),
            raise_if_key_not_exists=False,
        )
    except Exception as e:
        if "already exists" not in str(e):
            raise
        raise TableChanged(
            f"{table_uri} was created by another writer meanwhile: nothing was committed; run it again"
        ) from e
    return 0


def _dim(properties):
    return int(json.loads(properties["delf_index.model"]).get("descriptor_dim", 0))


def relative(table_uri, uri):
    fs, root = storage.filesystem(table_uri)
    _, path = storage.filesystem(uri)
    assert path.startswith(root.rstrip("/") + "/"), (uri, table_uri)
    return path[len(root.rstrip("/")) + 1 :]


def history(table_uri, last=None):
    """The table's commits, newest first: {version, timestamp, operation, run, summary}, read
    from the commit log's files (delta-rs's own history() hangs against moto's S3 server)."""
    fs, path = storage.uncached_filesystem(posixpath.join(table_uri.rstrip("/"), "_delta_log", "x"))
    folder = posixpath.dirname(path)
    names = sorted(
        p for p in fs.ls(folder, detail=False) if p.endswith(".json") and posixpath.basename(p)[:-5].isdigit()
    )
    out = []
    for name in reversed(names[-last:] if last else names):
        for line in fs.cat_file(name).decode().splitlines():
            info = json.loads(line).get("commitInfo")
            if info is not None:
                out.append(
                    {
                        "version": int(posixpath.basename(name)[:-5]),
                        "timestamp": info.get("timestamp"),
                        "operation": info.get("delf_index.operation", info.get("operation")),
                        "run": info.get("delf_index.run"),
                        "summary": info.get("delf_index.summary"),
                    }
                )
    return out


def latest_commit(table_uri):
    """One line about a table's newest commit, for messages."""
    try:
        info = history(table_uri, last=1)[0]
    except (OSError, IndexError, ValueError) as e:  # only for a message
        return f"its newest commit unreadable: {type(e).__name__}"
    return f"version {info['version']} by {info['operation']}" + (f" run {info['run']}" if info["run"] else "")
