"""Batch search and the match graph, measured on landmarks-dev.

    python -m benchmarks.match_graph --workdir /tmp/lm --distractors 1000000

`--workdir` is a `delf-index evaluate` workdir of landmarks-dev (features, codebooks, index).
Measures, in one run:

1. `delf-index match` over the index: its clusters against the true groups (adjusted Rand
   index, purity, completeness; every distractor is its own group);
2. the label report after flipping 10 % of the labels at random (three seeds): how many
   flipped labels are among the report's top suspects (as many suspects as flips);
   both for several edge thresholds (inliers);
3. queries per second per core from feature tables (no extraction): the query module on one
   thread, and the search job's wall time, against the index and against it plus
   `--distractors` synthetic descriptors (benchmarks/query_latency.py's distractors).

Figures: benchmarks/README.md, "Batch search and the match graph (issue 14)".
"""

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from collections import Counter

import cv2
import faiss
import numpy as np

from benchmarks.landmarks import LANDMARKS
from benchmarks.query_latency import distractor_table
from delf_index.indexing import graph
from delf_index.indexing.retrieval import Index
from delf_index.pipelines import build, match, search
from delf_index.runtime import storage
from delf_index.runtime.tables import iter_features


def cluster_quality(groups, clusters):
    """ARI, purity (share of images whose cluster's majority group is theirs) and completeness
    (share of images in the cluster holding most of their group)."""
    ids = sorted(clusters)
    truth = [groups.get(i) or f"distractor:{i}" for i in ids]
    found = [clusters[i] for i in ids]
    by_cluster, by_group = {}, {}
    for t, c in zip(truth, found):
        by_cluster.setdefault(c, []).append(t)
        by_group.setdefault(t, []).append(c)
    purity = sum(Counter(v).most_common(1)[0][1] for v in by_cluster.values()) / len(ids)
    completeness = sum(Counter(v).most_common(1)[0][1] for v in by_group.values()) / len(ids)
    return {"ari": graph.adjusted_rand_index(truth, found), "purity": purity, "completeness": completeness}


def flipped_labels(groups, share, seed):
    """Labels with `share` of the labelled images given another group's label (seeded)."""
    rng = np.random.default_rng(seed)
    labelled = sorted(i for i, g in groups.items() if g)
    names = sorted({g for g in groups.values() if g})
    flips = set(rng.choice(labelled, round(share * len(labelled)), replace=False).tolist())
    labels = dict(groups)
    for image_id in sorted(flips):
        labels[image_id] = str(rng.choice([n for n in names if n != groups[image_id]]))
    return labels, flips


def queries_per_second(index, features):
    faiss.omp_set_num_threads(1)
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for image_id, f in features:
        index.search(f, top_k=10, exclude=[image_id], with_matches=False)
    seconds = time.perf_counter() - start
    faiss.omp_set_num_threads(os.cpu_count())
    cv2.setNumThreads(-1)
    return len(features) / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a delf-index evaluate workdir of landmarks-dev")
    parser.add_argument("--distractors", type=int, default=1_000_000, help="synthetic descriptors to add")
    parser.add_argument("--top", type=int, default=50)
    args = parser.parse_args(argv)
    with open(os.path.join(LANDMARKS, "groups.csv")) as f:
        groups = {r["image"]: r["group"] or None for r in csv.DictReader(f)}
    index_uri, features_uri = (os.path.join(args.workdir, n) for n in ("index", "features"))
    out = tempfile.mkdtemp(prefix="delf-match-")
    try:
        start = time.time()
        summary = match.run(index_uri, os.path.join(out, "match"), conf={"top": args.top}, labels=groups)
        match_s = time.time() - start
        pairs = storage.read_parquet_rows(os.path.join(out, "match", "pairs"))
        print(
            json.dumps(
                {
                    "match": {
                        "seconds": round(match_s, 1),
                        "pairs": len(pairs),
                        **{k: summary[k] for k in ("clusters", "largest_cluster", "clustered_images")},
                    }
                }
            ),
            flush=True,
        )
        ids = sorted(groups)
        for threshold in (12, 20, 30, 40):
            edges = match.edges(pairs, threshold)
            numbers, _ = graph.clusters(ids, edges)
            quality = cluster_quality(groups, dict(zip(ids, numbers.tolist())))
            flips = []
            for seed in (0, 1, 2):
                labels, flipped = flipped_labels(groups, 0.10, seed)
                images, _ = graph.label_report(labels, edges)
                flips.append(
                    {
                        "flipped": len(flipped),
                        "in_top_k": len(flipped & {r["image_id"] for r in images[: len(flipped)]}),
                        "in_top_2k": len(flipped & {r["image_id"] for r in images[: 2 * len(flipped)]}),
                    }
                )
            print(
                json.dumps(
                    {
                        "edge_min_inliers": threshold,
                        "edges": len(edges),
                        "clusters": int(numbers.max()) + 1,
                        **{k: round(v, 3) for k, v in quality.items()},
                        "flipped_labels_by_seed": flips,
                    }
                ),
                flush=True,
            )

        features = list(iter_features(features_uri))
        for name, uri in (("landmarks-dev", index_uri),):
            index = Index.load(uri)
            qps = queries_per_second(index, features)
            start = time.time()
            search.run(features_uri, uri, os.path.join(out, "search"), {"top": 10, "exclude_self": True})
            print(
                json.dumps(
                    {
                        "index": name,
                        "descriptors": int(index.artifact.index.ntotal),
                        "queries": len(features),
                        "queries_per_second_one_thread": round(qps, 2),
                        "search_job_s": round(time.time() - start, 1),
                    }
                ),
                flush=True,
            )
        big_features = os.path.join(out, "features")
        distractor_table(features_uri, big_features, args.distractors // 1000)
        big = os.path.join(out, "big-index")
        build.run(big_features, big, codebooks=index_uri)
        index = Index.load(big)
        qps = queries_per_second(index, features)
        start = time.time()
        # the big index is built from another table (the copy with the distractors): search
        # refuses exclude_self there, so each query's own image may take one of its top 10
        search.run(features_uri, big, os.path.join(out, "search-big"), {"top": 10, "exclude_self": False})
        print(
            json.dumps(
                {
                    "index": f"landmarks-dev + {args.distractors} synthetic descriptors",
                    "descriptors": int(index.artifact.index.ntotal),
                    "queries": len(features),
                    "search_job_exclude_self": False,
                    "queries_per_second_one_thread": round(qps, 2),
                    "search_job_s": round(time.time() - start, 1),
                }
            ),
            flush=True,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
