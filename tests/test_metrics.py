"""Retrieval metrics against hand-worked rankings and revisitop's own formulation."""

import numpy as np
import pytest

from delf_index.indexing.metrics import average_precision, mean_metrics, query_metrics


def test_hand_worked_average_precision():
    # positives at ranks 0 and 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2 = 0.5 + 0.291666...
    assert query_metrics(["p1", "n", "p2"], ["p1", "p2"])["ap"] == pytest.approx(0.5 + 7 / 24)
    # a junk image ranked first is removed: the positive moves from rank 2 to rank 1
    assert query_metrics(["j", "n", "p"], ["p"], junk=["j"])["ap"] == pytest.approx((0 + 1 / 2) / 2)
    # a positive never retrieved still counts in the denominator
    assert query_metrics(["p1"], ["p1", "p2"])["ap"] == pytest.approx(0.5)
    assert query_metrics(["n1", "n2"], ["p"])["ap"] == 0.0
    assert query_metrics(["a"], []) is None  # no positives: left out of the mean, as revisitop
    assert average_precision([0, 1, 2], 3) == pytest.approx(1.0)


def test_precision_at_k_and_recall_at_1():
    m = query_metrics(["p1", "n", "p2", "n2", "n3", "n4"], ["p1", "p2"], kappas=(1, 5))
    # revisitop caps k at the rank of the last positive (3, 1-based): 2 of 3
    assert m["p@1"] == 1.0 and m["p@5"] == pytest.approx(2 / 3) and m["r@1"] == 1.0
    m = query_metrics(["j", "n", "p"], ["p"], junk=["j"], kappas=(1,))
    assert m["r@1"] == 0.0 and m["p@1"] == 0.0
    summary = mean_metrics([query_metrics(["p"], ["p"]), query_metrics(["n", "p"], ["p"]), None])
    assert summary["queries"] == 2 and summary["mAP"] == pytest.approx((1 + 0.25) / 2)


def revisitop_compute_map(ranks, gnd, kappas):
    """revisitop's compute_map (filipradenovic/revisitop, python/compute.py), as published."""
    mAP, nq, nempty = 0.0, len(gnd), 0
    pr = np.zeros(len(kappas))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = j / rank if rank != 0 else 1.0
            p1 = (j + 1) / (rank + 1)
            ap += (p0 + p1) * (1.0 / len(qgnd)) / 2.0
        mAP += ap
        pos += 1
        for j, kappa in enumerate(kappas):
            kq = min(max(pos), kappa)
            pr[j] += (pos <= kq).sum() / kq
    return mAP / (nq - nempty), pr / (nq - nempty)


def test_matches_revisitop_on_random_rankings():
    rng = np.random.default_rng(0)
    database, queries, kappas = 60, 25, (1, 5, 10)
    ranks = np.stack([rng.permutation(database) for _ in range(queries)], axis=1)
    gnd = []
    for _ in range(queries):
        chosen = rng.permutation(database)
        gnd.append({"ok": chosen[: rng.integers(0, 8)].tolist(), "junk": chosen[10 : 10 + rng.integers(0, 5)].tolist()})
    expected_map, expected_pr = revisitop_compute_map(ranks, gnd, kappas)
    ours = [query_metrics(ranks[:, i].tolist(), g["ok"], g["junk"], kappas) for i, g in enumerate(gnd)]
    summary = mean_metrics(ours, kappas)
    assert summary["mAP"] == pytest.approx(expected_map, abs=1e-12)
    for k, expected in zip(kappas, expected_pr):
        assert summary[f"mP@{k}"] == pytest.approx(expected, abs=1e-12)
