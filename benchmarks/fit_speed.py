"""What `delf-index fit` spends training the quantizers, as shipped against faiss's defaults.

`codebooks.train_index` switches off faiss's polysemous training (it reorders an IVF-PQ's
centroids for a Hamming-distance search that delf-index never runs) and computes k-means
distances by BLAS for every batch (faiss's default sends batches under 128,000 points to a
scalar loop, slow on PQ's 4-d sub-vectors). This script trains the same IVF-PQ on the same
synthetic clustered unit vectors both ways, one after the other in one process, and reports
seconds and the mean squared reconstruction error of 20,000 held-out vectors (the codes'
quality: what k-NN voting ranks with). Sizes: landmarks-dev's sample (186k descriptors:
IVF2048), a small corpus (21k: IVF64) and build_scale's codebooks (200k: IVF4096).

    python -m benchmarks.fit_speed

Figures: benchmarks/README.md, "Fit time (issue 34)".
"""

import argparse
import time

import faiss
import numpy as np

from delf_index.indexing import codebooks

CASES = [(21_000, 64), (186_000, 2048), (200_000, 4096)]  # (sample, coarse cells)


def clustered(n, seed, dim=40, centres=2000):
    """n unit vectors around `centres` shared centres (real descriptors cluster likewise)."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(size=(centres, dim)).astype(np.float32)
    x = means[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_defaults(reduced, spec, seed):
    """train_index as it was: faiss's polysemous training on, its BLAS threshold kept."""
    index = faiss.index_factory(reduced.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed, ivf.cp.niter, ivf.pq.cp.seed = seed, 20, seed
    index.train(reduced)
    return index


def reconstruction_error(index, held_out):
    """Mean squared error of the held-out vectors reconstructed from their codes."""
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    _, cells = ivf.quantizer.search(held_out, 1)
    codes = ivf.pq.compute_codes(held_out - ivf.quantizer.reconstruct_n(0, ivf.nlist)[cells[:, 0]])
    decoded = ivf.pq.decode(codes) + ivf.quantizer.reconstruct_n(0, ivf.nlist)[cells[:, 0]]
    return float(((decoded - held_out) ** 2).sum(axis=1).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0: faiss's default, all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    held_out = clustered(20_000, seed=99)
    print("| sample | index | faiss defaults | shipped | speed-up | MSE defaults | MSE shipped |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, nlist in CASES:
        x, spec = clustered(n, seed=1), f"IVF{nlist},PQ10x8"
        start = time.time()
        old = faiss_defaults(x, spec, 0)
        old_s = time.time() - start
        start = time.time()
        new = codebooks.train_index(x, spec, 0)
        new_s = time.time() - start
        print(f"| {n:,} | {spec} | {old_s:.1f} s | {new_s:.1f} s | {old_s / new_s:.1f}x "
              f"| {reconstruction_error(old, held_out):.5f} | {reconstruction_error(new, held_out):.5f} |")  # fmt: skip


if __name__ == "__main__":
    main()
