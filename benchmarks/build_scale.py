"""Index build at scale: synthetic 40-d descriptors, 1M and 10M, wall time and peak memory.

Runs the two steps of `delf-index build` (indexing/shards.py) directly, without Beam: first a
synthetic features table (Delta Lake, runtime/tables.py) is written, one data file of 1000
images x 1000 descriptors per shard, in parallel and committed at once (not timed as build);
then each data file is encoded in its own process (as a Beam worker would: read with
`tables.iter_batches`), then one process merges all shards. Descriptors are random unit
vectors with a cluster structure; the PCA is the identity (the descriptors are already
40-d), so the numbers are those of reading, encoding, merging and writing. Peak memory is
each process's maximum resident set (ru_maxrss). `--images-per-shard` (and a fraction of a
million) makes a small run to check the script.

    python -m benchmarks.build_scale --millions 1 10

Figures: benchmarks/README.md, "Index build at scale".
"""

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time

import faiss
import numpy as np

from delf_index.indexing import codebooks, shards
from delf_index.runtime import tables
from delf_index.runtime.features import Features
from delf_index.schemas import features as fs

DIM, IMAGES_PER_SHARD, FEATURES = 40, 1000, 1000


def synthetic(seed, n, centres):
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def identity_pca():
    return {
        "mean": np.zeros(DIM, np.float32),
        "components": np.eye(DIM, dtype=np.float32),
        "eigenvalues": np.ones(DIM, np.float32),
        "whiten": False,
        "explained_variance": 1.0,
    }


def table_properties():
    """The properties of the synthetic features table: a made-up model of 40-d descriptors."""
    return fs.table_properties("synthetic", {"descriptor_dim": DIM}, {"synthetic": True}, "float16")


def shard_features(shard, images, centres):
    """(image_id, Features) of the `images` synthetic images of one shard, made 100 at a time."""
    rng = np.random.default_rng(10_000 + shard)
    for start in range(0, images, 100):
        chunk = min(100, images - start)
        desc = synthetic(shard * 100 + start, chunk * FEATURES, centres).reshape(chunk, FEATURES, DIM)
        for i in range(chunk):
            yield (
                f"s{shard:05d}/{start + i:04d}",
                Features(
                    x=rng.uniform(0, 1023, FEATURES).astype(np.float32),
                    y=rng.uniform(0, 767, FEATURES).astype(np.float32),
                    scale=rng.choice([0.5, 0.71, 1, 1.41, 2, 2.83, 4], FEATURES).astype(np.float32),
                    attention=np.ones(FEATURES, np.float32),
                    descriptors=desc[i],
                    global_descriptor=np.ones(8, np.float32) / np.sqrt(8),
                    width=1024,
                    height=768,
                ),
            )


def write_worker(args):
    """Write the records of one shard (`images` synthetic images) to a data file of the table
    at `table_uri`, not yet committed; returns its `file_entry`."""
    shard, images, centres, table_uri, run = args
    rows = [fs.feature_record(image_id, "", None, f) for image_id, f in shard_features(shard, images, centres)]
    schema = fs.records_schema("float16", DIM)
    return tables.write_records(table_uri, f"part-{run}-{shard:05d}.parquet", rows, schema, table_properties(), run)


def write_table(table_uri, num_shards, images, centres, pool):
    """A features table at `table_uri` of `num_shards` data files of `images` synthetic images
    each, committed as one version; returns the URIs of its data files, in shard order."""
    run = tables.new_run_id()
    entries = pool.map(write_worker, [(s, images, centres, table_uri, run) for s in range(num_shards)])
    tables.commit(table_uri, entries, table_properties(), None, run, "synthetic", {"shards": num_shards})
    return [e["path"] for e in entries]


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encode_worker(args):
    data_file, first_id, trained_path, prefix = args
    trained = faiss.read_index(trained_path)
    start = time.time()
    counts = shards.encode_shard(tables.iter_batches(data_file, None), identity_pca(), trained, first_id, prefix)
    return {"seconds": time.time() - start, "peak_mib": peak_mib(), **counts}


def merge_worker(args):
    prefixes, trained_path, out = args
    start = time.time()
    counts = shards.merge_shards(prefixes, faiss.read_index(trained_path), out)
    return {"seconds": time.time() - start, "peak_mib": peak_mib(), **counts}


def run(millions, work, trained_path, centres, processes, images_per_shard=IMAGES_PER_SHARD):
    num_shards = round(millions * 1_000_000 / (images_per_shard * FEATURES))
    if num_shards < 1:
        raise SystemExit(f"--millions {millions:g} is less than one shard of {images_per_shard} x {FEATURES}")
    folder = os.path.join(work, f"{millions:g}M")
    os.makedirs(os.path.join(folder, "artifact"))
    prefixes = [os.path.join(folder, f"shard-{s:05d}") for s in range(num_shards)]
    # maxtasksperchild=1: one fresh process per shard, so ru_maxrss is that shard's peak
    with mp.get_context("spawn").Pool(processes, maxtasksperchild=1) as pool:
        start = time.time()
        data_files = write_table(os.path.join(folder, "features"), num_shards, images_per_shard, centres, pool)
        table_s = time.time() - start
        start = time.time()
        jobs = [(f, s * images_per_shard, trained_path, p) for s, (f, p) in enumerate(zip(data_files, prefixes))]
        encoded = pool.map(encode_worker, jobs)
        encode_s = time.time() - start
        merged = pool.apply(merge_worker, ((prefixes, trained_path, os.path.join(folder, "artifact")),))
    artifact = os.path.join(folder, "artifact")
    size = sum(os.path.getsize(os.path.join(artifact, f)) for f in ("index.ivfdata", "geometry.npy"))
    result = {
        "descriptors": merged["descriptors"],
        "shards": num_shards,
        "table_write_s": round(table_s, 1),
        "encode_wall_s": round(encode_s, 1),
        "encode_peak_mib_per_shard": round(max(e["peak_mib"] for e in encoded)),
        "merge_s": round(merged["seconds"], 1),
        "merge_peak_mib": round(merged["peak_mib"]),
        "total_wall_s": round(time.time() - start, 1),
        "bytes_per_descriptor": round(size / merged["descriptors"], 2),
    }
    shutil.rmtree(folder)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--millions", type=float, nargs="+", default=[1, 10], help="descriptors, in millions")
    parser.add_argument("--images-per-shard", type=int, default=IMAGES_PER_SHARD, help="of 1000 descriptors each")
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="delf-build-scale-")
    centres = synthetic(0, 20_000, np.random.default_rng(1).normal(size=(20_000, DIM)).astype(np.float32))
    start = time.time()
    trained = codebooks.train_index(synthetic(1, 200_000, centres), f"IVF{args.nlist},PQ10x8", seed=0)
    trained_path = os.path.join(work, "trained.faiss")
    faiss.write_index(trained, trained_path)
    print(json.dumps({"train_s": round(time.time() - start, 1), "nlist": args.nlist, "cores": os.cpu_count()}))
    for millions in args.millions:
        result = run(millions, work, trained_path, centres, args.processes, args.images_per_shard)
        print(json.dumps(result), flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
