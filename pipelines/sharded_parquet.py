"""Deterministic, sharded Parquet files on any fsspec filesystem, written from Beam.

Rows go to shard ``hash(key) mod S`` with ``S = ceil(rows / rows_per_shard)`` (the key is
the image_id, or a search's query_id), are sorted inside their shard, and each file appears
whole or not at all, so that

- the same rows of a run always go to the same files;
- an interrupted run leaves only whole files of its own, never touching other runs' files;
- rows with the same image_id meet in one shard, where duplicates are caught: the first by
  uri is kept, the others are returned as failure records (nothing vanishes silently).

Layout: ``<folder>/<name>-<run>-00003-of-00016.parquet``. In a features table the files are
invisible until the run commits them (runtime/tables.py); the outputs of search and match
are complete once `finalize` has removed shards of the same run that a retried bundle left
behind and written empty files for shards no row went to.
"""

import hashlib
import logging
import math
import posixpath
import uuid

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from delf_index.runtime import storage
from delf_index.runtime.tables import file_entry
from delf_index.schemas.features import failure_record, rows_to_table

log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 100  # about 20 MB of features per row group: cheap partial reads


def shard_of(image_id, num_shards):
    digest = hashlib.md5(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_path(folder, name, run, shard, num_shards):
    prefix = f"{name}-{run}-" if run else f"{name}-"
    return posixpath.join(folder, f"{prefix}{shard:05d}-of-{num_shards:05d}.parquet")


def write_parquet(rows, path, schema):
    """Write rows to `path` whole (see _write_parquet), retrying transient storage failures;
    returns the Arrow table written."""
    table = rows_to_table(rows, schema)
    storage.retrying(lambda: _write_parquet(table, path), f"writing {path}", path)
    return table


def _write_parquet(table, path):
    """Write a table to `path` so that readers never see a partial file.

    Object stores (gs://, s3://) publish an object only when its upload completes, so the
    file is written in place; on local disks it goes to a temporary file of its own, renamed.
    """
    fs, final = storage.filesystem(path)
    target = final
    if storage.protocol_of(fs) in ("file", "local"):
        target = f"{final}.tmp-{uuid.uuid4().hex}"
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    try:
        with fs.open(target, "wb") as f:
            with pq.ParquetWriter(f, table.schema, compression="zstd") as writer:
                for start in range(0, max(table.num_rows, 1), ROW_GROUP_ROWS):
                    writer.write_table(table.slice(start, ROW_GROUP_ROWS))
        if target != final:
            fs.mv(target, final)
    finally:
        if target != final and fs.exists(target):
            fs.rm(target)


ROWS_COUNTER = {"records": "records_written", "duplicates": "duplicate_image_ids"}


class _WriteShard(beam.DoFn):
    def __init__(self, folder, name, schema, run, per_image, key, order):
        self.folder, self.name, self.schema, self.run, self.per_image = folder, name, schema, run, per_image
        self.key, self.order = key, order
        self.rows_written = Metrics.counter("delf_index", ROWS_COUNTER.get(name, f"{name}_rows"))
        self.features_written = Metrics.counter("delf_index", "features_written")
        self.duplicates = Metrics.counter("delf_index", "duplicate_image_ids")

    def process(self, element, num_shards):
        shard, rows = element
        rows = sorted(rows, key=lambda r: tuple("" if r.get(c) is None else r[c] for c in self.order))
        kept = []
        for row in rows:
            if self.per_image and kept and kept[-1]["image_id"] == row["image_id"]:
                self.duplicates.inc()
                yield beam.pvalue.TaggedOutput("duplicates", duplicate_of(row, kept[-1]))
                continue
            kept.append({**row, "run": self.run} if self.per_image else row)
        path = shard_path(self.folder, self.name, self.run, shard, num_shards)
        table = write_parquet(kept, path, self.schema)
        features = sum(r.get("num_features") or 0 for r in kept)
        self.rows_written.inc(len(kept))
        self.features_written.inc(features)
        log.debug("wrote %s (%d rows)", path, len(kept))
        keys = len({r[self.key] for r in kept})
        yield {**file_entry(path, table), "num_shards": num_shards, "features": features, "keys": keys}


def duplicate_of(row, kept):
    """The failure record of a row whose image_id an earlier row of its shard has."""
    # an image file's source, so the next run sees it unchanged; a tar member ("shard.tar#name")
    # gets none: its shard is read again while the duplicate stands, in case the shard of the
    # kept copy changes without it
    source = (None, None, None) if "#" in row["uri"] else tuple(row.get(c) for c in SOURCE_COLUMNS)
    message = f"duplicate image_id, also read from {kept['uri']}"
    return failure_record(row["image_id"], row["uri"], "list", message, source)


SOURCE_COLUMNS = ("source_size", "source_version", "source_hash")


class WriteShardedParquet(beam.PTransform):
    """rows -> sharded Parquet files of one run in `folder`; outputs ``written`` (one
    `file_entry` dict per file) and ``duplicates`` (failure records of repeated image_ids).
    `per_image`: one row per image_id, stamped with the run; else rows are written as they
    are, sharded by `key` and sorted by the columns `order`."""

    def __init__(self, folder, name, schema, run, rows_per_shard=1000, per_image=True, key="image_id", order=None):
        super().__init__()
        self.folder, self.name, self.schema, self.run = folder, name, schema, run
        self.rows_per_shard, self.per_image, self.key = rows_per_shard, per_image, key
        self.order = tuple(order or (key, "uri", "run"))

    def expand(self, rows):
        per_shard, key = self.rows_per_shard, self.key
        num_shards = (
            rows
            | "Count" >> beam.combiners.Count.Globally()
            | "NumShards" >> beam.Map(lambda n: max(1, math.ceil(n / per_shard)))
        )
        return (
            rows
            | "AssignShard" >> beam.Map(lambda r, n: (shard_of(r[key], n), r), beam.pvalue.AsSingleton(num_shards))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard"
            >> beam.ParDo(
                _WriteShard(self.folder, self.name, self.schema, self.run, self.per_image, key, self.order),
                beam.pvalue.AsSingleton(num_shards),
            ).with_outputs("duplicates", main="written")
        )


def finalize(folder, name, schema, written, run):
    """After a run of search or match: write empty files for shards no row went to, drop this
    run's shards that the run's final attempt did not write. Returns the run's files."""
    fs, path = storage.filesystem(folder)
    num_shards = max([w["num_shards"] for w in written] or [1])
    paths = {w["path"] for w in written}
    for shard in range(num_shards):  # shards that no row hashed to still get their (empty) file
        target = shard_path(folder, name, run, shard, num_shards)
        if target not in paths:
            write_parquet([], target, schema)
            paths.add(target)
    keep = {storage.filesystem(p)[1] for p in paths}
    ours = posixpath.basename(shard_path(folder, name, run, 0, 1)).split("00000-of")[0]
    for existing in fs.ls(path, detail=False) if fs.exists(path) else []:
        base = posixpath.basename(existing.rstrip("/"))
        if base.startswith(ours) and base.endswith(".parquet") and existing not in keep:
            fs.rm(existing)
    return sorted(paths)
