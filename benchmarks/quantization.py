"""PCA + PQ defaults by measurement: recall of quantized k-NN against exact k-NN.

Reads a features table (e.g. landmarks-dev extracted with `delf-index extract`), fits PCA
and each candidate quantizer on a sample of its descriptors, and searches `--queries`
descriptors against all the others:

- recall@10: share of the exact 10 nearest neighbours (full-dimensional descriptors,
  inner product) found among the quantized search's 10;
- 1-NN in top 10: how often the exact nearest neighbour is among the quantized 10;
- bytes/descriptor: PQ code + 8-byte id + 6 bytes of geometry, as stored in the index.

    delf-index extract --input manifest.csv --output /tmp/lm/features
    python -m benchmarks.quantization --features '/tmp/lm/features/features/*.parquet'
"""

import argparse
import json
import time

import faiss
import numpy as np

from delf_index.indexing import codebooks
from delf_index.indexing import pca as pca_lib
from delf_index.runtime.tables import read_descriptors

CANDIDATES = [
    (40, "PQ10x5", False),  # the paper: 50-bit codes
    (40, "PQ10x8", False),
    (40, "PQ20x8", False),
    (40, "PQ10x8", True),
    (40, "PQ20x8", True),
    (64, "PQ16x8", False),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    descriptors, image_of = read_descriptors(args.features)
    descriptors = pca_lib.l2_normalise(descriptors.astype(np.float32))
    n = len(descriptors)
    rng = np.random.default_rng(args.seed)
    queries = rng.choice(n, args.queries, replace=False)
    # exact neighbours among descriptors of other images, full dimension
    exact = faiss.IndexFlatIP(descriptors.shape[1])
    exact.add(descriptors)
    _, truth = exact.search(descriptors[queries], 60)
    truth = [[j for j in row if image_of[j] != image_of[q]][:10] for q, row in zip(queries, truth)]
    nlist = codebooks.auto_nlist(n, n)
    print(f"{n} descriptors of {len(set(image_of))} images, {args.queries} queries, nlist {nlist}")
    rows = []
    for dim, pq, opq in CANDIDATES:
        start = time.time()
        pca = pca_lib.fit_pca(descriptors, dim)
        reduced = pca_lib.apply_pca(descriptors, pca)
        spec = codebooks.index_string(dim, nlist, pq, opq)
        index = codebooks.train_index(reduced, spec, args.seed)
        index.add_with_ids(reduced, np.arange(n, dtype=np.int64))
        train_s = time.time() - start
        for nprobe in args.nprobe:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            _, found = index.search(reduced[queries], 60, params=params)
            found = [[j for j in row if j >= 0 and image_of[j] != image_of[q]][:10] for q, row in zip(queries, found)]
            recall = np.mean([len(set(t) & set(f)) / max(len(t), 1) for t, f in zip(truth, found)])
            nn1 = np.mean([t[0] in f for t, f in zip(truth, found) if t])
            row = {
                "pca": dim,
                "quantizer": ("OPQ+" if opq else "") + pq,
                "nprobe": nprobe,
                "recall@10": round(float(recall), 3),
                "1-NN in top 10": round(float(nn1), 3),
                "bytes/descriptor": codebooks.code_bytes(index) + 8 + 6,
                "train_s": round(train_s, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| PCA | quantizer | nprobe | recall@10 | 1-NN in top 10 | bytes/descriptor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['pca']} | {r['quantizer']} | {r['nprobe']} | {r['recall@10']} | {r['1-NN in top 10']} "
            f"| {r['bytes/descriptor']} |"
        )


if __name__ == "__main__":
    main()
