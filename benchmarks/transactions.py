"""What the transaction model costs, on the collection that benchmarks/incremental.py builds
(10,000 images, `update` runs on local disk):

- a day that changes 1 % of the collection (rewritten with other bytes) through `update`,
  and what the other way of making replaced rows disappear would add: rewriting the data
  files that hold them (copy-on-write; here the 1 % touch every file);
- reading the live descriptors, as fit and build do, from the Delta table (binary float16)
  against the same rows in the table layout of version 2 (Parquet list<fixed_size_list<float16>>);
- the live rows as one DuckDB query (docs/live_rows.sql) and through runtime/tables.py;
- a day after the whole collection was copied back without its mtimes (a restore from a
  backup): every file hashed, nothing changed (issue 33);
- a takedown: `remove` of one image (its data file rewritten without it, the old one
  deleted), then the append that leaves it out of the index (issue 33).

    python -m benchmarks.incremental --workdir /tmp/incremental --images 10000 --size 256
    python -m benchmarks.transactions --workdir /tmp/incremental --changed 0.01

It changes the workdir (a day, a copy back, a takedown). Prints one JSON line per measurement.

Figures: benchmarks/README.md, "Transactions (issue 29)".
"""

import argparse
import json
import os
import posixpath
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.incremental import sources, write_images
from delf_index.pipelines import build, remove, update
from delf_index.runtime import tables
from delf_index.schemas import features as schema


def changed_day(workdir, share, seed=1):
    """Rewrite `share` of the images with other content, then one `update`; the seconds."""
    images = os.path.join(workdir, "images")
    names = sorted(os.listdir(images))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(names), max(1, round(share * len(names))), replace=False)
    photos = sources(256)
    for n in chosen:  # the same file name, a different seeded variant
        scratch = os.path.join(workdir, "scratch")
        write_images(scratch, int(n), 1, photos, seed=seed + 1)
        shutil.move(os.path.join(scratch, f"{int(n):06d}.jpg"), os.path.join(images, names[n]))
    start = time.time()
    counts = update.run(images, os.path.join(workdir, "features"), os.path.join(workdir, "index"),
                        conf={"compact_table_above": None})  # fmt: skip
    return time.time() - start, counts, len(chosen)


def rewrite_cost(features, changed_ids, run):
    """Seconds to rewrite every data file of earlier runs that holds a record of `changed_ids`
    without it: the copy-on-write alternative's extra work for one day (written to a scratch
    folder; the files of `run`, the day's own, are not touched)."""
    snap = tables.snapshot(features)
    scratch = os.path.join(os.path.dirname(features), "rewrite-scratch")
    os.makedirs(scratch, exist_ok=True)
    start, touched, written = time.time(), 0, 0
    wanted = pa.array(sorted(changed_ids), pa.string())
    for uri in [u for u in snap.files if run not in os.path.basename(u)]:
        ids = tables.read_columns(uri, ["image_id"]).column("image_id")
        if not pc.any(pc.is_in(ids, wanted)).as_py():
            continue
        table = pq.read_table(uri)
        kept = table.filter(pc.invert(pc.is_in(table.column("image_id"), wanted)))
        pq.write_table(kept, os.path.join(scratch, os.path.basename(uri)), compression="zstd")
        touched += 1
        written += os.path.getsize(os.path.join(scratch, os.path.basename(uri)))
    seconds = time.time() - start
    shutil.rmtree(scratch)
    return seconds, touched, len(snap.files), written


def as_version_2(features, target):
    """The live records of the table as version 2 files (descriptors list<fixed_size_list<float16>>)."""
    snap, files = tables.live_tables(features)
    os.makedirs(target, exist_ok=True)
    dim = snap.properties["model"]["descriptor_dim"]
    for index, (uri, _, stale) in enumerate(files):
        parts = []
        for table in tables.iter_batches(uri, ["image_id", "num_features", "descriptors"], rows=1000, skip=stale):
            flat = schema.descriptors_of(table)
            offsets = np.concatenate([[0], np.cumsum(table.column("num_features").to_numpy())]).astype(np.int32)
            items = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), dim)
            nested = pa.ListArray.from_arrays(pa.array(offsets), items)
            parts.append(pa.table({"image_id": table.column("image_id"), "num_features": table.column("num_features"),
                                   "descriptors": nested}))  # fmt: skip
        pq.write_table(
            pa.concat_tables(parts), os.path.join(target, f"features-{index:05d}.parquet"), compression="zstd"
        )
    return target


def read_throughput(features, version_2):
    """Seconds to read every live descriptor (fit's and build's read) from both layouts."""
    start = time.time()
    snap, files = tables.live_tables(features)
    count = 0
    for uri, _, stale in files:
        for table in tables.iter_batches(uri, ["num_features", "descriptors"], rows=100, skip=stale):
            count += len(schema.descriptors_of(table))
    delta_s = time.time() - start
    start, count_2 = time.time(), 0
    for name in sorted(os.listdir(version_2)):
        f = pq.ParquetFile(os.path.join(version_2, name))
        for batch in f.iter_batches(batch_size=100, columns=["num_features", "descriptors"]):
            items = batch.column(1).flatten()
            count_2 += len(items.flatten().to_numpy(zero_copy_only=False).reshape(-1, items.type.list_size))
    assert count == count_2
    size = sum(os.path.getsize(u) for u in snap.files)
    size_2 = sum(os.path.getsize(os.path.join(version_2, n)) for n in os.listdir(version_2))
    return {"descriptors": count, "delta_s": round(delta_s, 2), "version_2_s": round(time.time() - start, 2),
            "delta_bytes": size, "version_2_bytes": size_2}  # fmt: skip


def live_queries(features):
    import duckdb
    from deltalake import DeltaTable

    sql = open(os.path.join(os.path.dirname(__file__), "..", "docs", "live_rows.sql")).read()
    sql = sql.replace("SELECT r.* FROM", "SELECT r.image_id, r.run, r.num_features FROM")
    start = time.time()
    dataset = DeltaTable(features).to_pyarrow_dataset()  # noqa: F841 - DuckDB finds it by name
    rows = duckdb.sql(sql.replace("delta_scan('OUT')", "dataset")).fetchall()
    duck_s = time.time() - start
    start = time.time()
    _, files = tables.live_tables(features)
    helper_s = time.time() - start
    assert len(rows) == sum(n for _, n, _ in files)
    return {"live": len(rows), "duckdb_s": round(duck_s, 2), "live_tables_s": round(helper_s, 2)}


def copied_back_day(workdir):
    """Write every image again with its own bytes and a new mtime, then one `update`; the
    seconds and its counts (everything hashed, nothing changed)."""
    images = os.path.join(workdir, "images")
    later = time.time() + 86400
    for name in sorted(os.listdir(images)):
        path = os.path.join(images, name)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (later, later))
    start = time.time()
    counts = update.run(images, os.path.join(workdir, "features"), os.path.join(workdir, "index"),
                        conf={"compact_table_above": None})  # fmt: skip
    return time.time() - start, counts


def takedown_cost(workdir, seed=2):
    """Seconds of `remove` of one live image (the data file that holds it rewritten without it,
    the old one deleted), and of the append that then leaves it out of the index."""
    features, index = os.path.join(workdir, "features"), os.path.join(workdir, "index")
    live = tables.live_records(tables.snapshot(features).read(["image_id", "status", "run"]))
    image = sorted(live.column("image_id").to_pylist())[np.random.default_rng(seed).integers(live.num_rows)]
    start = time.time()
    counts = remove.run(features, [image], note="benchmark", max_change=None)
    remove_s = time.time() - start
    start = time.time()
    build.run(features, index, append=True)
    return {"takedown": image, "remove_s": round(remove_s, 1), "append_s": round(time.time() - start, 1),
            "files_rewritten": counts["files_rewritten"], "files_deleted": counts["files_deleted"],
            "table_files": len(tables.snapshot(features).files)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a workdir of benchmarks/incremental.py")
    parser.add_argument("--changed", type=float, default=0.01, help="share of the images rewritten")
    args = parser.parse_args(argv)
    features = os.path.join(args.workdir, "features")
    seconds, counts, changed = changed_day(args.workdir, args.changed)
    print(json.dumps({"changed_day_s": round(seconds, 1), "changed": changed, "update": counts}), flush=True)
    snap = tables.snapshot(features)
    records = snap.read(["image_id", "run"])
    newest = pc.max(records.column("run")).as_py()
    ids = set(records.filter(pc.equal(records.column("run"), newest)).column("image_id").to_pylist())
    rewrite_s, touched, total, written = rewrite_cost(features, ids, newest)
    print(json.dumps({"rewrite_s": round(rewrite_s, 1), "files_touched": touched, "files": total,
                      "bytes_rewritten": written}), flush=True)  # fmt: skip
    version_2 = as_version_2(features, posixpath.join(args.workdir, "version-2"))
    print(json.dumps(read_throughput(features, version_2)), flush=True)
    shutil.rmtree(version_2)
    print(json.dumps(live_queries(features)), flush=True)
    seconds, counts = copied_back_day(args.workdir)
    print(json.dumps({"copied_back_day_s": round(seconds, 1), "update": counts}), flush=True)
    print(json.dumps(takedown_cost(args.workdir)), flush=True)


if __name__ == "__main__":
    main()
