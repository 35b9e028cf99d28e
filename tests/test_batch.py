"""Batch search and the match graph of a collection (Beam jobs) on the demo corpus."""

import csv
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from delf_index.indexing import graph
from delf_index.indexing.retrieval import Index
from delf_index.pipelines import match, search
from tests.conftest import ONE_WORKER

pytest.importorskip("skimage")


def table(folder):
    files = sorted(os.listdir(folder))
    return [row for f in files for row in pq.read_table(os.path.join(folder, f)).to_pylist()], files


def test_search_from_images_or_tables_accounts_for_every_query(evaluated, corpus, tmp_path):
    index = str(evaluated[0] / "index")
    images = tmp_path / "queries"
    images.mkdir()
    for name in sorted(os.listdir(corpus / "images"))[:6]:
        (images / name).write_bytes((corpus / "images" / name).read_bytes())
    (images / "broken.jpg").write_bytes(b"<html>not a photo</html>")
    by_image = search.run(str(images), index, str(tmp_path / "a"), {"top": 5}, beam_options=ONE_WORKER)
    assert (by_image["queries"], by_image["answered"], by_image["failed"]) == (7, 6, 1)
    errors, _ = table(tmp_path / "a" / "errors")
    assert [(e["image_id"], e["stage"]) for e in errors] == [("broken.jpg", "decode")]
    rows, files = table(tmp_path / "a" / "results")
    assert sorted({r["query_id"] for r in rows}) == sorted(n for n in os.listdir(images) if n != "broken.jpg")
    for query_id in {r["query_id"] for r in rows}:
        ranks = [r for r in rows if r["query_id"] == query_id]
        assert [r["rank"] for r in ranks] == [1, 2, 3, 4, 5]
        assert ranks[0]["image_id"] == query_id and ranks[0]["inliers"] > 50  # itself, not excluded
        # the rows are what the query module answers for the same image
        direct = Index.load(index).search(str(images / query_id), top_k=5)
        assert [(r["image_id"], r["inliers"]) for r in ranks] == [(d.image_id, d.inliers) for d in direct]
        np.testing.assert_allclose([r["score"] for r in ranks], [d.score for d in direct], rtol=1e-5)
    # the same queries from the feature tables extract wrote: no extraction, the same ranking
    by_table = search.run(
        str(evaluated[0] / "features"), index, str(tmp_path / "b"), {"top": 5}, beam_options=ONE_WORKER
    )
    assert by_table["queries"] == by_table["answered"] == 21
    from_tables = [r for r in table(tmp_path / "b" / "results")[0] if r["query_id"] in {q["query_id"] for q in rows}]
    assert [(r["query_id"], r["rank"], r["image_id"]) for r in from_tables] == [
        (r["query_id"], r["rank"], r["image_id"]) for r in rows
    ]
    # the tables hold descriptors as float16: RANSAC may count an inlier more or fewer
    np.testing.assert_allclose([r["inliers"] for r in from_tables], [r["inliers"] for r in rows], rtol=0.02)
    # a rerun writes the same rows to the same files
    again = search.run(str(images), index, str(tmp_path / "a"), {"top": 5}, beam_options=ONE_WORKER)
    assert table(tmp_path / "a" / "results") == (rows, files) and again["results"] == by_image["results"]
    excluded = search.run(
        str(images), index, str(tmp_path / "c"), {"top": 3, "exclude_self": True}, beam_options=ONE_WORKER
    )
    assert all(r["image_id"] != r["query_id"] for r in table(tmp_path / "c" / "results")[0])
    assert excluded["results"] == 18


def test_match_graph_clusters_and_label_report(evaluated, corpus, tmp_path):
    index = str(evaluated[0] / "index")
    with open(corpus / "groups.csv") as f:
        groups = {r["image"]: r["group"] or None for r in csv.DictReader(f)}
    flipped = "coffee-zoom.jpg"
    labels = {**groups, flipped: "rocket"}  # one wrong label to find
    conf = {"top": 20}  # edges of 30 inliers (the default); pairs from 12
    summary = match.run(index, str(tmp_path / "m"), conf=conf, labels=labels, beam_options=ONE_WORKER)
    pairs, _ = table(tmp_path / "m" / "pairs")
    assert summary["rows"]["pairs"] == len(pairs) > 0
    assert all(p["image_a"] < p["image_b"] for p in pairs)
    assert len({(p["image_a"], p["image_b"]) for p in pairs}) == len(pairs)  # each unordered pair once
    assert all(p["inliers"] == max(p["inliers_ab"], p["inliers_ba"]) >= 12 for p in pairs)
    # the corpus' synthetic occluders (flat boxes) match across places with 15-16 inliers: a pair, not an edge
    assert {(p["image_a"], p["image_b"]) for p in pairs if groups[p["image_a"]] != groups[p["image_b"]]} <= {
        ("coffee-occluded.jpg", "rocket-occluded.jpg")
    }
    assert any(p["inliers_ab"] and p["inliers_ba"] for p in pairs)  # both directions kept
    clusters, _ = table(tmp_path / "m" / "clusters")
    assert sorted(c["image_id"] for c in clusters) == sorted(groups)  # every indexed image once
    ids = sorted(groups)
    cluster_of = {c["image_id"]: c["cluster"] for c in clusters}
    truth = [groups[i] or f"distractor:{i}" for i in ids]  # distractors: each its own place
    assert graph.adjusted_rand_index(truth, [cluster_of[i] for i in ids]) > 0.9
    reported, _ = table(tmp_path / "m" / "label_images")
    top = min(reported, key=lambda r: r["suspect_rank"])
    assert (top["image_id"], top["label"], top["voted_label"]) == (flipped, "rocket", "coffee")
    per_label, _ = table(tmp_path / "m" / "labels")
    rocket = next(r for r in per_label if r["label"] == "rocket")
    assert flipped in rocket["alone_ids"]  # verifies against nothing labelled rocket
    assert (tmp_path / "m" / "sheet" / "clusters.png").stat().st_size > 10_000
    assert flipped in (tmp_path / "m" / "sheet" / "index.html").read_text()


def test_components_and_label_report_by_hand():
    assert graph.connected_components(6, [(0, 1), (1, 2), (4, 5)]).tolist() == [0, 0, 0, 3, 4, 4]
    assert graph.connected_components(5, [(4, 3), (3, 2), (2, 1), (1, 0)]).tolist() == [0] * 5
    numbers, sizes = graph.clusters(["a", "b", "c", "d"], [("c", "d"), ("b", "c")])
    assert numbers.tolist() == [1, 0, 0, 0] and sizes.tolist() == [1, 3, 3, 3]
    labels = {"a": "x", "b": "x", "c": "y", "d": "x", "e": None}
    images, per_label = graph.label_report(labels, [("a", "b"), ("a", "c"), ("b", "c"), ("c", "d"), ("e", "a")])
    by_id = {r["image_id"]: r for r in images}
    assert by_id["c"]["voted_label"] == "x" and by_id["c"]["suspicion"] == 1.0 and by_id["c"]["suspect_rank"] == 1
    assert by_id["a"]["same_label_share"] == 0.5 and by_id["a"]["suspicion"] == 0.0  # a tie keeps its own label
    assert "e" not in by_id  # unlabelled images are not judged
    assert {r["label"]: r["alone_ids"] for r in per_label} == {"x": ["d"], "y": ["c"]}  # d: only c, of y
    assert graph.adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert abs(graph.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) + 0.5) < 1e-9
