"""Deterministic, sharded Parquet tables on any fsspec filesystem, written from Beam.

Rows go to shard ``hash(key) mod S`` with ``S = ceil(rows / rows_per_shard)`` (the key is
the image_id, or a search's query_id), are sorted inside their shard, and each shard file
appears whole or not at all, so that

- the same rows of a run always go to the same files;
- an interrupted run leaves only whole files of its own, never touching other runs' files;
- rows with the same image_id meet in one shard, where duplicates are caught: the first by
  uri is kept, the others are returned as error rows (nothing vanishes silently).

Layout: ``<output>/<name>/<name>-<run>-00003-of-00016.parquet`` (tables of version 1 have no
run in their names); `finalize` removes shards of the same run that a retried bundle left
behind and writes empty files for shards no row went to.
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
from delf_index.schemas.features import error_row, rows_to_table

log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 100  # about 20 MB of features per row group: cheap partial reads


def shard_of(image_id, num_shards):
    digest = hashlib.md5(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_path(output, name, run, shard, num_shards):
    prefix = f"{name}-{run}-" if run else f"{name}-"
    return posixpath.join(output, name, f"{prefix}{shard:05d}-of-{num_shards:05d}.parquet")


def write_parquet(rows, path, schema):
    """Write rows to `path` whole (see _write_parquet), retrying transient storage failures."""
    storage.retrying(lambda: _write_parquet(rows, path, schema), f"writing {path}")


def _write_parquet(rows, path, schema):
    """Write rows to `path` so that readers never see a partial file.

    Object stores (gs://, s3://) publish an object only when its upload completes, so the
    file is written in place; on local disks it goes to a temporary file that is renamed.
    """
    fs, final = storage.filesystem(path)
    target = final
    if storage.protocol_of(fs) in ("file", "local"):
        target = posixpath.join(posixpath.dirname(final), "_tmp", f"{uuid.uuid4().hex}-{posixpath.basename(final)}")
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    with fs.open(target, "wb") as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for start in range(0, max(len(rows), 1), ROW_GROUP_ROWS):
                writer.write_table(rows_to_table(rows[start : start + ROW_GROUP_ROWS], schema))
    if target != final:
        fs.mv(target, final)


ROWS_COUNTER = {"features": "images_written", "errors": "images_failed", "superseded": "rows_superseded"}


class _WriteShard(beam.DoFn):
    def __init__(self, output, name, schema, run, per_image, key, order):
        self.output, self.name, self.schema, self.run, self.per_image = output, name, schema, run, per_image
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
                yield beam.pvalue.TaggedOutput(
                    "duplicates",
                    error_row(
                        row["image_id"],
                        row["uri"],
                        "list",
                        f"duplicate image_id, also read from {kept[-1]['uri']}",
                        # an image file's source, so the next run sees it unchanged; a tar member
                        # ("shard.tar#name") gets none: its shard is read again while the duplicate
                        # stands, in case the shard of the kept copy changes without it
                        (None, None) if "#" in row["uri"] else (row.get("source_size"), row.get("source_version")),
                    ),
                )
                continue
            kept.append({**row, "run": self.run} if self.per_image else row)
        path = shard_path(self.output, self.name, self.run, shard, num_shards)
        write_parquet(kept, path, self.schema)
        self.rows_written.inc(len(kept))
        self.features_written.inc(sum(r.get("num_features") or 0 for r in kept))
        log.info("wrote %s (%d rows)", path, len(kept))
        yield {
            "path": path,
            "num_shards": num_shards,
            "rows": len(kept),
            "features": sum(r.get("num_features") or 0 for r in kept),
            "keys": len({r[self.key] for r in kept}),
        }


class WriteShardedParquet(beam.PTransform):
    """rows -> sharded Parquet table of one run; outputs ``written`` (one dict per file) and
    ``duplicates`` (error rows of repeated image_ids). `per_image`: one row per image_id
    (features, errors), stamped with the run; else rows are written as they are, sharded by
    `key` and sorted by the columns `order`."""

    def __init__(self, output, name, schema, run, rows_per_shard=1000, per_image=True, key="image_id", order=None):
        super().__init__()
        self.output, self.name, self.schema, self.run = output, name, schema, run
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
                _WriteShard(self.output, self.name, self.schema, self.run, self.per_image, key, self.order),
                beam.pvalue.AsSingleton(num_shards),
            ).with_outputs("duplicates", main="written")
        )


def finalize(output, name, schema, written, run):
    """After a run: write empty files for shards no row went to, drop this run's shards and
    temporary files that the run's final attempt did not write. Returns the run's files.

    A table that has no file yet gets one even when empty, so that readers find its schema;
    a run with no rows for a table that exists adds nothing to it."""
    fs, folder = storage.filesystem(posixpath.join(output, name))
    existing = fs.ls(folder, detail=False) if fs.exists(folder) else []
    num_shards = max([w["num_shards"] for w in written] or [1])
    paths = {w["path"] for w in written}
    tables = [p for p in existing if p.endswith(".parquet")]
    if paths or not tables:
        for shard in range(num_shards):  # shards that no row hashed to still get their (empty) file
            path = shard_path(output, name, run, shard, num_shards)
            if path not in paths:
                write_parquet([], path, schema)
                paths.add(path)
    keep = {storage.filesystem(p)[1] for p in paths}
    ours = posixpath.basename(shard_path(output, name, run, 0, 1)).split("00000-of")[0]
    for path in fs.ls(folder, detail=False) if fs.exists(folder) else []:
        base = posixpath.basename(path.rstrip("/"))
        if base == "_tmp" or (base.startswith(ours) and base.endswith(".parquet") and path not in keep):
            fs.rm(path, recursive=True)
    return sorted(paths)
