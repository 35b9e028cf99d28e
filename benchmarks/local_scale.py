"""k-NN voting against ASMK at scale: 1M / 10M / 100M synthetic descriptors, one run.

Both local indexes are built from the same shards (`build --method both`: the PQ codes are
computed once and serve k-NN voting's lists and ASMK's verification store), so one build
times every step of both. The synthetic features table of benchmarks/build_scale.py (a Delta
table, one data file of 1000 images x 1000 clustered unit 40-d descriptors per shard) is
written first (not timed as build); each data file is encoded in a fresh process (as a Beam
worker would; `--processes` at a time), then `build`'s merge step (`merge_version`) writes a
real index version (manifest, sha256) and `commit_version` publishes it, which `Index.load`
opens as a user would. `--images-per-shard` (and a fraction of a million) makes a small run
to check the script.

Measured per collection size: the seconds of each encode step summed over shards (coarse
assignment and PQ codes shared, k-NN lists, ASMK word assignment through the HNSW graph,
ASMK aggregation), peak memory of a shard process and of the merge (ru_maxrss), the merge's
steps, bytes per image of each store, and query search time (median over queries;
extraction excluded, `Index.search` on `Features`) for each local method. The queries are
noisy copies of indexed images (0.05 Gaussian noise on every descriptor), so the first result
must be the copied image: the benchmark counts how often it is (R@1).

Codebooks: identity PCA (descriptors are already 40-d), IVF{nlist},PQ10x8 trained on 200,000
descriptors, `--words` ASMK words by k-means (`--words-iterations` on 4 samples per word). The
HNSW assignment's recall against exact assignment is measured on 20,000 descriptors.

    python -m benchmarks.local_scale --millions 1 10 100 --out /tmp/local-scale.json

Figures: benchmarks/README.md, "Synthetic scale: 1M, 10M, 100M descriptors".
"""

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time

import faiss
import numpy as np

from benchmarks.build_scale import DIM, FEATURES, IMAGES_PER_SHARD, identity_pca, shard_features, synthetic, write_table
from delf_index.indexing import artifact as art
from delf_index.indexing import asmk, codebooks, shards
from delf_index.indexing.codebooks_io import load_codebooks, load_words, write_codebooks
from delf_index.indexing.retrieval import Index
from delf_index.indexing.versions import commit_version, new_version_name
from delf_index.pipelines import build
from delf_index.runtime import tables


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encode_worker(args):
    shard, data_file, first_id, codebooks_dir, staging, assigner = args
    pca, trained, _ = load_codebooks(codebooks_dir)
    # the database side's word assignment (see word_assigner), built once by the parent
    words = shards.WordAssigner(load_words(codebooks_dir), faiss.deserialize_index(assigner))
    timings = {}
    name = f"shard-{shard:05d}"
    counts = shards.encode_shard(
        tables.iter_batches(data_file, None),
        pca,
        trained,
        first_id,
        os.path.join(staging, name),
        method="both",
        words=words,
        timings=timings,
    )
    return {
        "shard": shard,
        "name": name,
        "table": data_file,
        "peak_mib": peak_mib(),
        "timings": timings,
        **counts,
    }


def merge_worker(args):
    encoded, output, staging, codebooks_dir, table_uri = args
    snap = tables.snapshot(table_uri)
    features = {"uri": snap.uri, "table_version": snap.version, "table_id": snap.table_id}
    info = {"model_fingerprint": "synthetic", "model": {}, "codebooks": {}, "extractor": {}, "features": features}
    version = new_version_name(None)
    start = time.time()
    build.merge_version(None, encoded, output, version, staging, codebooks_dir, None, (), info, "both")
    commit_version(output, version, None, keep=1, info={"operation": "build", **features})
    return {"seconds": time.time() - start, "peak_mib": peak_mib()}


def queries(count, centres, per_shard, seed=0):
    """Noisy copies of the first `count` images of shard 0 (as Features), their image_ids."""
    rng = np.random.default_rng(seed)
    out = []
    for _, (image_id, f) in zip(range(count), shard_features(0, per_shard, centres)):
        descriptors = f.descriptors.astype(np.float16).astype(np.float32)  # as stored in the table
        descriptors = descriptors + 0.05 * rng.normal(size=descriptors.shape).astype(np.float32)
        descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
        out.append((image_id, dataclasses.replace(f, descriptors=descriptors)))
    return out


def time_queries(output, method, query_set, conf=None):
    """Median seconds of search and verification, R@1 of the copies; the parts of search:
    the local scores (local_s) and the global descriptor's that both methods fuse with
    (global_s); for ASMK also the parts of its local scores, each alone: assigning the
    query's descriptors to words and aggregating them (assign_s), scanning the lists (scan_s)."""
    index = Index.load(output, conf={"local_method": method, **(conf or {})})
    index.search(query_set[0][1], top_k=1)  # warm: page in the lists' headers, faiss threads
    splits, hits = [], 0
    for image_id, features in query_set:
        timings = {}
        results = index.search(features, top_k=1, timings=timings)
        hits += bool(results) and results[0].image_id == image_id
        if method == "asmk":
            start = time.perf_counter()
            prepared = index.prepare(features)
            timings["assign_s"] = time.perf_counter() - start
            start = time.perf_counter()
            asmk.search(index.artifact.asmk, *prepared["asmk"], index.asmk_conf, bits=DIM)
            timings["scan_s"] = time.perf_counter() - start
        splits.append(timings)
    median = {k: round(float(np.median([t[k] for t in splits])), 4) for k in splits[0] if k != "extract_s"}
    return {**median, "R@1": hits / len(query_set)}


def query_times(output, centres, count, per_shard):
    """Median search and verification seconds, and R@1, of each local method on an index."""
    query_set = queries(count, centres, per_shard)
    return {
        "knn": time_queries(output, "knn", query_set),
        # the codes an IVF with 8x more cells (auto_nlist's choice at 100M) scans at nprobe 32
        "knn_nprobe4": time_queries(output, "knn", query_set, {"nprobe": 4}),
        "asmk": time_queries(output, "asmk", query_set),
        "asmk_ma3": time_queries(output, "asmk", query_set, {"asmk": {"query_assignments": 3}}),
        "asmk_ma1": time_queries(output, "asmk", query_set, {"asmk": {"query_assignments": 1}}),
        "asmk_ef64": time_queries(output, "asmk", query_set, {"asmk": {"hnsw_ef": 64}}),
        "asmk_2_threads": time_queries(output, "asmk", query_set, {"asmk": {"threads": 2}}),
    }


def run(
    millions, work, codebooks_dir, centres, processes, query_count, assigner, keep=None, per_shard=IMAGES_PER_SHARD
):
    num_shards = round(millions * 1_000_000 / (per_shard * FEATURES))
    if num_shards < 1:
        raise SystemExit(f"--millions {millions:g} is less than one shard of {per_shard} x {FEATURES}")
    folder = os.path.join(work, f"{millions:g}M")
    staging, output, table = (os.path.join(folder, n) for n in ("staging", "index", "features"))
    os.makedirs(staging)
    # maxtasksperchild=1: one fresh process per shard, so ru_maxrss is that shard's peak
    with mp.get_context("spawn").Pool(processes, maxtasksperchild=1) as pool:
        start = time.time()
        data_files = write_table(table, num_shards, per_shard, centres, pool)
        table_s = time.time() - start
        start = time.time()
        jobs = [(s, f, s * per_shard, codebooks_dir, staging, assigner) for s, f in enumerate(data_files)]
        encoded = pool.map(encode_worker, jobs)
        encode_s = time.time() - start
        merged = pool.apply(merge_worker, ((encoded, output, staging, codebooks_dir, table),))
    build_s = time.time() - start
    shutil.rmtree(staging, ignore_errors=True)
    manifest = art.Artifact.load(output, verify=False).manifest
    images = manifest["counts"]["images"]
    steps = {}
    for e in encoded:
        for k, v in e["timings"].items():
            steps[k] = steps.get(k, 0.0) + v
    result = {
        "descriptors": manifest["counts"]["descriptors"],
        "images": images,
        "table_write_s": round(table_s, 1),
        "encode_wall_s": round(encode_s, 1),
        "encode_steps_s (summed over shards)": {k: round(v, 1) for k, v in steps.items()},
        "encode_peak_mib_per_shard": round(max(e["peak_mib"] for e in encoded)),
        "merge_s": round(merged["seconds"], 1),
        "merge_steps_s": manifest["merge_steps_seconds"],
        "merge_peak_mib": round(merged["peak_mib"]),
        "build_wall_s": round(build_s, 1),
        "bytes_per_image": {k: round(v / images) for k, v in manifest["bytes"].items()},
        **query_times(output, centres, query_count, per_shard),
    }
    if keep:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(output, keep)
    shutil.rmtree(folder)
    return result


def word_assigner(centroids, nlist, nprobe):
    """The database side's word assignment here: an IVF over the words. On these synthetic
    descriptors (nearly uniform in 40-d) the product's HNSW graph (ef 64) costs ~300 us per
    descriptor on one core, more than exact search (~135 us): 100M descriptors would take
    hours. The IVF visits nprobe / nlist of the words, at a recall measured in the header; the
    lists' lengths, the bytes and the search costs do not depend on which word is nearest."""
    quantizer = faiss.IndexFlatL2(centroids.shape[1])
    index = faiss.IndexIVFFlat(quantizer, centroids.shape[1], nlist)
    index.cp.seed = 0
    index.train(centroids)
    index.add(centroids)
    index.nprobe = nprobe
    return index


def word_recall(centroids, centres, count=20_000, **indexes):
    """Share of descriptors each index assigns to their exact nearest word, and its cost."""
    sample = synthetic(99, count, centres)
    start = time.perf_counter()
    exact = asmk.assign(asmk.word_index(centroids, {"hnsw_above": len(centroids)}), sample, 1)[:, 0]
    out = {"exact": {"recall": 1.0, "us_per_descriptor": round((time.perf_counter() - start) / count * 1e6, 1)}}
    for name, (index, ef) in indexes.items():
        start = time.perf_counter()
        found = asmk.assign(index, sample, 1, ef)[:, 0]
        seconds = time.perf_counter() - start
        out[name] = {
            "recall": round(float(np.mean(found == exact)), 4),
            "us_per_descriptor": round(seconds / count * 1e6, 1),
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--millions", type=float, nargs="+", default=[1, 10], help="descriptors, in millions")
    parser.add_argument("--images-per-shard", type=int, default=IMAGES_PER_SHARD, help="of 1000 descriptors each")
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--words", type=int, default=65536)
    parser.add_argument("--words-iterations", type=int, default=5)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--codebooks", help="reuse the codebooks (and words) of an earlier run: a folder")
    parser.add_argument("--assign-nlist", type=int, default=1024, help="database word assignment: IVF cells")
    parser.add_argument("--assign-nprobe", type=int, default=8, help="database word assignment: cells visited")
    parser.add_argument("--out", help="also write the results (JSON lines) here")
    parser.add_argument("--keep", help="move the largest index here instead of deleting it")
    parser.add_argument("--time-queries", metavar="INDEX", help="only time the queries on an index kept by --keep")
    args = parser.parse_args(argv)
    centres = synthetic(0, 20_000, np.random.default_rng(1).normal(size=(20_000, DIM)).astype(np.float32))
    if args.time_queries:
        print(json.dumps(query_times(args.time_queries, centres, args.queries, args.images_per_shard)))
        return
    work = tempfile.mkdtemp(prefix="delf-local-scale-")
    codebooks_dir = os.path.join(work, "codebooks")
    header = {"nlist": args.nlist, "words": args.words, "cores": os.cpu_count()}
    if args.codebooks:
        shutil.copytree(args.codebooks, codebooks_dir)
    else:
        start = time.time()
        trained = codebooks.train_index(synthetic(1, 200_000, centres), f"IVF{args.nlist},PQ10x8", seed=0)
        header["train_s"] = round(time.time() - start, 1)
        start = time.time()
        words = asmk.fit_words(synthetic(2, 4 * args.words, centres), args.words, niter=args.words_iterations)
        header["words_s"] = round(time.time() - start, 1)
        os.makedirs(codebooks_dir)
        write_codebooks(codebooks_dir, identity_pca(), trained, {"model_fingerprint": "synthetic"}, words)
    words = load_words(codebooks_dir)
    header["nlist"] = faiss.extract_index_ivf(load_codebooks(codebooks_dir)[1]).nlist
    header["words"] = len(words)
    database_side = word_assigner(words, args.assign_nlist, args.assign_nprobe)
    header["word_assignment"] = word_recall(
        words,
        centres,
        **{
            f"ivf{args.assign_nlist}_nprobe{args.assign_nprobe} (database side here)": (database_side, None),
            "hnsw ef 64": (asmk.word_index(words), 64),
            f"hnsw ef {asmk.default_conf['hnsw_ef']} (the product's, query side)": (asmk.word_index(words), None),
        },
    )
    assigner = faiss.serialize_index(database_side)
    lines = [header]
    print(json.dumps(header), flush=True)
    for millions in args.millions:
        keep = args.keep if millions == max(args.millions) else None
        result = run(
            millions, work, codebooks_dir, centres, args.processes, args.queries, assigner, keep, args.images_per_shard
        )
        lines.append({"millions": millions, **result})
        print(json.dumps(lines[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(json.dumps(line) for line in lines) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
