"""ASMK: the aggregated selective match kernel (Tolias, Avrithis, Jegou, ICCV 2013), the local
ranking of collections that outgrow k-NN voting.

Each image's descriptors are assigned to visual words; per word, the residuals to the word's
centroid are summed and binarized (one bit per dimension: the sign). An image becomes at
most one short binary code per word it uses, and a query touches only the inverted lists of
its words. The similarity of two codes of one word is 1 - 2 h / bits (h their Hamming
distance); the selectivity function keeps it when it reaches `threshold` and raises it to
the power `alpha`; IDF weighs words by rarity. Scores are normalised by each image's and the
query's self-similarity, so they lie in [0, 1].

Layout on disk (index version files, memory-mapped; schemas/artifact.py): the index that
assigns descriptors to words (`asmk_words.faiss`: exact, or an HNSW graph over many words),
and the inverted file as CSR `.npy` arrays: offsets per word, image ids (int32) and packed
signatures (uint8) per entry, IDF per word, and each image's normalisation. Differences
from the `asmk` package of the method's authors are in docs/index.md.
"""

import faiss
import numpy as np

# the number of words is a codebook setting (codebooks.default_conf["asmk_words"]); a
# signature has one bit per dimension of the PCA-reduced descriptors (codebooks' pca_dim)
default_conf = {
    "alpha": 3.0,  # selectivity exponent (the paper: 3)
    "threshold": 0.0,  # selectivity threshold tau on the code similarity (the paper: 0)
    "query_assignments": 5,  # words per query descriptor (multiple assignment, the paper: 5)
    "hnsw_above": 8192,  # assign to words through an HNSW graph when there are more words
    "hnsw_ef": 64,  # HNSW search breadth (recall against the cost of an assignment)
}


def fit_words(reduced, words, seed=0, niter=20):
    """Visual-word centroids [words, d] by k-means on a sample [n, d] (faiss, seeded)."""
    reduced = np.ascontiguousarray(reduced, np.float32)
    kmeans = faiss.Kmeans(reduced.shape[1], int(words), niter=niter, seed=seed, max_points_per_centroid=256)
    kmeans.train(reduced)
    return kmeans.centroids


def word_index(centroids, conf=None):
    """A faiss index that assigns descriptors to their nearest words: exact when there are few
    words, an HNSW graph over them when there are many (assigning 100M descriptors to 65k words
    exactly costs hours on 2 cores; benchmarks/README.md measures what HNSW costs in recall)."""
    conf = {**default_conf, **(conf or {})}
    centroids = np.ascontiguousarray(centroids, np.float32)
    if len(centroids) > conf["hnsw_above"]:
        index = faiss.IndexHNSWFlat(centroids.shape[1], 32)
        index.hnsw.efConstruction = 80
    else:
        index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index


def assign(index, reduced, k, ef=None):
    """The k nearest words of each descriptor [n, k] (int64; -1 where fewer were found)."""
    k = min(int(k), index.ntotal)
    if isinstance(index, faiss.IndexHNSWFlat):
        params = faiss.SearchParametersHNSW(efSearch=max(int(ef or default_conf["hnsw_ef"]), k))
        return index.search(np.ascontiguousarray(reduced, np.float32), k, params=params)[1]
    return index.search(np.ascontiguousarray(reduced, np.float32), k)[1]


def aggregate(reduced, assignments, centroids):
    """(words [u], packed signatures [u, bytes]) of one image: per word, the sign bits of the
    sum of the residuals of the descriptors assigned to it. `assignments`: [n, k] word ids."""
    n, k = assignments.shape
    words = assignments.ravel()
    rows = np.repeat(np.arange(n), k)
    found = words >= 0  # faiss gives -1 for neighbours it did not find
    words, rows = words[found], rows[found]
    unique, inverse = np.unique(words, return_inverse=True)
    sums = np.zeros((len(unique), reduced.shape[1]), np.float32)
    np.add.at(sums, inverse, reduced[rows] - centroids[words])
    return unique.astype(np.int64), np.packbits(sums > 0, axis=1)


def search(ivf, words, signatures, conf=None, live=None, bits=None):
    """ASMK similarity of a query (its aggregated words and signatures) with every image
    [num_images]: sum over shared words of idf^2 * selectivity(code similarity), normalised.
    `bits`: of a signature, the dimension of the descriptors (default: its bytes x 8; the
    padding bits are 0 in every code, so they change no distance, only this scale)."""
    conf = {**default_conf, **(conf or {})}
    offsets, idf, norms = ivf["offsets"], ivf["idf"], ivf["norms"]
    scores = np.zeros(len(norms), np.float64)
    starts, ends = offsets[words], offsets[words + 1]
    lengths = ends - starts
    if lengths.sum():
        # the query words' posting lists, copied as contiguous slices of the memory-mapped file
        images = np.concatenate([ivf["images"][s:e] for s, e in zip(starts, ends)])
        stored = np.concatenate([ivf["signatures"][s:e] for s, e in zip(starts, ends)])
        # Hamming distances on uint64 words: numpy counts them ~6x faster than bytes (measured)
        differing = np.bitwise_count(as_uint64(stored) ^ np.repeat(as_uint64(signatures), lengths, axis=0))
        distance = differing[:, 0] if differing.shape[1] == 1 else differing.sum(axis=1)
        bits = bits or signatures.shape[1] * 8
        similarity = 1.0 - 2.0 * np.arange(bits + 1) / bits  # for each possible distance
        selectivity = np.where(similarity >= conf["threshold"], np.maximum(similarity, 0) ** conf["alpha"], 0.0)
        weight = selectivity[distance] * np.repeat(idf[words].astype(np.float64) ** 2, lengths)
        scores = np.bincount(images, weights=weight, minlength=len(norms))
    query_norm = np.sqrt(float((idf[words] ** 2).sum()))
    scores = scores / np.maximum(norms * query_norm, 1e-12)
    if live is not None:
        scores[~live] = 0
    return scores.astype(np.float32)


def as_uint64(rows):
    """Rows of packed bits [n, bytes] as rows of uint64 words [n, ceil(bytes / 8)], zero padded."""
    width = 8 * ((rows.shape[1] + 7) // 8)
    padded = np.zeros((len(rows), width), np.uint8)
    padded[:, : rows.shape[1]] = rows
    return padded.view(np.uint64)
