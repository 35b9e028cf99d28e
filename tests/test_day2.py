"""Day-2 operations on object storage: scheduled incremental runs that give the index of a
from-scratch build, versions that readers never see half-made, and a cache that processes
share (gs:// through the GCS emulator the suite starts, s3:// through moto's server)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from delf_index import Extractor
from delf_index.indexing import artifact as art
from delf_index.indexing import shards
from delf_index.indexing.retrieval import Index
from delf_index.indexing.versions import list_versions
from delf_index.pipelines import build, fit, update
from delf_index.runtime import cache as cache_lib
from delf_index.runtime import storage
from tests.conftest import ONE_WORKER, jpeg, live_rows, rgb


@pytest.fixture(scope="module")
def variants(photos):
    """Half-size photos and mirrored copies: 8 distinct images, 4 places."""
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        small = np.ascontiguousarray(rgb(photos[name])[::2, ::2])
        out[name], out[f"{name}-mirror"] = small, small[:, ::-1]
    return out


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DELF_INDEX_CACHE", str(folder))
    return folder


# a small collection changes by more than the guard's share a day; versions are pruned at once
DAILY = {"compact_above": None, "compact_table_above": None, "extract": {"max_change": None}, "grace": 0}


def rankings(index_uri, queries):
    """Per query, the whole ranking as (image_id, inliers, rounded fused score)."""
    index = Index.load(index_uri)
    return [[(r.image_id, r.inliers, round(r.score, 4)) for r in index.search(q, top_k=None)] for q in queries]


def test_day_by_day_updates_give_the_index_of_a_fresh_build(gcs_bucket, variants, cache, tmp_path):
    fs = storage.filesystem(f"gs://{gcs_bucket}")[0]
    root = f"gs://{gcs_bucket}/daily"
    photos, features, index = f"{root}/photos", str(tmp_path / "features"), f"{root}/index"

    def put(name, key):
        fs.pipe(f"{gcs_bucket}/daily/photos/{name}.jpg", jpeg(variants[key]))

    for name in ("astronaut", "coffee", "chelsea", "astronaut-mirror", "coffee-mirror"):
        put(name, name)
    queries = [Extractor().extract_image(jpeg(variants[name])) for name in ("rocket", "chelsea-mirror")]
    # each day: a new image, one rewritten with other content, one deleted
    days = {
        1: (),
        2: ("rocket", ("chelsea", "rocket-mirror"), "coffee"),
        3: ("chelsea-mirror", ("chelsea", "chelsea"), "rocket"),
    }
    expected_counts = {
        1: {"new": 5, "changed": 0, "deleted": 0, "unchanged": 0},
        2: {"new": 1, "changed": 1, "deleted": 1, "unchanged": 3},
        3: {"new": 1, "changed": 1, "deleted": 1, "unchanged": 3},
    }
    versions = []
    for day, change in days.items():
        if change:
            new, (rewritten, content), deleted = change
            put(new, new)
            put(rewritten, content)
            fs.rm(f"{gcs_bucket}/daily/photos/{deleted}.jpg")
        counts = update.run(f"{photos}/*.jpg", features, index, conf=DAILY, beam_options=ONE_WORKER)
        assert {k: counts[k] for k in expected_counts[day]} == expected_counts[day], day
        versions.append(counts["version"])
        listed = sorted(p.rsplit("/", 1)[1] for p in fs.glob(f"{gcs_bucket}/daily/photos/*.jpg"))
        assert sorted(live_rows(features)) == listed
        # a build from scratch over the same live rows, with the same codebooks
        fresh = f"{root}/fresh-{day}"
        build.run(features, fresh, codebooks=index, beam_options=ONE_WORKER)
        incremental = Index.load(index)
        assert sorted(incremental.artifact.row_of) == listed and len(incremental) == len(listed)
        assert rankings(index, queries) == rankings(fresh, queries), day
    assert counts["dead"] == 4  # chelsea twice, coffee, rocket: dead rows until a rebuild
    assert len(list_versions(index)) == build.DEFAULT_KEEP and list_versions(index)[-1] == versions[-1]
    # compaction: a rebuild from the live rows, with the index's own codebooks
    compacted = update.run(
        f"{photos}/*.jpg", features, index, conf={**DAILY, "compact_above": 0.1}, beam_options=ONE_WORKER
    )
    assert (compacted["index"], compacted["dead"], compacted["images"]) == ("rebuilt", 0, len(listed))
    assert rankings(index, queries) == rankings(f"{root}/fresh-3", queries)


def test_an_interrupted_append_changes_nothing_readers_see(gcs_bucket, variants, cache, monkeypatch, tmp_path):
    root = f"gs://{gcs_bucket}/interrupted"
    fs = storage.filesystem(root)[0]
    features = str(tmp_path / "features")
    for name in ("astronaut", "coffee", "chelsea-mirror"):
        fs.pipe(f"{gcs_bucket}/interrupted/photos/{name}.jpg", jpeg(variants[name]))
    first = update.run(f"{root}/photos/*.jpg", features, f"{root}/index", conf=DAILY, beam_options=ONE_WORKER)
    fs.pipe(f"{gcs_bucket}/interrupted/photos/rocket.jpg", jpeg(variants["rocket"]))
    merge = shards.merge_shards

    def merge_then_fail(*args, **kwargs):
        merge(*args, **kwargs)  # the new version's files are written, then the worker dies
        raise RuntimeError("worker lost")

    monkeypatch.setattr(shards, "merge_shards", merge_then_fail)
    with pytest.raises(RuntimeError, match="worker lost"):
        update.run(f"{root}/photos/*.jpg", features, f"{root}/index", conf=DAILY, beam_options=ONE_WORKER)
    reader = art.Artifact.load(f"{root}/index")
    assert reader.manifest["version"] == first["version"] and "rocket.jpg" not in reader.row_of
    monkeypatch.setattr(shards, "merge_shards", merge)
    healed = update.run(f"{root}/photos/*.jpg", features, f"{root}/index", conf=DAILY, beam_options=ONE_WORKER)
    assert healed["unchanged"] == 4 and healed["extracted"] == 0  # extracted by the interrupted run
    assert "rocket.jpg" in art.Artifact.load(f"{root}/index").row_of
    assert not fs.exists(f"{gcs_bucket}/interrupted/index/_staging")


LOAD = """
import sys
from delf_index import Index
index = Index.load(sys.argv[1])
print(len(index), index.artifact.manifest["version"])
"""


def test_processes_share_one_cache_and_a_rebuild_in_place_loads(gcs_bucket, variants, cache, tmp_path):
    root = f"gs://{gcs_bucket}/shared"
    fs = storage.filesystem(root)[0]
    features = str(tmp_path / "features")
    for name in ("astronaut", "coffee", "chelsea"):
        fs.pipe(f"{gcs_bucket}/shared/photos/{name}.jpg", jpeg(variants[name]))
    first = update.run(f"{root}/photos/*.jpg", features, f"{root}/index", beam_options=ONE_WORKER)
    env = {**os.environ, "DELF_INDEX_CACHE": str(cache)}
    loaders = [
        subprocess.Popen([sys.executable, "-c", LOAD, f"{root}/index"], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].split() for p in loaders]
    assert [p.returncode for p in loaders] == [0, 0]
    assert outputs == [["3", first["version"]]] * 2
    blobs = [n for n in os.listdir(cache / "blobs") if len(n) == 64]
    manifest = json.loads(fs.cat(f"{gcs_bucket}/shared/index/versions/{first['version']}/manifest.json"))
    assert sorted(blobs) == sorted({e["sha256"] for e in manifest["files"].values()})  # each file once, verified
    assert not [n for n in os.listdir(cache / "blobs") if ".tmp-" in n]
    # new codebooks (another seed), the index rebuilt in place: the next load is the new version, intact
    update_codebooks = f"{root}/codebooks-seed1"
    fit.run(features, update_codebooks, {"seed": 1}, beam_options=ONE_WORKER)
    rebuilt = build.run(features, f"{root}/index", codebooks=update_codebooks, beam_options=ONE_WORKER)
    reloaded = art.Artifact.load(f"{root}/index")  # checksums verified
    assert reloaded.manifest["version"] == rebuilt["version"] != first["version"]
    assert reloaded.manifest["codebooks"]["conf"]["seed"] == 1 and len(reloaded) == 3


def test_an_object_changed_under_its_manifest_is_never_handed_out(gcs_bucket, variants, cache, monkeypatch, tmp_path):
    root = f"gs://{gcs_bucket}/tampered"
    fs = storage.filesystem(root)[0]
    for name in ("astronaut", "coffee"):
        fs.pipe(f"{gcs_bucket}/tampered/photos/{name}.jpg", jpeg(variants[name]))
    done = update.run(f"{root}/photos/*.jpg", str(tmp_path / "features"), f"{root}/index", beam_options=ONE_WORKER)
    geometry = f"{gcs_bucket}/tampered/index/versions/{done['version']}/geometry.npy"
    fs.pipe(geometry, fs.cat(geometry)[:-6] + b"\x00" * 6)  # same size, other content
    assert len(art.Artifact.load(f"{root}/index")) == 2  # this cache holds the verified file already
    other = cache.parent / "other-cache"
    monkeypatch.setenv("DELF_INDEX_CACHE", str(other))
    with pytest.raises(cache_lib.DigestMismatch, match="geometry.npy .* changed after its manifest"):
        art.Artifact.load(f"{root}/index")
    assert not [n for n in os.listdir(other / "blobs") if ".tmp-" in n]  # nothing half-fetched left behind


def test_local_publishing_never_rewrites_a_file_a_reader_has_mapped(tmp_path, variants, cache):
    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "coffee"):
        (tmp_path / "photos" / f"{name}.jpg").write_bytes(jpeg(variants[name]))
    paths = [str(tmp_path / p) for p in ("photos", "features", "index")]
    update.run(*paths, beam_options=ONE_WORKER)
    reader = Index.load(paths[2])
    mapped = os.path.join(reader.artifact.folder, "index.ivfdata")
    before = reader.search(jpeg(variants["coffee"]), top_k=2)
    (tmp_path / "photos" / "rocket.jpg").write_bytes(jpeg(variants["rocket"]))
    update.run(*paths, conf={"keep": 1, "grace": 0}, beam_options=ONE_WORKER)  # the reader's version is pruned
    assert not os.path.exists(mapped)  # unlinked, not rewritten: the reader's mapping stays valid
    after = reader.search(jpeg(variants["coffee"]), top_k=2)
    assert [(r.image_id, r.inliers) for r in after] == [(r.image_id, r.inliers) for r in before]
    assert "rocket.jpg" in Index.load(paths[2]).artifact.row_of


def test_the_chain_on_s3(s3_bucket, variants, cache):
    root = f"s3://{s3_bucket}/chain"
    fs = storage.filesystem(root)[0]
    for name in ("astronaut", "coffee", "rocket"):
        fs.pipe(f"{s3_bucket}/chain/photos/{name}.jpg", jpeg(variants[name]))
    first = update.run(f"{root}/photos", f"{root}/features", f"{root}/index", conf=DAILY, beam_options=ONE_WORKER)
    assert (first["index"], first["images"]) == ("built", 3)
    fs.pipe(f"{s3_bucket}/chain/photos/rocket.jpg", jpeg(variants["chelsea"]))  # rewritten: a new ETag
    second = update.run(f"{root}/photos", f"{root}/features", f"{root}/index", conf=DAILY, beam_options=ONE_WORKER)
    assert (second["changed"], second["unchanged"], second["dead"]) == (1, 2, 1)
    best = Index.load(f"{root}/index").search(jpeg(variants["chelsea"]), top_k=1)[0]
    assert best.image_id == "rocket.jpg" and best.inliers > 50
