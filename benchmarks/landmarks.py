"""Shared helpers for benchmarks on ../shared/data/landmarks-dev (never copied here)."""

import csv
import os
import time

import numpy as np

from delf_index.indexing import metrics, verify
from delf_index.runtime.features import Features
from delf_index.runtime.images import read_image

LANDMARKS = os.environ.get(
    "LANDMARKS_DEV", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "landmarks-dev")
)


def read_groups(root=LANDMARKS):
    """[(image file name, group or None)] in groups.csv order."""
    with open(os.path.join(root, "groups.csv"), newline="") as f:
        return [(row["image"], row["group"] or None) for row in csv.DictReader(f)]


def extract_all(extractor, workdir, root=LANDMARKS, log_every=20, rows=None):
    """Features of every landmarks-dev image (or of `rows`, [(image, group)]), cached as .npz
    under workdir."""
    os.makedirs(workdir, exist_ok=True)
    rows = read_groups(root) if rows is None else rows
    feats, start = [], time.time()
    for n, (name, _) in enumerate(rows):
        cache = os.path.join(workdir, name + ".npz")
        if os.path.exists(cache):
            feats.append(Features.load(cache))
            continue
        f = extractor(read_image(os.path.join(root, "images", name)))
        f.save(cache)
        feats.append(f)
        if n % log_every == 0:
            print(f"  {n}/{len(rows)} images, {time.time() - start:.0f}s", flush=True)
    return feats


def leave_one_out_map(scores, groups):
    """mAP (revisitop AP) of a full [N, N] score matrix, each image a query once."""
    per_query = []
    for q, group in enumerate(groups):
        if group is None:
            continue
        order = np.argsort(-scores[q], kind="stable")
        ranking = [i for i in order if i != q]
        positives = [i for i, g in enumerate(groups) if g == group and i != q]
        per_query.append(metrics.query_metrics(ranking, positives))
    return metrics.mean_metrics(per_query)


def pairwise_local_scores(feats, conf=None):
    """[N, N] mutual-NN match counts and RANSAC inlier counts for all pairs."""
    n = len(feats)
    matches = np.zeros((n, n))
    inliers = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            fa, fb = feats[a], feats[b]
            count, m, mask = verify.verify_pair(
                fa.keypoints, fa.descriptors, fb.keypoints, fb.descriptors, (fb.width, fb.height), conf
            )
            matches[a, b] = matches[b, a] = len(m)
            inliers[a, b] = inliers[b, a] = count
    return matches, inliers
