"""Query latency split into extraction, search and verification; RANSAC against skimage.

Part 1: image queries (read, extract, search, verify) against an index built by
`delf-index evaluate` (its --workdir), then against the same index plus `--distractors`
synthetic descriptors (real descriptors with noise, random geometry) in 1000-feature images.
Part 2: the verification step alone against `skimage.measure.ransac` (what the official DELF
matcher uses: AffineTransform, 3 samples, 1000 trials) on the same correspondences, with the
inlier counts compared.

    delf-index evaluate --images .../landmarks-dev/images --groups .../groups.csv --workdir /tmp/lm
    python -m benchmarks.query_latency --workdir /tmp/lm --images .../landmarks-dev/images

Figures: benchmarks/README.md, "Query latency and verification".
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from delf_index.indexing import verify
from delf_index.indexing.retrieval import Index
from delf_index.pipelines import build
from delf_index.runtime import tables
from delf_index.runtime.features import Features
from delf_index.schemas import features as fs


def latency(index, paths):
    splits = []
    for path in paths:
        timings = {}
        start = time.perf_counter()
        index.search(path, top_k=10, timings=timings)
        timings["total_s"] = time.perf_counter() - start
        splits.append(timings)
    return {k: round(float(np.median([t[k] for t in splits])), 4) for k in splits[0]}


def distractor_table(source_uri, target_uri, images, seed=0):
    """A new features table at `target_uri`: the live images of `source_uri` (copied by
    `tables.derive`), then, as a second commit, `images` synthetic images of 1000 features
    (real descriptors of `source_uri` with noise, random geometry)."""
    snap = tables.snapshot(source_uri)
    tables.derive(source_uri, target_uri, lambda _, f: f, json.loads(snap.raw_properties["delf_index.extractor"]))
    rng = np.random.default_rng(seed)
    pool = tables.read_descriptors(source_uri)[0].astype(np.float32)
    globals_ = np.stack([f.global_descriptor for _, f in tables.iter_features(source_uri)])
    target = tables.snapshot(target_uri)
    run = tables.new_run_id(target.newest_run(target.read(["run"])))
    dim, entries, rows = pool.shape[1], [], []
    for i in range(images):
        desc = pool[rng.integers(0, len(pool), 1000)] + 0.1 * rng.normal(size=(1000, dim)).astype(np.float32)
        glob = globals_[rng.integers(0, len(globals_))] + 0.05 * rng.normal(size=globals_.shape[1])
        features = Features(
            x=rng.uniform(0, 1023, 1000).astype(np.float32),
            y=rng.uniform(0, 767, 1000).astype(np.float32),
            scale=rng.choice([0.5, 0.71, 1, 1.41, 2, 2.83, 4], 1000).astype(np.float32),
            attention=np.sort(rng.uniform(0, 1, 1000))[::-1].astype(np.float32),
            descriptors=desc / np.linalg.norm(desc, axis=1, keepdims=True),
            global_descriptor=(glob / np.linalg.norm(glob)).astype(np.float32),
            width=1024,
            height=768,
        )
        rows.append(fs.feature_record(f"distractor/{i:07d}", "", None, features, snap.properties["descriptor_dtype"]))
        if len(rows) == 1000 or i == images - 1:
            name = f"part-{run}-distractors-{len(entries):05d}.parquet"
            entries.append(
                tables.write_records(target_uri, name, rows, target.records_schema, target.raw_properties, run)
            )
            rows = []
    tables.commit(target_uri, entries, target.raw_properties, target, run, "distractors", {"images": images})


def ransac_comparison(index, queries, pairs=200):
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    conf = {**index.ransac_conf, "scale_tolerance": None, "max_anisotropy": 1e9, "max_scale_change": 1e9}
    ours_s, theirs_s, ours_n, theirs_n, sizes = 0.0, 0.0, [], [], []
    done = 0
    for features in queries:
        neighbours = index.neighbours(features)
        for result in index.search(features, top_k=5, with_matches=False)[1:]:
            q, qxy, dxy, _, _ = index.correspondences(features, neighbours, result.row)
            if len(q) < 8:
                continue
            size = tuple(index.artifact.sizes[result.row])
            threshold = conf["ransac_threshold"] * max(size) / conf["reference_size"]
            start = time.perf_counter()
            _, mask = verify.ransac_affine(qxy, dxy, size, {**conf, "min_inliers": 0})
            ours_s += time.perf_counter() - start
            start = time.perf_counter()
            _, inliers = ransac(
                (qxy.astype(np.float64), dxy.astype(np.float64)),
                AffineTransform,
                min_samples=3,
                residual_threshold=threshold,
                max_trials=1000,
                rng=0,
            )
            theirs_s += time.perf_counter() - start
            sizes.append(len(q))
            ours_n.append(int(mask.sum()))
            theirs_n.append(int(inliers.sum()) if inliers is not None else 0)
            done += 1
            if done == pairs:
                break
        if done == pairs:
            break
    ours_n, theirs_n = np.array(ours_n), np.array(theirs_n)
    return {
        "pairs": done,
        "median correspondences": float(np.median(sizes)),
        "opencv ms/pair": round(1000 * ours_s / done, 3),
        "skimage ms/pair": round(1000 * theirs_s / done, 3),
        "speed-up": round(theirs_s / ours_s, 1),
        "inliers opencv / skimage (sum)": round(float(ours_n.sum() / max(theirs_n.sum(), 1)), 3),
        "median |difference| in inliers": float(np.median(np.abs(ours_n - theirs_n))),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a `delf-index evaluate` workdir (features, codebooks, index)")
    parser.add_argument("--images", required=True, help="the images the index was built from (queries)")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--distractors", type=int, default=1_000_000, help="synthetic descriptors to add")
    args = parser.parse_args(argv)
    names = sorted(os.listdir(args.images))
    paths = [os.path.join(args.images, n) for n in names[:: max(1, len(names) // args.queries)][: args.queries]]
    index = Index.load(os.path.join(args.workdir, "index"))
    index.search(paths[0])  # warm-up: model load, first shapes
    base = {"images": len(index), "descriptors": int(index.artifact.index.ntotal), **latency(index, paths)}
    print(json.dumps({"index": "as built", **base}), flush=True)

    features_uri = os.path.join(args.workdir, "features")
    queries = [f for _, f in tables.iter_features(features_uri)]
    print(json.dumps({"verification": ransac_comparison(index, queries[:: max(1, len(queries) // 60)])}), flush=True)

    work = tempfile.mkdtemp(prefix="delf-latency-")
    try:
        grown_features = os.path.join(work, "features")
        distractor_table(features_uri, grown_features, args.distractors // 1000)
        big = os.path.join(work, "index")
        build.run(grown_features, big, codebooks=os.path.join(args.workdir, "codebooks"), beam_options={"workers": 1})
        index = Index.load(big)
        index.search(paths[0])
        grown = {"images": len(index), "descriptors": int(index.artifact.index.ntotal), **latency(index, paths)}
        print(json.dumps({"index": f"+{args.distractors} synthetic descriptors", **grown}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
