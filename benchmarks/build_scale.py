"""Index build at scale: synthetic 40-d descriptors, 1M and 10M, wall time and peak memory.

Runs the two steps of `delf-index build` (indexing/shards.py) directly, without Beam: each
shard of 1000 images x 1000 descriptors is encoded in its own process (as a Beam worker
would), then one process merges all shards. Descriptors are random unit vectors with a
cluster structure; the PCA is the identity (the descriptors are already 40-d), so the
numbers are those of encoding, merging and writing. Peak memory is each process's maximum
resident set (ru_maxrss).

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


def shard_tables(shard, centres):
    """Feature-table chunks of one shard, generated on the fly (100 images at a time)."""
    schema = fs.features_schema(DIM, 8, "float16")
    rng = np.random.default_rng(10_000 + shard)
    for start in range(0, IMAGES_PER_SHARD, 100):
        desc = synthetic(shard * 100 + start, 100 * FEATURES, centres).reshape(100, FEATURES, DIM)
        rows = []
        for i in range(100):
            rows.append(
                {
                    "image_id": f"s{shard:05d}/{start + i:04d}",
                    "uri": "",
                    "label": None,
                    "width": 1024,
                    "height": 768,
                    "num_features": FEATURES,
                    "x": rng.uniform(0, 1023, FEATURES).astype(np.float32),
                    "y": rng.uniform(0, 767, FEATURES).astype(np.float32),
                    "scale": rng.choice([0.5, 0.71, 1, 1.41, 2, 2.83, 4], FEATURES).astype(np.float32),
                    "attention": np.ones(FEATURES, np.float32),
                    "descriptors": desc[i].astype(np.float16),
                    "global_descriptor": np.ones(8, np.float32) / np.sqrt(8),
                }
            )
        yield fs.rows_to_table(rows, schema)


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encode_worker(args):
    shard, trained_path, centres, prefix = args
    trained = faiss.read_index(trained_path)
    start = time.time()
    counts = shards.encode_shard(
        shard_tables(shard, centres), identity_pca(), trained, shard * IMAGES_PER_SHARD, prefix
    )
    return {"seconds": time.time() - start, "peak_mib": peak_mib(), **counts}


def merge_worker(args):
    prefixes, trained_path, out = args
    start = time.time()
    counts = shards.merge_shards(prefixes, faiss.read_index(trained_path), out)
    return {"seconds": time.time() - start, "peak_mib": peak_mib(), **counts}


def run(millions, work, trained_path, centres, processes):
    num_shards = millions * 1_000_000 // (IMAGES_PER_SHARD * FEATURES)
    folder = os.path.join(work, f"{millions}M")
    os.makedirs(os.path.join(folder, "artifact"))
    prefixes = [os.path.join(folder, f"shard-{s:05d}") for s in range(num_shards)]
    start = time.time()
    # maxtasksperchild=1: one fresh process per shard, so ru_maxrss is that shard's peak
    with mp.get_context("spawn").Pool(processes, maxtasksperchild=1) as pool:
        encoded = pool.map(encode_worker, [(s, trained_path, centres, p) for s, p in enumerate(prefixes)])
        encode_s = time.time() - start
        merged = pool.apply(merge_worker, ((prefixes, trained_path, os.path.join(folder, "artifact")),))
    artifact = os.path.join(folder, "artifact")
    size = sum(os.path.getsize(os.path.join(artifact, f)) for f in ("index.ivfdata", "geometry.npy"))
    result = {
        "descriptors": merged["descriptors"],
        "shards": num_shards,
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
    parser.add_argument("--millions", type=int, nargs="+", default=[1, 10])
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
        print(json.dumps(run(millions, work, trained_path, centres, args.processes)), flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
