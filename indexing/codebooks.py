"""Coarse quantizer and product quantizer of the reduced descriptors (faiss).

The index string is faiss's factory syntax on PCA-reduced vectors: ``IVF{nlist},PQ{M}x{bits}``
(the DELF paper: 8K coarse cells, 10 sub-vectors x 5 bits on 40-d), optionally with an OPQ
rotation in front (``OPQ{M},IVF...``). Defaults were chosen by measured recall against exact
k-NN on landmarks-dev descriptors (benchmarks/README.md, "Quantization").
"""

import math

import faiss
import numpy as np

default_conf = {
    "pca_dim": 40,  # reduced dimension (DELF: 40)
    "whiten": False,  # PCA whitening (DELF v1: off)
    "pq": "PQ10x8",  # sub-vectors x bits per code; PQ10x5 is the paper's 50-bit code
    "opq": False,  # learn a rotation before PQ (OPQ)
    "nlist": None,  # coarse cells; None: a power of two near 4 sqrt(descriptors), see auto_nlist
    "sample": 1_000_000,  # descriptors drawn (seeded, uniform) to train PCA and codebooks
    "seed": 0,
}


def auto_nlist(num_descriptors, sample_size):
    """Coarse cells for a corpus: about 4 sqrt(N), a power of two, at most 65536, and with at
    least 39 training points per cell (faiss's k-means warns below that)."""
    target = 4 * math.sqrt(max(num_descriptors, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and sample_size < 39 * nlist:
        nlist //= 2
    return int(min(nlist, 65536))


def index_string(dim, nlist, pq="PQ10x8", opq=False):
    m = int(pq[2:].split("x")[0])
    assert dim % m == 0, f"PCA dim {dim} is not a multiple of the {m} PQ sub-vectors"
    prefix = f"OPQ{m}," if opq else ""
    return f"{prefix}IVF{nlist},{pq}"


def train_index(reduced, spec, seed=0):
    """An empty, trained faiss index (inner product on unit vectors) from [N, dim] float32."""
    reduced = np.ascontiguousarray(reduced, dtype=np.float32)
    assert reduced.ndim == 2
    index = faiss.index_factory(reduced.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivf.cp.niter = 20
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        pq.cp.seed = seed
    index.train(reduced)
    return index


def ivf_of(index):
    return faiss.extract_index_ivf(index)


def code_bytes(index):
    """Bytes of one stored PQ code."""
    return int(ivf_of(index).code_size)


def serialize(index):
    return faiss.serialize_index(index).tobytes()


def deserialize(data):
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
