"""Retrieval metrics exactly as revisitop (filipradenovic/revisitop, compute.py).

AP uses the trapezoid rule over positives; junk images are removed from the ranking before
scoring by shifting each positive's rank down by the number of junk images ranked above
it. mP@k caps k at the rank of the last positive.
"""

import numpy as np


def average_precision(ranks, num_positives):
    """AP from the sorted 0-based ranks of the positives found (junk already removed)."""
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_0 = j / rank if rank != 0 else 1.0
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / 2.0 / num_positives
    return ap


def query_metrics(ranking, positives, junk=(), kappas=(1, 5, 10)):
    """AP, precision at each k and recall@1 of one query.

    `ranking`: database ids, best first (the whole database, or a prefix of it: positives
    not in it count as never retrieved). Returns None when the query has no positives, which
    revisitop leaves out of the mean.
    """
    positives, junk = set(positives), set(junk)
    if not positives:
        return None
    ranking = [r for r in ranking]
    pos_ranks, shift = [], 0
    for rank, item in enumerate(ranking):
        if item in junk:
            shift += 1
        elif item in positives:
            pos_ranks.append(rank - shift)
    ap = average_precision(pos_ranks, len(positives))
    out = {"ap": ap}
    one_based = np.asarray(pos_ranks) + 1
    for k in kappas:
        if len(one_based):
            kq = min(int(one_based.max()), k)
            out[f"p@{k}"] = float((one_based <= kq).sum() / kq)
        else:
            out[f"p@{k}"] = 0.0
    out["r@1"] = float(len(pos_ranks) > 0 and pos_ranks[0] == 0)
    return out


def mean_metrics(per_query, kappas=(1, 5, 10)):
    """Mean over the queries that have positives: {"mAP", "mP@k"..., "R@1", "queries"}."""
    rows = [m for m in per_query if m is not None]
    if not rows:
        raise ValueError("no query has a positive in the database")
    summary = {"mAP": float(np.mean([m["ap"] for m in rows]))}
    for k in kappas:
        summary[f"mP@{k}"] = float(np.mean([m[f"p@{k}"] for m in rows]))
    summary["R@1"] = float(np.mean([m["r@1"] for m in rows]))
    summary["queries"] = len(rows)
    return summary
