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
and the inverted file as CSR `.npy` arrays: offsets per word, packed signatures (uint8) per
entry, the entries' image ids in the Elias-Fano code per word (encode_ids: about 7.7 bits
per id at 100M descriptors), IDF per word, and each image's normalisation. A query's lists
are scanned by a compiled loop (numba). Differences from the `asmk` package of the method's
authors are in docs/index.md.
"""

import concurrent.futures
import os

import faiss
import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

from delf_index.errors import UserError

# the number of words is a codebook setting (codebooks.default_conf["asmk_words"]); a
# signature has one bit per dimension of the PCA-reduced descriptors (codebooks' pca_dim)
default_conf = {
    # selectivity exponent. The paper's 3 was set for 128-bit codes; with DELF's 40-bit ones 2
    # ranked better at every stage on every seed of landmarks-dev (benchmarks/README.md)
    "alpha": 2.0,
    "threshold": 0.0,  # selectivity threshold tau on the code similarity (the paper: 0)
    "query_assignments": 5,  # words per query descriptor (multiple assignment, the paper: 5)
    # weigh words by idf^2, idf = log(images / images of the word) (the paper); False: every
    # word 1, as the `asmk` package's examples (landmarks-dev: the same at alpha 2, 0.004 lower
    # at alpha 3; benchmarks/README.md)
    "idf": True,
    "hnsw_above": 8192,  # assign to words through an HNSW graph when there are more words
    "hnsw_ef": 32,  # HNSW search breadth: recall of the words against the cost of assigning them
    "threads": 1,  # threads scanning one query's lists (more: lower latency on an idle multi-core machine)
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
    exactly costs hours on 2 cores; benchmarks/README.md measures what HNSW costs in recall).
    The graph holds the words in float16: the same recall as float32 in 3 to 18 % less time
    (benchmarks/README.md, "Assigning query descriptors to words"); residuals are taken from the exact centroids."""
    conf = {**default_conf, **(conf or {})}
    centroids = np.ascontiguousarray(centroids, np.float32)
    if len(centroids) > conf["hnsw_above"]:
        index = faiss.IndexHNSWSQ(centroids.shape[1], faiss.ScalarQuantizer.QT_fp16, 32)
        index.hnsw.efConstruction = 80
        index.train(centroids)  # float16 needs no training; faiss asks for the call
    else:
        index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index


def assign(index, reduced, k, ef=None):
    """The k nearest words of each descriptor [n, k] (int64; -1 where fewer were found)."""
    k = min(int(k), index.ntotal)
    if isinstance(index, faiss.IndexHNSW):  # float16 words, or float32 (indexes of format <= 4)
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
    [num_images]: sum over shared words of idf^2 * selectivity(code similarity), normalised
    (without `idf`: every word weighs 1). `ivf`: the inverted file (open_lists). `bits`: of a
    signature, the dimension of the descriptors (default: its bytes x 8; the padding bits
    are 0 in every code, so they change no distance, only this scale). The lists are scanned
    by a compiled loop (numba), the query's words split over `threads` threads."""
    conf = {**default_conf, **(conf or {})}
    offsets, idf, norms = ivf["offsets"], ivf["idf"], ivf["norms"]
    if not conf["idf"]:
        idf, norms = np.ones_like(idf), unweighted_norms(ivf)
    words = np.asarray(words, np.int64)
    assert len(words) == len(signatures) and signatures.shape[1] == ivf["signatures"].shape[1], signatures.shape
    assert len(words) == 0 or (words.min() >= 0 and words.max() < len(offsets) - 1), "word out of range"
    query = as_uint64(signatures)
    bits = bits or signatures.shape[1] * 8
    # the selectivity of every possible Hamming distance (0 past `bits`: the padding never differs)
    similarity = 1.0 - 2.0 * np.arange(64 * query.shape[1] + 1) / bits
    table = np.where(similarity >= conf["threshold"], np.maximum(similarity, 0) ** conf["alpha"], 0.0)
    table[bits + 1 :] = 0.0
    # per query word, what an entry at each distance adds: idf^2 x selectivity
    weighted = ((idf[words].astype(np.float64) ** 2)[:, None] * table[None, :]).astype(np.float32)
    threads = max(1, min(int(conf["threads"]), len(words)))
    scores = np.zeros((threads, len(norms)), np.float32)
    codes = ivf["signatures"]  # [entries, bytes], C order: one flat byte array for _scan
    ids = ivf["ids"]
    lists = (offsets, ids, ids.view(np.uint8), ivf["low_bits"], ivf["id_offsets"], codes.reshape(-1), codes.shape[1])

    def scan(t):  # every threads-th word: each thread adds into its own row of scores
        _scan(*lists, words[t::threads], query[t::threads], weighted[t::threads], scores[t])

    if threads == 1:
        scan(0)
    else:  # _scan releases the GIL, so the threads run in parallel
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(scan, range(threads)))
    query_norm = np.sqrt(float((idf[words] ** 2).sum()))
    scores = scores.sum(axis=0) / np.maximum(norms * query_norm, 1e-12)
    if live is not None:
        scores[~live] = 0
    return scores.astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _scan(offsets, ids, id_bytes, low_bits, id_offsets, codes, code_bytes, words, query, weighted, scores):
    """For each query word q and each entry of its list: scores[image] += weighted[q,
    Hamming distance between the entry's and the query's signature]. `ids`, `low_bits`,
    `id_offsets`: the entries' image ids (encode_ids), `id_bytes` the same array as bytes;
    `codes`: the entries' signatures, `code_bytes` each, as one flat byte array; `query`: the
    query's signatures as uint64 words (as_uint64)."""
    # signatures of up to 64 bits (PCA to 40 dimensions: 5 bytes) are read with one unaligned
    # 8-byte load, masked to the signature (1.8x faster than assembling them byte by byte,
    # measured), except where the load would pass the end of `codes`
    short = query.shape[1] == 1
    loadable = (len(codes) - 8) // code_bytes + 1 if short and len(codes) >= 8 else 0
    mask = np.uint64(2 ** (8 * code_bytes) - 1) if code_bytes < 8 else np.uint64(0xFFFFFFFFFFFFFFFF)
    for q in range(len(words)):
        word, row, first = words[q], weighted[q], query[q, 0]
        start, end = offsets[word], offsets[word + 1]
        if start == end:
            continue
        low_count, lows, high_start, high_end = _id_block(low_bits, id_offsets, word, end - start)
        if end <= loadable:  # all but the last word of the file: one load per signature
            _scan_word(
                ids,
                id_bytes,
                low_count,
                lows,
                high_start,
                high_end,
                codes,
                code_bytes,
                mask,
                first,
                row,
                start,
                end,
                scores,
            )
            continue
        at, pending = _first_high(ids, high_start)
        for entry in range(start, end):
            image, at, pending = _next_id(
                ids, id_bytes, entry - start, low_count, lows, high_start, high_end, at, pending
            )
            distance = _distance(codes, code_bytes, entry, query[q])
            if 0 <= image < len(scores):  # never outside the array, whatever the files hold
                scores[image] += row[distance]


@numba.njit(cache=True, nogil=True, inline="always")
def _scan_word(
    ids, id_bytes, low_count, lows, high_start, high_end, codes, code_bytes, mask, query, row, start, end, scores
):
    """_scan's loop over the entries [start, end) of a word whose signatures can each be read
    with one 8-byte load: the high parts of the ids a uint64 at a time, an entry per set bit
    (the same work as _next_id without its test for the next uint64 per entry: 15 % faster)."""
    low_mask = (np.uint64(1) << np.uint64(low_count)) - np.uint64(1)
    entry, at, last = start, high_start >> 6, (high_end - 1) >> 6
    pending = ids[at] & (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(high_start & 63))
    while True:
        base = at * 64 - high_start  # the position of the uint64's first bit in the high parts
        while pending and entry < end:
            i = entry - start
            high = base + np.int64(_trailing_zeros(pending)) - i
            pending &= pending - np.uint64(1)
            position = lows + i * low_count
            loaded = _load_uint64(id_bytes, position >> 3) >> np.uint64(position & 7)
            image = (high << low_count) | np.int64(loaded & low_mask)
            distance = _popcount((_load_uint64(codes, entry * code_bytes) & mask) ^ query)
            if 0 <= image < len(scores):  # never outside the array, whatever the files hold
                scores[image] += row[distance]
            entry += 1
        at += 1
        if at > last or entry == end:
            return
        pending = ids[at]


@numba.njit(cache=True, nogil=True, inline="always")
def _distance(codes, code_bytes, entry, query):
    """Hamming distance between the signature of `entry` and a query's (uint64 words), read
    byte by byte."""
    distance, start = np.uint64(0), entry * code_bytes
    for chunk in range(len(query)):
        code = np.uint64(0)
        for b in range(8 * chunk, min(8 * chunk + 8, code_bytes)):
            code |= np.uint64(codes[start + b]) << np.uint64(8 * (b - 8 * chunk))
        distance += _popcount(code ^ query[chunk])
    return distance


@intrinsic
def _load_uint64(typingctx, codes, start):
    """The 8 bytes of a uint8 array from `start` as one uint64 (little-endian machines, as
    as_uint64 packs the query), in one load that needs no alignment."""

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = builder.gep(array.data, [args[1]])
        return builder.load(builder.bitcast(pointer, ir.IntType(64).as_pointer()), align=1)

    return numba.types.uint64(codes, numba.types.int64), codegen


@intrinsic
def _trailing_zeros(typingctx, x):
    """The number of trailing zero bits of a uint64 (64 for 0), one instruction."""

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return numba.types.uint64(numba.types.uint64), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _popcount(x):
    """Set bits of a uint64 (the SWAR count; LLVM turns it into one instruction where it can)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@numba.njit(cache=True, nogil=True)
def encode_ids(ids, offsets):
    """The image ids of a CSR (`offsets` [words + 1]), ascending within each word, in the
    Elias-Fano code: per word of n entries whose largest id is m, L = floor(log2((m + 1) / n))
    low bits of each id, packed one after the other, then the high parts id >> L in unary
    (entry i sets bit (id >> L) + i); the words' parts follow each other bit after bit
    (little-endian), and one uint64 of padding ends the array (the scan's 8-byte loads).
    About log2((m + 1) / n) + 2 bits per entry: 7.7 on a synthetic 100M collection against
    the 9.1 of a byte per difference (benchmarks/README.md), and each id decodes from one
    unaligned load and one count of trailing zeros.
    Returns (ids uint64 [...], low_bits uint8 [words], id_offsets int64 [words + 1]: where each
    word's part starts, in bits)."""
    num_words = len(offsets) - 1
    low_bits = np.zeros(num_words, np.uint8)
    id_offsets = np.zeros(num_words + 1, np.int64)
    for word in range(num_words):
        start, end = offsets[word], offsets[word + 1]
        n, size = end - start, 0
        if n:
            if ids[start] < 0:
                raise ValueError("image ids must be >= 0")
            for entry in range(start + 1, end):
                if ids[entry] <= ids[entry - 1]:
                    raise ValueError("image ids must ascend within a word")
            largest, low_count = np.int64(ids[end - 1]), 0
            while n << (low_count + 1) <= largest + 1:
                low_count += 1
            low_bits[word] = low_count
            size = n * low_count + (largest >> low_count) + n
        id_offsets[word + 1] = id_offsets[word] + size
    out = np.zeros((id_offsets[num_words] + 63) // 64 + 1, np.uint64)
    for word in range(num_words):
        start, end = offsets[word], offsets[word + 1]
        if start == end:
            continue
        low_count, lows, high_start, _ = _id_block(low_bits, id_offsets, word, end - start)
        low_mask = (np.int64(1) << low_count) - 1
        for i in range(end - start):
            value = np.int64(ids[start + i])
            if low_count:
                position = lows + i * low_count
                at, shift = position // 64, position % 64
                out[at] |= np.uint64(value & low_mask) << np.uint64(shift)
                if shift + low_count > 64:  # the rest in the next uint64
                    out[at + 1] |= np.uint64(value & low_mask) >> np.uint64(64 - shift)
            position = high_start + (value >> low_count) + i
            out[position // 64] |= np.uint64(1) << np.uint64(position % 64)
    return out, low_bits, id_offsets


@numba.njit(cache=True, nogil=True, inline="always")
def _id_block(low_bits, id_offsets, word, n):
    """(L, where the low bits start, where the high parts start, where they end) of a word of
    n >= 1 entries, the last three in bits of the ids array."""
    low_count = np.int64(low_bits[word])
    lows = id_offsets[word]
    return low_count, lows, lows + n * low_count, id_offsets[word + 1]


@numba.njit(cache=True, nogil=True, inline="always")
def _first_high(ids, high_start):
    """(the uint64 that holds a word's first high bit, its bits from that one on)."""
    at = high_start >> 6
    return at, ids[at] & (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(high_start & 63))


@numba.njit(cache=True, nogil=True, inline="always")
def _next_id(ids, id_bytes, i, low_count, lows, high_start, high_end, at, pending):
    """The id of a word's entry i, read in order: `at` is the uint64 of the high parts being
    read and `pending` its bits not consumed yet (_first_high for entry 0). Returns (id, at,
    pending). On files that pass check_lists, damaged bits give wrong ids but no read outside
    the array (the last low bits' load ends in the padding uint64)."""
    while pending == 0 and at < (high_end - 1) >> 6:
        at += 1
        pending = ids[at]
    high = at * 64 + np.int64(_trailing_zeros(pending)) - high_start - i
    pending &= pending - np.uint64(1)
    position = lows + i * low_count  # the low bits: one unaligned load, shifted and masked
    loaded = _load_uint64(id_bytes, position >> 3) >> np.uint64(position & 7)
    low = np.int64(loaded & ((np.uint64(1) << np.uint64(low_count)) - np.uint64(1)))
    return (high << low_count) | low, at, pending


def entry_images(lists, first=0, last=None):
    """The image ids (int32) of the entries of words [first, last) of an inverted file (the
    dict of open_lists, or encode_ids' arrays with the offsets), in list order."""
    last = len(lists["offsets"]) - 1 if last is None else last
    ids = np.asarray(lists["ids"])
    return _decode_ids(ids, ids.view(np.uint8), lists["low_bits"], lists["id_offsets"], lists["offsets"], first, last)


@numba.njit(cache=True, nogil=True)
def _decode_ids(ids, id_bytes, low_bits, id_offsets, offsets, first, last):
    out = np.empty(offsets[last] - offsets[first], np.int32)
    i = 0
    for word in range(first, last):
        n = offsets[word + 1] - offsets[word]
        if n == 0:
            continue
        low_count, lows, high_start, high_end = _id_block(low_bits, id_offsets, word, n)
        at, pending = _first_high(ids, high_start)
        for entry in range(n):
            out[i], at, pending = _next_id(ids, id_bytes, entry, low_count, lows, high_start, high_end, at, pending)
            i += 1
    return out


LIST_KEYS = ("offsets", "signatures", "ids", "low_bits", "id_offsets", "idf", "norms")
# what the compiled scan trusts: (key, dtype, dimensions), checked by check_lists
_LIST_TYPES = [
    ("offsets", np.dtype("<i8"), 1),
    ("signatures", np.dtype("u1"), 2),
    ("ids", np.dtype("<u8"), 1),
    ("low_bits", np.dtype("u1"), 1),
    ("id_offsets", np.dtype("<i8"), 1),
]


def open_lists(folder):
    """The inverted file of an index version folder, memory-mapped: {key: array} for
    LIST_KEYS, the files `asmk_<key>.npy` of schemas/artifact.py."""
    if not os.path.exists(os.path.join(folder, "asmk_ids.npy")):
        raise UserError(
            f"{folder} holds an ASMK inverted file of an unreleased format (3 to 5, before its ids were coded in "
            "Elias-Fano): rebuild the index"
        )
    lists = {
        key: np.load(os.path.join(folder, f"asmk_{key}.npy"), mmap_mode="r", allow_pickle=False) for key in LIST_KEYS
    }
    check_lists(lists, folder)
    return lists


def _ascending(array, last):
    """Whether offsets go from 0 to `last`, never down."""
    return len(array) >= 2 and array[0] == 0 and array[-1] == last and not np.any(np.diff(array) < 0)


def check_lists(lists, folder):
    """Refuse an inverted file whose arrays disagree (the compiled scan trusts their types
    and sizes: a damaged offset would read outside an array). Cheap: per-word arrays only."""
    offsets, id_offsets = np.asarray(lists["offsets"]), np.asarray(lists["id_offsets"])
    low_bits = np.asarray(lists["low_bits"]).astype(np.int64)
    types = [(lists[key], dtype, ndim) for key, dtype, ndim in _LIST_TYPES]
    what = None
    if any(a.dtype != dtype or a.ndim != ndim or not a.flags.c_contiguous for a, dtype, ndim in types):
        what = "unexpected array types"
    elif not _ascending(offsets, len(lists["signatures"])):
        what = "word offsets and entries disagree"
    elif len(lists["idf"]) != len(offsets) - 1 or len(id_offsets) != len(offsets) or len(low_bits) != len(offsets) - 1:
        what = "word counts differ"
    elif not _ascending(id_offsets, id_offsets[-1]) or len(lists["ids"]) != (id_offsets[-1] + 63) // 64 + 1:
        what = "id offsets and ids disagree"
    else:  # every word's part holds its low bits and a high bit per entry
        counts = np.diff(offsets)
        if np.any(low_bits > 31) or np.any(np.diff(id_offsets) < counts * (low_bits + 1)):
            what = "id parts too short"
    if what:
        raise UserError(f"damaged ASMK inverted file in {folder}: {what}; rebuild the index")


def unweighted_norms(ivf, block_words=4096):
    """Each image's self-similarity without IDF, sqrt(its entries) (float32 [images]); counted
    from the ids on first use, a block of words at a time, and kept in `ivf` (ids out of
    range, from damaged files, are not counted)."""
    if "unweighted_norms" not in ivf:
        num_images, num_words = len(ivf["norms"]), len(ivf["offsets"]) - 1
        entries = np.zeros(num_images, np.int64)
        for first in range(0, num_words, block_words):
            found = entry_images(ivf, first, min(first + block_words, num_words))
            entries += np.bincount(found[(found >= 0) & (found < num_images)], minlength=num_images)
        ivf["unweighted_norms"] = np.sqrt(entries).astype(np.float32)
    return ivf["unweighted_norms"]


def as_uint64(rows):
    """Rows of packed bits [n, bytes] as rows of uint64 words [n, ceil(bytes / 8)], zero padded."""
    width = 8 * ((rows.shape[1] + 7) // 8)
    padded = np.zeros((len(rows), width), np.uint8)
    padded[:, : rows.shape[1]] = rows
    return padded.view(np.uint64)
