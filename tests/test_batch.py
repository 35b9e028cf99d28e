"""Batch search and the match graph of a collection (Beam jobs) on the demo corpus."""

import csv
import os
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import expansion, graph
from delf_index.indexing.retrieval import Index, QueryError
from delf_index.pipelines import build, match, search
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.images import read_image
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
    # the tables hold descriptors as float16: a few correspondences change, RANSAC draws other
    # samples, and on a perspective change (where several affine models fit about as well) the
    # inliers may move by up to 10 %, which may swap two results of nearly equal inliers. The
    # same results; most with the same inliers, all close
    inliers = {(r["query_id"], r["image_id"]): r["inliers"] for r in rows}
    assert {(r["query_id"], r["image_id"]) for r in from_tables} == set(inliers)
    moved = [abs(r["inliers"] - inliers[r["query_id"], r["image_id"]]) / max(r["inliers"], 1) for r in from_tables]
    assert max(moved) <= 0.12 and np.mean(np.array(moved) == 0) >= 0.75
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


def test_augment_publishes_the_graph_and_dba_that_expansion_uses(evaluated, corpus, tmp_path):
    index = str(tmp_path / "index")
    shutil.copytree(evaluated[0] / "index", index)
    plain = Index.load(index)
    with pytest.raises(QueryError, match="needs an augmented index"):
        Index(plain.artifact, {"use_dba": True}).search(str(corpus / "images" / "coffee.jpg"))
    summary = match.run(index, str(tmp_path / "m"), conf={"sheet": False}, beam_options=ONE_WORKER, augment=True)
    artifact = art.Artifact.load(index)
    assert artifact.manifest["version"] == summary["augmented_version"] != plain.artifact.manifest["version"]
    assert {"neighbours.npz", "dba.faiss"} <= set(artifact.manifest["files"])
    coffee = artifact.row_of["coffee.jpg"]
    near, inliers = expansion.neighbours_of(artifact.graph, coffee, 12)
    pairs, _ = table(tmp_path / "m" / "pairs")
    expected = {
        p["image_b"] if p["image_a"] == "coffee.jpg" else p["image_a"]
        for p in pairs
        if "coffee.jpg" in (p["image_a"], p["image_b"])
    }
    assert {artifact.image_ids[r] for r in near} == expected and list(inliers) == sorted(inliers, reverse=True)
    # DBA: coffee's descriptor moved towards its verified neighbours'
    dba, plain_globals = artifact.dba_index.reconstruct(coffee), artifact.global_index.reconstruct(coffee)
    mates = artifact.global_index.reconstruct_n(0, artifact.num_rows)[near[:5]]
    assert (mates @ dba).mean() > (mates @ plain_globals).mean()
    everything = {"expansion": True, "graph_expansion": True, "use_dba": True}
    query = str(corpus / "images" / "coffee-mixed.jpg")
    expanded = Index(artifact, everything).search(query, top_k=8, exclude=["coffee-mixed.jpg"])
    assert {r.image_id for r in expanded[:5]} == {
        f"coffee{v}.jpg" for v in ("", "-light", "-occluded", "-view", "-zoom")
    }
    # an append drops the graph: it no longer describes the index
    features = str(tmp_path / "features")  # the takedown is recorded in the table: a copy of it
    shutil.copytree(evaluated[0] / "features", features)
    build.run(features, index, append=True, remove=["rocket.jpg"], beam_options=ONE_WORKER)
    appended = art.Artifact.load(index)
    # nor does its manifest say it is augmented (evaluate --augment would not augment it again)
    assert appended.graph is None and appended.dba_index is None and "augmented" not in appended.manifest


def test_alpha_qe_and_the_neighbour_graph_by_hand():
    query = np.array([1.0, 0.0], np.float32)
    others = np.array([[0.6, 0.8], [-1.0, 0.0]], np.float32)  # the second points away: weight 0
    expanded = expansion.alpha_qe(query, others, alpha=1.0)
    np.testing.assert_allclose(expanded, [1.36, 0.48] / np.linalg.norm([1.36, 0.48]), rtol=1e-6)
    offsets, near, inliers = expansion.neighbour_graph(4, [(0, 1, 30), (0, 2, 50), (2, 3, 12)])
    assert offsets.tolist() == [0, 2, 3, 5, 6]
    assert near[:2].tolist() == [2, 1] and inliers[:2].tolist() == [50, 30]  # most inliers first
    assert expansion.neighbours_of((offsets, near, inliers), 2, 20)[0].tolist() == [0]


def test_a_query_the_index_refuses_becomes_an_error_row():
    """A query that Index.search refuses (QueryError) is written to the errors table with
    stage `search`; the job goes on."""

    class Refusing:
        def search(self, *args, **kwargs):
            raise QueryError("use_dba needs an augmented index")

    fn = search.Search("unused", resolve_conf(None, search.default_conf, "search"), handle=None)
    fn.index = Refusing()
    (out,) = list(fn.process(("q.jpg", "/photos/q.jpg", None)))
    assert out.tag == "errors"
    assert (out.value["image_id"], out.value["stage"]) == ("q.jpg", "search")
    assert "augmented" in out.value["error"]


def test_a_batch_synthesizes_the_most_promising_queries_within_its_budget(evaluated, corpus, tmp_path):
    """Four photos turned a quarter, each wanting views (nothing counts as verified, their
    fits turn): a budget of a half synthesizes the two most promising (as Index.search ranks
    them with views), the other two keep their plain results; the summary counts it."""
    index = str(evaluated[0] / "index")
    query = {"synthesis_min_inliers": 1000}
    images = tmp_path / "turned"
    images.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg", "coffee-zoom.jpg"):
        turned = np.ascontiguousarray(np.rot90(read_image(str(corpus / "images" / name))))
        cv2.imwrite(str(images / name), cv2.cvtColor(turned, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    direct, promises = Index.load(index, conf=query), {}
    for name in os.listdir(images):
        timings = {}
        direct.search(str(images / name), top_k=3, timings=timings, synthesize=False)
        assert timings["synthesis_wanted"], name
        promises[name] = timings["synthesis_promise"]
    chosen = sorted(promises, key=lambda name: (-promises[name], name))[:2]
    summary = search.run(str(images), index, str(tmp_path / "out"), {"top": 3, "query": query, "synthesis_budget": 0.5},
                         beam_options=ONE_WORKER)  # fmt: skip
    assert (summary["synthesis_wanted"], summary["synthesized"], summary["views"]) == (4, 2, 6)
    assert summary["extractions_per_query"] == (4 + 6) / 4
    rows, _ = table(tmp_path / "out" / "results")
    for name in promises:
        expected = direct.search(str(images / name), top_k=3, synthesize=name in chosen)
        got = sorted((r for r in rows if r["query_id"] == name), key=lambda r: r["rank"])
        assert [(r["image_id"], r["inliers"]) for r in got] == [(e.image_id, e.inliers) for e in expected], name


def test_the_synthesis_budget_takes_the_most_promising_queries_up_to_its_share():
    """Seeded: batches of queries, some wanting views with a promise (ties included), split
    into random bundles and merged in random order: the budget's choice (the queries Synthesize
    takes: not after `last`) is at most floor(share x queries) of them, as many as that
    allows, each at least as promising as any it leaves, and the same however the batch was
    split."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        count, share = int(rng.integers(0, 60)), float(rng.choice([0.0, 0.05, 0.1, 0.25, 1.0, rng.uniform()]))
        promises = [float(rng.integers(0, 5)) if rng.uniform() < 0.4 else None for _ in range(count)]
        queries = [(f"q{i:02d}", p) for i, p in enumerate(promises)]
        budget = search.SynthesisBudget(share)
        outputs = []
        for _ in range(3):
            order = rng.permutation(count)
            cuts = sorted(rng.integers(0, count + 1, size=int(rng.integers(0, 4))))
            parts = []
            for chunk in np.split(order, cuts):
                accumulator = budget.create_accumulator()
                for i in chunk:
                    accumulator = budget.add_input(accumulator, queries[i])
                parts.append(accumulator)
            outputs.append(budget.extract_output(budget.merge_accumulators(parts[::-1])))
        assert outputs[0] == outputs[1] == outputs[2]
        last = outputs[0]["last"]
        wanted = [(q, p) for q, p in queries if p is not None]
        chosen = [(q, p) for q, p in wanted if last is not None and (-p, q) <= last]
        left = [(q, p) for q, p in wanted if (q, p) not in chosen]
        assert outputs[0]["wanted"] == len(wanted)
        assert len(chosen) == min(len(wanted), int(np.floor(share * count + 1e-9)))
        assert not chosen or not left or min(p for _, p in chosen) >= max(p for _, p in left)


def test_label_csv_rows_without_an_image_id_are_skipped(tmp_path):
    (tmp_path / "labels.csv").write_text("image_id,label\na.jpg,x\n,y\n b.jpg ,\n")
    assert match.read_labels(str(tmp_path / "labels.csv")) == {"a.jpg": "x", "b.jpg": None}
    (tmp_path / "bad.csv").write_text("name,label\na.jpg,x\n")
    with pytest.raises(UserError, match="needs columns image_id"):
        match.read_labels(str(tmp_path / "bad.csv"))


def test_graph_expansion_and_dba_default_to_what_the_index_holds(evaluated, tmp_path):
    """None (the default): on exactly when the index holds a match graph and DBA descriptors;
    alpha-QE is on by default; an explicit False stays off."""
    index = str(tmp_path / "index")
    shutil.copytree(evaluated[0] / "index", index)
    plain = Index.load(index)
    assert plain.conf["expansion"] and not plain.conf["graph_expansion"] and not plain.conf["use_dba"]
    match.run(index, str(tmp_path / "m"), conf={"sheet": False}, beam_options=ONE_WORKER, augment=True)
    artifact = art.Artifact.load(index)
    assert Index(artifact).conf["graph_expansion"] and Index(artifact).conf["use_dba"]
    off = Index(artifact, {"graph_expansion": False, "use_dba": False, "expansion": False}).conf
    assert not (off["graph_expansion"] or off["use_dba"] or off["expansion"])
