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
offsets, neighbour ids, inliers) and the augmented descriptors as `dba.faiss`. `update`
refreshes both for the version it publishes (`refreshed_graph`, `refreshed_dba`): the
previous graph's edges among images that stay, plus the verified pairs of the new images.
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
    # ties by neighbour id: the same order whatever order the pairs came in (a refresh, a match)
    order = np.lexsort((both[:, 1], -both[:, 2], both[:, 0]))
    both = both[order]
    offsets = np.searchsorted(both[:, 0], np.arange(num_images + 1))
    return offsets.astype(np.int64), both[:, 1].astype(np.int64), both[:, 2].astype(np.int32)


def write_graph(folder, graph):
    offsets, neighbours, inliers = graph
    np.savez(os.path.join(folder, GRAPH_FILE), offsets=offsets, neighbours=neighbours, inliers=inliers)


def read_graph(folder):
    """The CSR graph of an index version folder, or None when it has none."""
    path = os.path.join(folder, GRAPH_FILE)
    return graph_from(path) if os.path.exists(path) else None


def graph_from(file):
    """The CSR graph (offsets, neighbours, inliers) of a `neighbours.npz` (a path or file object)."""
    with np.load(file, allow_pickle=False) as f:
        return f["offsets"], f["neighbours"], f["inliers"]


def read_vectors(data):
    """Every vector [n, G] of a flat faiss index serialised as `data` (global.faiss, dba.faiss)."""
    index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    return index.reconstruct_n(0, index.ntotal)


def neighbours_of(graph, row, min_inliers):
    offsets, neighbours, inliers = graph
    start, end = offsets[row], offsets[row + 1]
    keep = inliers[start:end] >= min_inliers
    return neighbours[start:end][keep], inliers[start:end][keep]


def dba_neighbours(graph, row, conf):
    """The neighbours (rows) that a row's DBA descriptor averages: its first `dba_top` with
    at least `dba_min_inliers`."""
    near, _ = neighbours_of(graph, row, conf["dba_min_inliers"])
    return near[: conf["dba_top"]]


def augmented_globals(globals_, graph, conf=None):
    """DBA: [n, G] global descriptors, each the alpha-QE of itself and its `dba_top` verified
    neighbours (dead rows included, as they are never ranked)."""
    conf = {**default_conf, **(conf or {})}
    out = np.empty_like(globals_, dtype=np.float32)
    for row in range(len(globals_)):
        out[row] = alpha_qe(globals_[row], globals_[dba_neighbours(graph, row, conf)], conf["dba_alpha"])
    return out


def carried_rows(old_keys, new_keys):
    """(new row of each old row, old row of each new row), -1 where there is none, matching
    rows by key: (image_id, run) of the live rows of two versions of an index, None for a
    dead row. A changed image (another run) is a new row: its old edges describe other
    features."""
    old_row = {key: row for row, key in enumerate(old_keys) if key is not None}
    old_of_new = np.array([old_row.get(key, -1) if key is not None else -1 for key in new_keys], np.int64)
    new_of_old = np.full(len(old_keys), -1, np.int64)
    carried = old_of_new >= 0
    new_of_old[old_of_new[carried]] = np.flatnonzero(carried)
    return new_of_old, old_of_new


def edge_triples(graph):
    """[m, 3] int64 (a, b, inliers), a < b: each edge of a symmetric CSR graph once."""
    offsets, neighbours, inliers = graph
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    upper = rows < neighbours
    return np.stack([rows[upper], neighbours[upper], inliers[upper]], axis=1).astype(np.int64).reshape(-1, 3)


def strongest_pairs(pairs):
    """[m, 3] (a, b, inliers), a < b, one row per unordered pair: the most inliers of its
    rows (a pair verified both ways, as `match`'s pairs table keeps it)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 3)
    ends = np.sort(pairs[:, :2], axis=1)
    pairs = np.concatenate([ends, pairs[:, 2:]], axis=1)
    pairs = pairs[np.lexsort((-pairs[:, 2], pairs[:, 1], pairs[:, 0]))]
    first = np.ones(len(pairs), bool)
    first[1:] = (pairs[1:, :2] != pairs[:-1, :2]).any(axis=1)
    return pairs[first]


def refreshed_graph(old_graph, new_of_old, num_rows, new_pairs):
    """The graph of a new version of an index from the previous version's: the old edges
    between rows that stay (`new_of_old`: their new rows, -1 for rows that left), moved to
    their new rows, and the verified `new_pairs` (a, b, inliers, new rows) of the images
    searched for the new version; a pair in both keeps the most inliers. Returns (graph,
    counts of pairs kept, dropped and added)."""
    old = edge_triples(old_graph)
    a, b = new_of_old[old[:, 0]], new_of_old[old[:, 1]]
    stays = (a >= 0) & (b >= 0)
    kept = np.stack([a[stays], b[stays], old[stays, 2]], axis=1)
    added = strongest_pairs(new_pairs)
    pairs = strongest_pairs(np.concatenate([kept, added]))
    counts = {"pairs_kept": int(stays.sum()), "pairs_dropped": int((~stays).sum()), "pairs_added": len(added)}
    return neighbour_graph(num_rows, pairs), counts


def refreshed_dba(globals_, graph, old_dba, old_graph, new_of_old, old_of_new, conf=None):
    """DBA descriptors [n, G] of a refreshed graph: a row whose DBA neighbours are the same
    images as before keeps its previous descriptor (`old_dba` [old n, G]; its own and its
    neighbours' global descriptors are those of the same features), the others are computed
    again, as `augmented_globals` does. Returns (descriptors, rows computed again)."""
    conf = {**default_conf, **(conf or {})}
    out = np.empty_like(globals_, dtype=np.float32)
    again = []
    for row in range(len(globals_)):
        near, old = dba_neighbours(graph, row, conf), old_of_new[row]
        if old >= 0 and np.array_equal(near, new_of_old[dba_neighbours(old_graph, old, conf)]):
            out[row] = old_dba[old]
        else:
            out[row] = alpha_qe(globals_[row], globals_[near], conf["dba_alpha"])
            again.append(row)
    return out, np.array(again, np.int64)


def write_dba(folder, augmented):
    index = faiss.IndexScalarQuantizer(augmented.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(augmented, np.float32))
    faiss.write_index(index, os.path.join(folder, DBA_FILE))
