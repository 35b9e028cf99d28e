"""The codebooks: a seeded sample of descriptors, PCA, and the coarse and product quantizers
of the reduced descriptors (faiss). `delf-index fit` runs the sampling per table in parallel
and `fit_codebooks` once on the merged sample.

The index string is faiss's factory syntax on PCA-reduced vectors: ``IVF{nlist},PQ{M}x{bits}``
(the DELF paper: 8K coarse cells, 10 sub-vectors x 5 bits on 40-d), optionally with an OPQ
rotation in front (``OPQ{M},IVF...``). Defaults were chosen by measured recall against exact
k-NN on landmarks-dev descriptors (benchmarks/README.md, "Quantization").
"""

import contextlib
import hashlib
import logging
import math
import time

import faiss
import numpy as np

from delf_index.errors import UserError
from delf_index.indexing import asmk
from delf_index.indexing import pca as pca_lib
from delf_index.runtime import console

log = logging.getLogger(__name__)

default_conf = {
    "pca_dim": 40,  # reduced dimension (DELF: 40)
    "whiten": False,  # PCA whitening (DELF v1: off)
    "pq": "PQ10x8",  # sub-vectors x bits per code; PQ10x5 is the paper's 50-bit code
    "opq": False,  # learn a rotation before PQ (OPQ)
    "nlist": None,  # coarse cells; None: a power of two near 4 sqrt(descriptors), see auto_nlist
    "sample": 1_000_000,  # descriptors drawn (seeded, uniform) to train PCA and codebooks
    "seed": 0,
    # ASMK's visual words (indexing/asmk.py), in the same reduced space; 0: none (k-NN voting
    # only); "auto": a power of two near corpus descriptors / 45, from 1024 to 65536
    "asmk_words": 0,
}

presets = {
    "default": {},
    # the paper's 50-bit codes (10 x 5 bits): 3 bytes smaller, about a quarter less recall
    # (benchmarks/README.md, "Quantization"); coarse cells stay automatic, since the paper's
    # 8K cells need a sample of at least 39 x 8192 descriptors
    "delf-paper": {"pq": "PQ10x5"},
}


# -- the sample ----------------------------------------------------------------------------
def splitmix64(x):
    """A fast, well-mixed 64-bit hash of uint64 values (numpy, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(image_id, count, seed):
    """Pseudo-random uint64 keys of an image's descriptors, fixed by (seed, image_id, index).
    Every descriptor of the corpus has the same chance to be among the smallest keys, so the
    bottom-k by key is a uniform sample whatever the tables and their split."""
    base = int.from_bytes(hashlib.md5(f"{seed}:{image_id}".encode()).digest()[:8], "big")
    return splitmix64(np.uint64(base) + np.arange(count, dtype=np.uint64))


def bottom_k(keys, descriptors, k):
    """The k descriptors with the smallest keys, sorted by key."""
    assert len(keys) == len(descriptors)
    if len(keys) > k:
        part = np.argpartition(keys, k - 1)[:k]
        keys, descriptors = keys[part], descriptors[part]
    order = np.argsort(keys, kind="stable")
    return keys[order], descriptors[order]


def merge_samples(parts, k):
    """One sample dict ({"keys", "descriptors", "images", "descriptors_total"}) from several."""
    keys, descriptors = bottom_k(
        np.concatenate([p["keys"] for p in parts]), np.concatenate([p["descriptors"] for p in parts]), k
    )
    return {
        "keys": keys,
        "descriptors": descriptors,
        "images": sum(p["images"] for p in parts),
        "descriptors_total": sum(p["descriptors_total"] for p in parts),
    }


def fit_codebooks(sample, conf):
    """(pca, trained faiss index, info) from a merged sample dict (`merge_samples`)."""
    conf = {**default_conf, **conf}
    descriptors = sample["descriptors"].astype(np.float32)
    if len(descriptors) < 1000:
        raise UserError(f"only {len(descriptors)} descriptors to fit on; fit needs at least 1000")
    start = time.time()
    pca = pca_lib.fit_pca(descriptors, conf["pca_dim"], conf["whiten"])
    reduced = pca_lib.apply_pca(descriptors, pca)
    nlist = conf["nlist"] or auto_nlist(sample["descriptors_total"], len(reduced))
    spec = index_string(conf["pca_dim"], nlist, conf["pq"], conf["opq"])
    log.info("training %s on %d descriptors", spec, len(reduced))
    trained = train_index(reduced, spec, conf["seed"])
    words = None
    if conf["asmk_words"]:
        count = auto_words(sample["descriptors_total"]) if conf["asmk_words"] == "auto" else int(conf["asmk_words"])
        if conf["asmk_words"] == "auto":  # a small corpus: k-means needs points, ~39 per word
            count = min(count, max(2, len(reduced) // 39))
        if count > len(reduced):
            raise UserError(f"{count} ASMK words need at least as many sampled descriptors, not {len(reduced)}")
        log.info("training %d ASMK visual words on %d descriptors", count, len(reduced))
        words = asmk.fit_words(reduced, count, conf["seed"])
    info = {
        "conf": {**conf, "nlist": nlist, "asmk_words": 0 if words is None else len(words)},
        "index_string": spec,
        "code_bytes": code_bytes(trained),
        "pca_explained_variance": pca["explained_variance"],
        "sample_descriptors": len(reduced),
        "corpus_images": sample["images"],
        "corpus_descriptors": sample["descriptors_total"],
        "fit_seconds": round(time.time() - start, 1),
    }
    return pca, trained, words, info


# -- quantizers ----------------------------------------------------------------------------


def auto_words(num_descriptors):
    """ASMK visual words for a corpus: a power of two near descriptors / 45, from 1024 to 65536
    (landmarks-dev's 186,000 descriptors: 4096, the best of 2048 to 16384 measured there)."""
    return int(min(65536, max(1024, 2 ** round(math.log2(max(num_descriptors, 1) / 45)))))


def auto_nlist(num_descriptors, sample_size):
    """Coarse cells for a corpus: about 4 sqrt(N), a power of two, at most 65536, and with at
    least 39 training points per cell (faiss's k-means warns below that)."""
    target = 4 * math.sqrt(max(num_descriptors, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and sample_size < 39 * nlist:
        nlist //= 2
    return int(min(nlist, 65536))


def index_string(dim, nlist, pq="PQ10x8", opq=False):
    """faiss factory string of the index; checks the shapes."""
    try:
        m, bits = (int(v) for v in pq[2:].split("x"))
        assert pq.startswith("PQ") and 1 <= bits <= 16
    except (ValueError, AssertionError):
        raise UserError(f"pq {pq!r} is not PQ<sub-vectors>x<bits>, e.g. PQ10x8") from None
    if dim % m:
        raise UserError(f"PCA dim {dim} is not a multiple of the {m} PQ sub-vectors")
    prefix = f"OPQ{m}," if opq else ""
    return f"{prefix}IVF{nlist},{pq}"


def train_index(reduced, spec, seed=0):
    """An empty, trained faiss index (inner product on unit vectors) from [N, dim] float32."""
    reduced = np.ascontiguousarray(reduced, dtype=np.float32)
    assert reduced.ndim == 2
    index = faiss.index_factory(reduced.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.cp.niter = 20
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        pq.cp.seed = seed
        # faiss reorders an IVF-PQ's centroids for polysemous (Hamming) search by default: most
        # of a fit's time (8 of 10 s on 21k descriptors), for a search delf-index never runs
        ivf.do_polysemous_training = False
    with console.c_output(2) as said, blas_distances():  # faiss's k-means warns on C's stderr
        index.train(reduced)
    warned = [line for line in said[0].splitlines() if line.startswith("WARNING clustering")]
    if warned:
        log.warning(
            "k-means had few training points (%s, %d times): the codebooks fit this collection, but more "
            "descriptors would train them better",
            warned[0].split("clustering ", 1)[1].split(":")[0],
            len(warned),
        )
    return index


@contextlib.contextmanager
def blas_distances():
    """faiss computes k-means distances by BLAS for every batch while this lasts. Its default
    (BLAS from 128,000 points) sends PQ's 4-d sub-vectors of a small sample to a scalar loop
    8 times slower; searches keep the default."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def code_bytes(index):
    """Bytes of one stored PQ code."""
    return int(faiss.extract_index_ivf(index).code_size)
