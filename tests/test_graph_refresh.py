"""`update` on an augmented index: the match graph and DBA brought up to date in the version it
publishes (issue 28), on the demo corpus: one day with new images, a changed one and a
takedown, then a rebuild."""

import logging
import os
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from delf_index.indexing import artifact as art
from delf_index.indexing import expansion
from delf_index.indexing.retrieval import Index
from delf_index.indexing.versions import current_manifest
from delf_index.pipelines import build, match, remove, update
from tests.conftest import ONE_WORKER

pytest.importorskip("skimage")

# a small collection changes by more than the guard's share a day; nothing compacts by itself
DAILY = {"compact_above": None, "compact_table_above": None, "extract": {"max_change": None}, "grace": 0}
NEW = ("coffee-new.jpg", "coffee-again.jpg", "astronaut-new.jpg")  # in no version before the day
CHANGED, TAKEN_DOWN = "rocket.jpg", "astronaut-light.jpg"


def edges(artifact):
    """{(image_id, image_id) sorted: inliers} of an artifact's graph."""
    ids = artifact.image_ids
    return {tuple(sorted((ids[a], ids[b]))): int(n) for a, b, n in expansion.edge_triples(artifact.graph)}


def pairs_table(folder):
    return [r for f in sorted(os.listdir(folder)) for r in pq.read_table(os.path.join(folder, f)).to_pylist()]


@pytest.fixture(scope="module")
def day(evaluated, corpus, tmp_path_factory):
    """An augmented copy of the evaluated index, then one `update` day: three new images, one
    changed (other content under its image_id), one taken down. (work folder, the artifact
    before, the artifact after)."""
    work = tmp_path_factory.mktemp("refresh")
    features, index = str(work / "features"), str(work / "index")
    shutil.copytree(evaluated[0] / "features", features)
    shutil.copytree(evaluated[0] / "index", index)
    match.run(index, str(work / "m0"), conf={"sheet": False}, beam_options=ONE_WORKER, augment=True)
    before = art.Artifact.load(index)
    photos = work / "day"
    photos.mkdir()
    shutil.copy(corpus / "queries" / "coffee.jpg", photos / "coffee-new.jpg")
    shutil.copy(corpus / "queries" / "astronaut.jpg", photos / "astronaut-new.jpg")
    shutil.copy(corpus / "queries" / "rocket.jpg", photos / CHANGED)
    coffee = cv2.imread(str(corpus / "queries" / "coffee.jpg"))
    h, w = coffee.shape[:2]
    cv2.imwrite(str(photos / "coffee-again.jpg"), coffee[h // 8 : h - h // 8, w // 10 : w - w // 10])
    remove.run(features, [TAKEN_DOWN], max_change=None)
    counts = update.run(str(photos), features, index, conf=DAILY, beam_options=ONE_WORKER, keep_unlisted=True)
    assert (counts["new"], counts["changed"], counts["graph_searched"]) == (3, 1, 4)
    return work, before, art.Artifact.load(index)


def test_the_day_keeps_the_old_edges_of_images_that_stay(day):
    _, before, after = day
    kept = {image for image in before.row_of if image not in (CHANGED, TAKEN_DOWN)}
    old = {pair: n for pair, n in edges(before).items() if set(pair) <= kept}
    new = edges(after)
    assert old and all(new.get(pair) == n for pair, n in old.items())
    # row ids of old images do not change on an append: the same rows, the same edges
    for pair in old:
        assert after.row_of[pair[0]] == before.row_of[pair[0]]


def test_no_edge_touches_a_dead_row(day):
    _, before, after = day
    offsets, neighbours, _ = after.graph
    dead = np.flatnonzero(~after.live)
    assert before.row_of[TAKEN_DOWN] in dead and before.row_of[CHANGED] in dead
    assert (offsets[dead + 1] == offsets[dead]).all()
    assert after.live[neighbours].all()
    assert any(TAKEN_DOWN in pair for pair in edges(before))  # it had edges to lose


def test_new_images_get_the_verified_neighbours_a_full_match_finds(day):
    """A full match of the new version (without the graph it now holds) finds each pair from
    both ends; the refresh searched the new images only: for a pair with a new image, the most
    inliers of the directions a new image was the query of."""
    work, _, after = day
    plain = {"sheet": False, "query": {"use_dba": False, "graph_expansion": False}}
    match.run(str(work / "index"), str(work / "m1"), conf=plain, beam_options=ONE_WORKER)
    searched = {*NEW, CHANGED}
    expected = {}
    for p in pairs_table(work / "m1" / "pairs"):
        inliers = max(p["inliers_ab"] * (p["image_a"] in searched), p["inliers_ba"] * (p["image_b"] in searched))
        if inliers:
            expected[(p["image_a"], p["image_b"])] = inliers
    found = {pair: n for pair, n in edges(after).items() if searched & set(pair)}
    assert found == expected
    coffee = {b for a, b in found if a == "coffee-new.jpg"} | {a for a, b in found if b == "coffee-new.jpg"}
    assert {"coffee.jpg", "coffee-again.jpg"} <= coffee  # an old neighbour and a new one, verified both ways
    assert found[("coffee-again.jpg", "coffee-new.jpg")] > 0


def test_dba_is_kept_where_the_neighbours_stay_and_is_that_of_the_graph(day):
    _, before, after = day
    n = after.num_rows
    dba, old_dba = after.dba_index.reconstruct_n(0, n), before.dba_index.reconstruct_n(0, before.num_rows)
    again = after.manifest["augmented"]["refreshed"]["dba_computed"]
    conf = after.manifest["augmented"]["conf"]
    # rows whose DBA neighbours are the same rows (an append keeps the rows of old images; the
    # changed image is a new row, its old one dead)
    untouched = [
        row
        for row in before.row_of.values()
        if after.live[row]
        and np.array_equal(
            expansion.dba_neighbours(after.graph, row, conf), expansion.dba_neighbours(before.graph, row, conf)
        )
    ]
    assert untouched and again == n - len(untouched)
    for row in untouched:  # bit for bit: the previous version's descriptor, not computed again
        assert dba[row].tobytes() == old_dba[row].tobytes()
    full = expansion.augmented_globals(after.global_index.reconstruct_n(0, n), after.graph, conf)
    np.testing.assert_allclose(dba, full, atol=2e-3)  # float16 storage
    entry = after.manifest["augmented"]
    assert entry["from_version"] == before.manifest["version"]
    assert entry["matched_version"] == before.manifest["augmented"]["matched_version"]
    assert entry["match"] == before.manifest["augmented"]["match"] == {"top": 50, "query": {}}
    assert entry["refreshed"]["searched"] == 4 and entry["refreshed"]["pairs_dropped"] > 0
    index = Index.load(str(day[0] / "index"))
    assert index.conf["graph_expansion"] and index.conf["use_dba"]


def test_a_rebuild_carries_the_graph_to_the_renumbered_rows(day):
    """Compaction (update's rebuild with the index's codebooks) numbers the rows anew, without
    the dead rows: the graph and DBA follow the images, nothing is searched."""
    work, _, after = day
    index, features = str(work / "index"), str(work / "features")
    refresh, refreshed = update.graph_refresh(index, True, ONE_WORKER)
    rebuilt = build.run(features, index, codebooks=index, beam_options=ONE_WORKER, before_publish=refresh, grace=0)
    compacted = art.Artifact.load(index)
    assert rebuilt["counts"]["dead"] == 0 and compacted.num_rows < after.num_rows
    assert edges(compacted) == edges(after)
    assert refreshed[0]["searched"] == 0 and refreshed[0]["pairs_dropped"] == 0
    dba, old = compacted.dba_index, after.dba_index
    for image, row in compacted.row_of.items():
        assert dba.reconstruct(row).tobytes() == old.reconstruct(after.row_of[image]).tobytes()


def test_a_takedown_with_index_keeps_the_graph_of_the_others(day, tmp_path):
    work, _, after = day
    index, features = str(tmp_path / "index"), str(tmp_path / "features")
    shutil.copytree(work / "index", index)
    shutil.copytree(work / "features", features)
    gone = "coffee-new.jpg"
    remove.main(["--features", features, "--ids", gone, "--index", index, "--max-change", "1"])
    taken = art.Artifact.load(index)
    assert gone not in {i for i, live in zip(taken.image_ids, taken.live) if live}
    assert edges(taken) == {pair: n for pair, n in edges(after).items() if gone not in pair}
    assert taken.manifest["augmented"]["refreshed"]["searched"] == 0


def test_a_new_version_without_the_graph_says_so(day, tmp_path, caplog):
    """Switched off in update, a plain build, and a removal without --index then an append:
    the new version drops the graph and DBA, and the build says so (issue 33)."""
    assert update.graph_refresh(str(day[0] / "index"), False, ONE_WORKER) == (None, [])  # the build will warn
    for case in ("build", "append"):
        index, features = str(tmp_path / case / "index"), str(tmp_path / case / "features")
        shutil.copytree(day[0] / "index", index)
        shutil.copytree(day[0] / "features", features)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            if case == "build":
                build.run(features, index, codebooks=index, beam_options=ONE_WORKER)
            else:
                remove.run(features, ["coffee-new.jpg"], max_change=None)
                build.run(features, index, append=True, beam_options=ONE_WORKER)
        assert f"the new version of {index} drops its match graph and DBA" in caplog.text
        assert "augmented" not in current_manifest(index)


def test_refreshed_graph_by_hand():
    # rows 0-3 before; row 1 leaves, rows 0, 2, 3 stay as 0, 1, 2; new row 3 verified with 0
    old = expansion.neighbour_graph(4, [(0, 1, 40), (0, 2, 30), (2, 3, 25)])
    new_of_old = np.array([0, -1, 1, 2])
    graph, counts = expansion.refreshed_graph(old, new_of_old, 4, [(3, 0, 22), (0, 3, 35)])
    assert counts == {"pairs_kept": 2, "pairs_dropped": 1, "pairs_added": 1}
    assert sorted(map(tuple, expansion.edge_triples(graph).tolist())) == [(0, 1, 30), (0, 3, 35), (1, 2, 25)]
    carried = expansion.carried_rows([("a", "1"), ("b", "1"), None], [("a", "1"), None, ("b", "2"), ("b", "1")])
    assert [c.tolist() for c in carried] == [[0, 3, -1], [0, -1, -1, 1]]
