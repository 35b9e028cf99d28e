"""The verified match graph of a collection: connected components and what the graph says
about labels (numpy only; `delf-index match` feeds it).

Edges are pairs of images verified by RANSAC (at least `min_inliers` inliers in one
direction). Components are the clusters of near-duplicates and same-place photos; a label
that the image's verified neighbours do not share is a suspect for cleaning, the way
Google-Landmarks-v2's clean training set was made from geometric verification.
"""

from collections import Counter

import numpy as np


def connected_components(num_nodes, edges):
    """Component id per node [num_nodes] from int edges [E, 2]: the smallest node of each
    component (min-label propagation with pointer jumping, vectorised)."""
    labels = np.arange(num_nodes, dtype=np.int64)
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    if not len(edges):
        return labels
    u, v = edges[:, 0], edges[:, 1]
    while True:
        low = np.minimum(labels[u], labels[v])
        before = labels.copy()
        np.minimum.at(labels, u, low)
        np.minimum.at(labels, v, low)
        labels = labels[labels]  # jump to the root's label
        while not np.array_equal(labels, labels[labels]):
            labels = labels[labels]
        if np.array_equal(labels, before):
            return labels


def clusters(image_ids, pairs):
    """(cluster [N], cluster_size [N]) of images given by id, over pairs of ids. Clusters are
    numbered by size, largest first; ties by their smallest image_id."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    edges = [(position[a], position[b]) for a, b in pairs if a in position and b in position]
    roots = connected_components(len(image_ids), edges)
    sizes = Counter(roots.tolist())
    smallest = {}
    for i, root in enumerate(roots.tolist()):
        smallest.setdefault(root, image_ids[i])
        smallest[root] = min(smallest[root], image_ids[i])
    order = sorted(sizes, key=lambda r: (-sizes[r], smallest[r]))
    number = {root: n for n, root in enumerate(order)}
    return np.array([number[r] for r in roots.tolist()], np.int64), np.array([sizes[r] for r in roots.tolist()])


def label_report(labels, pairs):
    """What each labelled image's verified neighbours say about its label.

    `labels`: {image_id: label or None}; `pairs`: verified (a, b) pairs. Returns (rows per
    labelled image, rows per label), as the label_images and labels tables of
    schemas/search.py. An image's suspicion is the share of its labelled neighbours that
    vote for the most frequent other label when that label outnumbers its own, else 0."""
    neighbours = {}
    for a, b in pairs:
        if labels.get(a) is not None and labels.get(b) is not None:
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
    images = []
    for image_id, label in sorted(labels.items()):
        if label is None:
            continue
        votes = Counter(labels[n] for n in neighbours.get(image_id, []))
        total, same = sum(votes.values()), votes.get(label, 0)
        # the neighbours' label: most votes, then the image's own, then the smallest label
        voted = min(votes, key=lambda lab: (-votes[lab], lab != label, lab)) if votes else None
        images.append(
            {
                "image_id": image_id,
                "label": label,
                "neighbours": total,
                "same_label": same,
                "same_label_share": same / total if total else None,
                "voted_label": voted,
                "voted_share": votes[voted] / total if total else None,
                "suspicion": votes[voted] / total if total and voted != label else 0.0,
            }
        )
    ranked = sorted(images, key=lambda r: (-r["suspicion"], -r["neighbours"] * (r["suspicion"] > 0), r["image_id"]))
    for rank, row in enumerate(ranked, 1):
        row["suspect_rank"] = rank
    per_label = {}
    for row in images:
        entry = per_label.setdefault(
            row["label"], {"label": row["label"], "images": 0, "verified_within": 0, "alone_ids": []}
        )
        entry["images"] += 1
        if row["same_label"]:
            entry["verified_within"] += 1
        else:
            entry["alone_ids"].append(row["image_id"])
    for entry in per_label.values():
        entry["alone"] = len(entry["alone_ids"])
    return ranked, [per_label[k] for k in sorted(per_label)]


def adjusted_rand_index(truth, predicted):
    """Adjusted Rand index of two labellings of the same items (1: identical partitions,
    about 0: chance)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    assert truth.shape == predicted.shape
    _, t = np.unique(truth, return_inverse=True)
    _, p = np.unique(predicted, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1), np.int64)
    np.add.at(table, (t, p), 1)

    def pairs(x):
        return (x * (x - 1) // 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(t)]))
    expected = rows * cols / max(total, 1)
    maximum = (rows + cols) / 2
    return float((index - expected) / (maximum - expected)) if maximum != expected else 1.0
