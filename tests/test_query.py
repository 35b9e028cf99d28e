"""The query module, `delf-index query` and `delf-index evaluate` on a small real corpus."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from delf_index.indexing.artifact import Artifact
from delf_index.indexing.retrieval import Index, QueryError, best_rows, verified_first
from delf_index.pipelines import evaluate
from delf_index.runtime import tables
from delf_index.runtime.features import Features
from delf_index.runtime.images import read_image
from tests.conftest import ONE_WORKER

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def index(evaluated):
    return Index.load(str(evaluated[0] / "index"))


def test_evaluate_writes_metrics_report_and_per_query_rows(evaluated):
    work, summary = evaluated
    assert set(summary) == {"mAP", "mP@5", "R@1", "queries"} and summary["queries"] == 18
    assert summary["mAP"] > 0.8  # three places under strong synthetic changes, three distractors
    with open(work / "eval" / "metrics.json") as f:
        scores = json.load(f)["scores"]
    assert set(scores) == {"global only", "local voting only", "fused", "fused + verification", "+ alpha-QE",
                           "+ view synthesis", "default"}  # fmt: skip
    # the default is its own row: alpha-QE, and view synthesis where nothing verifies (no query
    # here: one extraction each), so alpha-QE's numbers but the time
    timeless = {name: {k: v for k, v in s.items() if "seconds" not in k} for name, s in scores.items()}
    assert timeless["default"] == timeless["+ alpha-QE"] and scores["default"]["extractions_per_query"] == 1
    assert scores["default"]["synthesized"] == 0
    assert scores["+ view synthesis"]["extractions_per_query"] >= 1
    report = (work / "eval" / "report.md").read_text()
    assert "| fused + verification |" in report and "pr.png" in report and "Worst queries" in report
    assert "extractions/query" in report and "| synthesized |" in report
    assert (work / "eval" / "pr.png").stat().st_size > 1000
    rows = pq.read_table(work / "eval" / "queries.parquet")
    assert rows.num_rows == 18 and "fused_+_verification|all|ap" in rows.column_names


def test_evaluate_reuses_what_did_not_change(evaluated, corpus, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(evaluated[0], work)
    images, groups = str(corpus / "images"), str(corpus / "groups.csv")
    table_version = tables.snapshot(str(work / "features")).version
    index_version = Artifact.load(str(work / "index")).manifest["version"]
    # another fit seed: the same features, new codebooks and a new index
    evaluate.run(images, str(work), groups=groups, conf={"ablation": False, "fit": {"seed": 1}})  # default workers
    with open(work / "features" / "_SUMMARY.json") as f:
        assert json.load(f)["images"] == 0 and tables.snapshot(str(work / "features")).version == table_version
    with open(work / "codebooks" / "codebooks.json") as f:
        assert json.load(f)["conf"]["seed"] == 1  # not the seed-0 codebooks of the first run
    rebuilt = Artifact.load(str(work / "index")).manifest
    assert rebuilt["version"] != index_version and rebuilt["codebooks"]["conf"]["seed"] == 1
    # one image fewer in the ground truth: it leaves the features, the index is rebuilt without it
    lines = (corpus / "groups.csv").read_text().splitlines()
    (tmp_path / "fewer.csv").write_text("\n".join(line for line in lines if not line.startswith("rocket-zoom")) + "\n")
    summary = evaluate.run(
        images,
        str(work),
        groups=str(tmp_path / "fewer.csv"),
        conf={"ablation": False, "fit": {"seed": 1}},
        beam_options=ONE_WORKER,
    )
    with open(work / "features" / "_SUMMARY.json") as f:
        assert json.load(f)["deleted"] == 1
    assert "rocket-zoom.jpg" not in Artifact.load(str(work / "index")).image_ids and summary["queries"] == 17
    # a run interrupted after extract and fit, before build: the next run builds, though
    # nothing is left to extract
    steps = json.loads((work / "steps.json").read_text())
    (work / "steps.json").write_text(json.dumps({"fit": steps["fit"]}))
    version = Artifact.load(str(work / "index")).manifest["version"]
    evaluate.run(images, str(work), groups=str(tmp_path / "fewer.csv"), conf={"ablation": False, "fit": {"seed": 1}})
    assert Artifact.load(str(work / "index")).manifest["version"] != version
    assert json.loads((work / "steps.json").read_text())["build"] == steps["fit"]


def test_search_takes_paths_bytes_arrays_and_features(index, corpus):
    path = str(corpus / "images" / "coffee-view.jpg")
    image = read_image(path)
    with open(path, "rb") as f:
        data = f.read()
    by_path = index.search(path, top_k=5, exclude=["coffee-view.jpg"])
    assert by_path[0].image_id.startswith("coffee") and by_path[0].inliers >= 8
    assert by_path[0].query_xy.shape == by_path[0].match_xy.shape == (by_path[0].inliers, 2)
    features = index.query_features(image)
    shared = {"prepared": index.prepare(features)}  # what the evaluation's ablation passes
    for query, extra in ((data, {}), (image, {}), (features, {}), (features, shared)):
        again = index.search(query, top_k=5, exclude=["coffee-view.jpg"], **extra)
        assert [r.image_id for r in again] == [r.image_id for r in by_path]
        assert [r.inliers for r in again] == [r.inliers for r in by_path]
    everything = index.search(image, top_k=None)
    assert len(everything) == len(index) and everything[0].image_id == "coffee-view.jpg"


def test_each_stage_can_be_switched_off(evaluated, corpus):
    artifact = Artifact.load(str(evaluated[0] / "index"))
    query = str(corpus / "images" / "rocket-zoom.jpg")
    no_verification = Index(artifact, {"use_verification": False}).search(query, top_k=None)
    assert all(r.inliers == 0 for r in no_verification)
    no_global = Index(artifact, {"use_global": False}).search(query, top_k=None)
    assert all(r.global_score == 0 for r in no_global) and no_global[0].local_score > 0
    no_local = Index(artifact, {"use_local": False, "use_verification": False}).search(query, top_k=None)
    assert all(r.local_score == 0 for r in no_local) and no_local[0].global_score > 0
    with pytest.raises(ValueError, match="unknown query options"):
        Index(artifact, {"knnn": 3})


def test_parallel_queries_give_the_serial_results(index, corpus):
    queries = sorted(str(p) for p in (corpus / "images").iterdir())[:8]
    serial = [[(r.image_id, r.inliers, r.score) for r in index.search(q, top_k=5)] for q in queries]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(
            pool.map(lambda q: [(r.image_id, r.inliers, r.score) for r in index.search(q, top_k=5)], queries)
        )
    assert parallel == serial


def test_search_parameters_are_per_call_not_on_the_shared_index(evaluated, corpus):
    artifact = Artifact.load(str(evaluated[0] / "index"))
    nprobe_before = faiss.extract_index_ivf(artifact.index).nprobe
    narrow, wide = Index(artifact, {"nprobe": 1}), Index(artifact, {"nprobe": 64})
    features = narrow.query_features(str(corpus / "images" / "coffee-zoom.jpg"))
    expected = {index: index.neighbours(features)[0] for index in (narrow, wide)}
    assert not np.array_equal(expected[narrow], expected[wide])  # the setting matters here
    with ThreadPoolExecutor(4) as pool:  # both settings at once on one faiss index
        found = list(pool.map(lambda index: (index, index.neighbours(features)[0]), [narrow, wide] * 4))
    for index, sims in found:
        np.testing.assert_array_equal(sims, expected[index])
    assert faiss.extract_index_ivf(artifact.index).nprobe == nprobe_before


def test_user_errors_and_edge_cases(index, evaluated, tmp_path):
    (tmp_path / "bad.jpg").write_text("<html>403 Forbidden</html>")
    with pytest.raises(QueryError, match="cannot read the query"):
        index.search(str(tmp_path / "bad.jpg"))
    with pytest.raises(QueryError, match="cannot read the query"):
        index.search(str(tmp_path / "missing.jpg"))
    no_features = Features(
        x=np.zeros(0, np.float32),
        y=np.zeros(0, np.float32),
        scale=np.zeros(0, np.float32),
        attention=np.zeros(0, np.float32),
        descriptors=np.zeros((0, 112), np.float32),
        global_descriptor=index.query_features(np.full((64, 64, 3), 90, np.uint8)).global_descriptor,
        width=64,
        height=64,
    )
    results = index.search(no_features, top_k=3)  # global similarity alone still ranks
    assert len(results) == 3 and all(r.inliers == 0 for r in results)
    everyone_but = index.search(no_features, top_k=None, exclude=list(index.artifact.image_ids[1:]))
    assert [r.image_id for r in everyone_but] == [index.artifact.image_ids[0]]
    foreign = Index(Artifact.load(str(evaluated[0] / "index")))
    foreign.artifact.manifest["model_fingerprint"] = "0" * 64
    with pytest.raises(QueryError, match="pass the index's model"):
        foreign.search(np.full((64, 64, 3), 90, np.uint8))


def test_query_command_json_and_visualisation(evaluated, corpus, tmp_path):
    cmd = [sys.executable, "-m", "delf_index", "query", "--index", str(evaluated[0] / "index")]
    query = str(corpus / "images" / "astronaut-occluded.jpg")
    out = subprocess.run(
        cmd + [query, "--top", "3", "--json", "--visualize", str(tmp_path / "viz")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["results"][0]["image_id"] == "astronaut-occluded.jpg"
    assert answer["results"][1]["image_id"].startswith("astronaut") and answer["results"][1]["inliers"] >= 8
    assert len(os.listdir(tmp_path / "viz")) == 3
    bad = subprocess.run(cmd + [str(tmp_path / "nothing.jpg")], capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot query" in bad.stderr and "Traceback" not in bad.stderr


def test_relative_image_folders_reach_the_manifest_as_absolute_paths(corpus, monkeypatch):
    # run_local.sh passes outputs/demo/corpus/images; the manifest lives in the workdir and
    # extract resolves relative uris against the manifest's folder
    monkeypatch.chdir(corpus.parent)
    manifest, _ = evaluate.groups_protocol(str(corpus / "groups.csv"), f"{corpus.name}/images")
    assert all(os.path.isabs(uri) and os.path.exists(uri) for _, uri, _ in manifest)
    assert evaluate.absolute("gs://bucket/images") == "gs://bucket/images"


def test_revisitop_ground_truth_protocol(corpus, tmp_path, evaluated):
    """A revisitop-style .pkl: queries outside the database, cropped to a box, Easy/Medium/Hard."""
    images = sorted(p.name[: -len(".jpg")] for p in (corpus / "images").iterdir())
    database = [n for n in images if n not in ("coffee", "rocket")]
    size = read_image(str(corpus / "images" / "coffee.jpg")).shape
    gnd = []
    for query in ("coffee", "rocket"):
        variants = [database.index(n) for n in database if n.startswith(query + "-")]
        gnd.append(
            {
                "bbx": [10.0, 10.0, size[1] - 10.0, size[0] - 10.0],
                "easy": variants[:2],
                "hard": variants[2:4],
                "junk": variants[4:],
            }
        )
    cfg = {"imlist": database, "qimlist": ["coffee", "rocket"], "gnd": gnd}
    with open(tmp_path / "gnd_demo.pkl", "wb") as f:
        pickle.dump(cfg, f)
    summary = evaluate.run(
        str(corpus / "images"),
        str(tmp_path / "work"),
        gnd=str(tmp_path / "gnd_demo.pkl"),
        conf={"ablation": False},
        beam_options=ONE_WORKER,
    )
    with open(tmp_path / "work" / "eval" / "metrics.json") as f:
        result = json.load(f)
    assert result["protocol"] == "medium" and summary["queries"] == 2
    assert set(result["scores"]) == {"default"}  # no ablation: the default alone
    assert set(result["scores"]["default"]) >= {"easy", "medium", "hard"}
    assert result["scores"]["default"]["medium"]["mAP"] > 0.7


def test_best_rows_is_the_start_of_a_stable_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(np.float32)  # many ties
    rankable = rng.random(200) < 0.8
    full = np.argsort(-np.where(rankable, scores, -np.inf), kind="stable")[: rankable.sum()]
    for count in (0, 1, 7, 40, int(rankable.sum()), 500):
        np.testing.assert_array_equal(best_rows(scores, rankable, count), full[:count])
    # verified first: what sorting every rankable row by (-inliers, -fused) gives
    inliers = np.zeros(200, np.int64)
    shortlist = full[:30]
    inliers[shortlist] = rng.integers(0, 3, 30) * rng.integers(12, 14, 30)  # zeros and ties
    expected = sorted(full, key=lambda r: (-inliers[r], -scores[r]))
    for count in (30, 60, int(rankable.sum())):
        order = verified_first(best_rows(scores, rankable, count), scores, inliers)
        np.testing.assert_array_equal(order, expected[: len(order)])
        assert len(order) >= count


def test_scoring_only_the_rows_that_can_rank_gives_the_full_ranking(evaluated, corpus, monkeypatch):
    """search(top_k=k) scores by the global descriptor only the GLOBAL_TOP best rows and those
    a local score can lift among the best fused (the others -inf): the same results and
    scores as ranking every row (top_k=None)."""
    from delf_index.indexing import retrieval

    artifact = Artifact.load(str(evaluated[0] / "index"))
    index = Index(artifact, {"shortlist": 3})
    queries = sorted(str(p) for p in (corpus / "images").iterdir())
    assert len(index) > 8
    full = {q: index.search(q, top_k=None, exclude=[os.path.basename(q)]) for q in queries}
    monkeypatch.setattr(retrieval, "GLOBAL_TOP", 5)
    selected = []  # the rows scored after the GLOBAL_TOP, per query that had any
    batch = faiss.IDSelectorBatch
    monkeypatch.setattr(faiss, "IDSelectorBatch", lambda rows: selected.append(len(rows)) or batch(rows))
    partial_rows = 0
    for q in queries:
        found = index.search(q, top_k=3, exclude=[os.path.basename(q)])
        expected = full[q][:3]
        assert [(r.image_id, r.score, r.global_score, r.inliers) for r in found] == [
            (r.image_id, r.score, r.global_score, r.inliers) for r in expected
        ]
        features = index.query_features(q)
        local = index.conf["local_weight"] * index._votes(index.neighbours(features), artifact.num_rows, len(features))
        rankable = artifact.live.copy()
        rankable[artifact.row_of[os.path.basename(q)]] = False
        scores = index._global_scores(features.global_descriptor, local, rankable, 3)
        every = index._global_scores(features.global_descriptor)
        scored = np.isfinite(scores)
        np.testing.assert_array_equal(scores[scored], every[scored])
        assert best_rows(scores + local, rankable, 3).tolist() == best_rows(every + local, rankable, 3).tolist()
        partial_rows += int((~scored).sum())
        # a synthesized view (other local scores, the query's global descriptor) starts from
        # these scores: the same best rows as scoring every row
        view = index.query_features(queries[(queries.index(q) + 1) % len(queries)])
        moved = index.conf["local_weight"] * index._votes(index.neighbours(view), artifact.num_rows, len(view))
        again = index._global_scores(features.global_descriptor, moved, rankable, 3, known=scores)
        assert np.isfinite(again[np.isfinite(scores)]).all()
        np.testing.assert_array_equal(again[np.isfinite(again)], every[np.isfinite(again)])
        assert best_rows(again + moved, rankable, 3).tolist() == best_rows(every + moved, rankable, 3).tolist()
    assert partial_rows > 0 and selected  # some rows were never scored, some were lifted
    assert Index(artifact, {"shortlist": 0}).search(queries[0], top_k=0) == []
