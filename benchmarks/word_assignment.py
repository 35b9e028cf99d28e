"""Assigning query descriptors to ASMK's words through the HNSW graph (indexing/asmk.py):
recall against exact assignment, and milliseconds per 1000 descriptors (one image query),
on real descriptors (landmarks-dev) and on the synthetic ones of benchmarks/local_scale.py.

Real: the PCA-reduced descriptors of an `evaluate` workdir's feature tables; words by k-means
on the first `--train-images` images (65,536 words from ~150,000 descriptors is ~2 points per
word: the words are then nearly data points, the layout a graph search meets at that count on
real data, not a good codebook), queries are the descriptors of the other images. Synthetic:
the words of a local_scale run (`--synthetic-words`, its codebooks folder) and 5000 of its
nearly uniform 40-d descriptors. Recall@1: the nearest word found; recall@5: the share of the
exact 5 nearest found (a query uses 5: `query_assignments`). Time: best of 3, all cores.
The product's graph holds the words in float16; one row measures a float32 graph (what
earlier indexes held) at the default ef.

    python -m benchmarks.word_assignment --features /tmp/lmA/features --codebooks /tmp/lmA/codebooks \
        --synthetic-words /tmp/words65536
"""

import argparse
import json
import time

import faiss
import numpy as np

from delf_index.indexing import asmk
from delf_index.indexing import pca as pca_lib
from delf_index.indexing.codebooks_io import load_codebooks, load_words
from delf_index.runtime import tables


def measure(words, queries, efs, k=5):
    """Recall@1, recall@k and ms per 1000 descriptors: exact, and HNSW at each ef."""
    exact = faiss.IndexFlatL2(words.shape[1])
    exact.add(words)
    graph = asmk.word_index(words, {"hnsw_above": 0})
    float32 = faiss.IndexHNSWFlat(words.shape[1], 32)
    float32.hnsw.efConstruction = 80
    float32.add(words)
    default = asmk.default_conf["hnsw_ef"]
    runs = [("exact", exact, None)] + [(f"hnsw ef {ef}", graph, ef) for ef in efs]
    rows = []
    for name, index, ef in runs + [(f"hnsw float32 ef {default}", float32, default)]:
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            found = asmk.assign(index, queries, k, ef)
            seconds.append(time.perf_counter() - start)
        if ef is None:
            reference = found
        recall_k = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, reference)])
        rows.append(
            {
                "assignment": name,
                "recall@1": round(float(np.mean(found[:, 0] == reference[:, 0])), 3),
                f"recall@{k}": round(float(recall_k), 3),
                "ms_per_1000": round(1000 * min(seconds) / len(queries) * 1000, 1),
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", help="feature tables (an evaluate workdir's features folder)")
    parser.add_argument("--codebooks", help="codebooks folder whose PCA reduces them")
    parser.add_argument("--train-images", type=int, default=150)
    parser.add_argument("--words", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--synthetic-words", help="a local_scale codebooks folder (its 65,536 words)")
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args(argv)
    if args.features:
        pca, _, _ = load_codebooks(args.codebooks)
        images = [pca_lib.apply_pca(f.descriptors, pca) for _, f in tables.iter_features(args.features)]
        train = np.concatenate(images[: args.train_images]).astype(np.float32)
        queries = np.concatenate(images[args.train_images :]).astype(np.float32)
        for count in args.words:
            start = time.time()
            words = asmk.fit_words(train, count, niter=10)
            header = {"data": "landmarks-dev", "words": count, "train": len(train), "queries": len(queries)}
            header["fit_s"] = round(time.time() - start, 1)
            for row in measure(words, queries, args.ef):
                print(json.dumps({**header, **row}), flush=True)
    if args.synthetic_words:
        from benchmarks.build_scale import DIM, synthetic

        words = load_words(args.synthetic_words)
        centres = synthetic(0, 20_000, np.random.default_rng(1).normal(size=(20_000, DIM)).astype(np.float32))
        queries = synthetic(99, 5000, centres)
        for row in measure(words, queries, args.ef):
            print(json.dumps({"data": "synthetic", "words": len(words), "queries": len(queries), **row}), flush=True)


if __name__ == "__main__":
    main()
