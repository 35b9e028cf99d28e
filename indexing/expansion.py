"""Query expansion with verified results, and database-side augmentation from the match graph.

- alpha-QE (Radenovic, Tolias, Chum, TPAMI 2019) on global descriptors: the query's descriptor
  plus its verified results', weighted by similarity^alpha, normalised, ranks again.
- graph expansion: each verified result votes for its own verified neighbours in the match
  graph of the collection (`delf-index match --augment`): "Total Recall" (Chum et al., ICCV
  2007) re-queries with the verified results' features; an index keeps PQ codes, not
  descriptors, so the results' verified neighbours, found when the graph was built from the
  full features, stand for what that re-query would find.
- database-side augmentation (DBA): each image's global descriptor replaced by the alpha-QE of
  itself and its verified neighbours, computed once when the graph is built.

The graph is stored in an index version as `neighbours.npz` (CSR over int image ids: row
offsets, neighbour ids, inliers) and the augmented descriptors as `dba.faiss`.
"""

import os

import faiss
import numpy as np

GRAPH_FILE, DBA_FILE = "neighbours.npz", "dba.faiss"

default_conf = {
    "dba_top": 5,  # verified neighbours per image averaged into its augmented descriptor
    "dba_alpha": 3.0,  # weight of a neighbour: its global similarity ** alpha
    "dba_min_inliers": 20,  # inliers that make a neighbour count
}


def alpha_qe(query, others, alpha):
    """Normalised query + sum of `others` [n, G] weighted by max(similarity, 0) ** alpha."""
    query = np.asarray(query, np.float32)
    if not len(others):
        return query
    weights = np.maximum(np.asarray(others, np.float32) @ query, 0) ** alpha
    expanded = query + (weights[:, None] * others).sum(axis=0)
    return (expanded / max(np.linalg.norm(expanded), 1e-12)).astype(np.float32)


def neighbour_graph(num_images, pairs):
    """CSR of the verified pairs over int image ids: (offsets [n + 1], neighbours, inliers),
    each row's neighbours by inliers, most first. `pairs`: (a, b, inliers) int triples."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 3)
    both = np.concatenate([pairs, pairs[:, [1, 0, 2]]])
    order = np.lexsort((-both[:, 2], both[:, 0]))
    both = both[order]
    offsets = np.searchsorted(both[:, 0], np.arange(num_images + 1))
    return offsets.astype(np.int64), both[:, 1].astype(np.int64), both[:, 2].astype(np.int32)


def write_graph(folder, graph):
    offsets, neighbours, inliers = graph
    np.savez(os.path.join(folder, GRAPH_FILE), offsets=offsets, neighbours=neighbours, inliers=inliers)


def read_graph(folder):
    """The CSR graph of an index version folder, or None when it has none."""
    path = os.path.join(folder, GRAPH_FILE)
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        return f["offsets"], f["neighbours"], f["inliers"]


def neighbours_of(graph, row, min_inliers):
    offsets, neighbours, inliers = graph
    start, end = offsets[row], offsets[row + 1]
    keep = inliers[start:end] >= min_inliers
    return neighbours[start:end][keep], inliers[start:end][keep]


def augmented_globals(globals_, graph, conf=None):
    """DBA: [n, G] global descriptors, each the alpha-QE of itself and its `dba_top` verified
    neighbours (hidden images included, as their rows are never ranked)."""
    conf = {**default_conf, **(conf or {})}
    out = np.empty_like(globals_, dtype=np.float32)
    for row in range(len(globals_)):
        near, _ = neighbours_of(graph, row, conf["dba_min_inliers"])
        out[row] = alpha_qe(globals_[row], globals_[near[: conf["dba_top"]]], conf["dba_alpha"])
    return out


def write_dba(folder, augmented):
    index = faiss.IndexScalarQuantizer(augmented.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(augmented, np.float32))
    faiss.write_index(index, os.path.join(folder, DBA_FILE))
