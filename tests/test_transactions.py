"""The transaction model: what is live in a features table, conditional writes, leases, table
commits, index publishes, pruning, pins, the bounded cache, takedowns and the migration.

Conditional writes and leases are proven on local disk and on S3 (moto honours
preconditions); on GCS the emulator ignores them, so for gs:// the tests check that the
precondition is sent (../shared/docs/storage-facts.md)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing.manifests import fetch_manifested
from delf_index.indexing.retrieval import Index
from delf_index.indexing.versions import (
    IndexChanged,
    commit_version,
    current_entry,
    current_version,
    list_versions,
    new_version_name,
    pin,
    place_version,
    prune,
    version_work_folder,
)
from delf_index.pipelines import build, compact, extract, migrate, remove
from delf_index.runtime import cache, lease, renewal, storage, tables
from delf_index.schemas import features as schema
from tests.conftest import ONE_WORKER, live_rows, put

STATUSES = schema.STATUSES


# -- what is live ----------------------------------------------------------------------------------
def reference(records):
    """The rules of schemas/features.py written out per image: {image_id: (features run, failed
    run, blocked)}."""
    out = {}
    for image_id in {r["image_id"] for r in records}:
        mine = [r for r in records if r["image_id"] == image_id]
        newest = {s: max((r["run"] for r in mine if r["status"] == s), default="") for s in STATUSES}
        ended = max(newest["deleted"], newest["removed"])
        blocked = newest["removed"] > newest["restored"]
        ext, fail = newest["extracted"], newest["failed"]
        features = ext if ext and ext > ended and not blocked else None
        failed = fail if fail and fail > max(ext, ended) and not blocked else None
        out[image_id] = (features, failed, blocked)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_resolve_follows_the_rules_on_random_histories(seed):
    """Random histories of records (several runs, every status, duplicates of a run's
    extracted and failed records) resolved by tables.resolve and by the rules written out."""
    rng = np.random.default_rng(seed)
    records = []
    for run in range(int(rng.integers(1, 12))):
        for image in rng.choice(8, size=int(rng.integers(1, 8)), replace=False):
            for status in rng.choice(STATUSES, size=int(rng.integers(1, 3)), replace=False):
                records.append({"image_id": f"i{image}", "status": str(status), "run": f"2026{run:04d}"})
    resolved = tables.resolve(
        pa.Table.from_pylist(records, pa.schema([(c, pa.string()) for c in ("image_id", "status", "run")]))
    )
    got = {r["image_id"]: (r["features"], r["failed"], r["blocked"]) for r in resolved.to_pylist()}
    assert got == reference(records)
    live = tables.live_records(pa.Table.from_pylist(records)).to_pylist()
    assert sorted(r["image_id"] for r in live) == sorted(i for i, v in got.items() if v[0])
    assert all(got[r["image_id"]][0] == r["run"] for r in live)


# -- conditional writes ---------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A folder on local disk or on S3 (moto), for the protocols that need real preconditions."""
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/{request.node.name.replace('[', '-').replace(']', '')}-{time.time_ns()}"


def test_write_if_creates_once_and_replaces_only_the_version_read(store):
    uri = f"{store}/object.json"
    assert storage.read_versioned(uri) == (None, None)
    token = storage.write_if(uri, b"first")
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(uri, b"second")  # create-only: it exists
    data, read = storage.read_versioned(uri)
    assert (data, read) == (b"first", token)
    newer = storage.write_if(uri, b"second", read)
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(uri, b"third", read)  # a stale token never overwrites
    assert storage.read_versioned(uri) == (b"second", newer)


def test_gcs_conditional_writes_send_their_preconditions(gcs_bucket, monkeypatch):
    """The GCS emulator ignores preconditions, so what counts here is the request: a create
    sends ifGenerationMatch=0, a replacement ifGenerationMatch=<the generation read>."""
    import gcsfs

    sent = []
    request = gcsfs.GCSFileSystem._request

    async def recording(self, method, path, *args, **kwargs):
        if method == "POST":
            sent.append({k: v for k, v in kwargs.items() if k in ("ifGenerationMatch", "uploadType")})
        return await request(self, method, path, *args, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_request", recording)
    uri = f"gs://{gcs_bucket}/conditional/{time.time_ns()}.json"
    storage.write_if(uri, b"first")
    _, token = storage.read_versioned(uri)
    storage.write_if(uri, b"second", token)
    assert sent == [
        {"ifGenerationMatch": "0", "uploadType": "multipart"},
        {"ifGenerationMatch": token, "uploadType": "media"},
    ]
    assert storage.read_versioned(uri)[0] == b"second"


# -- leases ---------------------------------------------------------------------------------------
def record(**fields):
    now = time.time()
    base = {"id": "other", "holder": "update --input elsewhere", "host": "another-host", "pid": 1, "since": now - 60,
            "expires": now + 60, "released": False}  # fmt: skip
    return json.dumps({**base, **fields}).encode()


def test_a_second_writer_is_told_who_holds_the_lease_and_waits_with_wait(store, monkeypatch):
    monkeypatch.setattr(lease, "POLL_SECONDS", 0.05)
    with lease.writing(store, "build --append"):
        failed = []

        def second():
            try:
                with lease.writing(store, "update"):
                    pass
            except lease.LeaseHeld as e:
                failed.append(str(e))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert failed and "`build --append` on " in failed[0] and "--wait" in failed[0]
        got = []
        waiter = threading.Thread(target=lambda: got.append(lease.writing(store, "update", wait=True).__enter__()))
        waiter.start()
        time.sleep(0.3)
        assert not got  # still waiting while the first holds it
    waiter.join(10)
    assert got and got[0].record["holder"] == "update"
    got[0].release()


def test_expired_and_orphaned_leases_are_taken_over_and_a_lost_one_refuses_to_commit(store):
    uri = f"{store}/_lease.json"
    storage.write_if(uri, record())
    with pytest.raises(lease.LeaseHeld, match="update --input elsewhere.* on another-host"):
        lease.Lease(store, "build").acquire()
    _, token = storage.read_versioned(uri)
    storage.write_if(uri, record(expires=time.time() - 1), token)  # its holder stopped renewing
    lease.Lease(store, "build").acquire().release()
    # a process of another container with this hostname, whose pid is free here: its lease is live
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _, token = storage.read_versioned(uri)
    storage.write_if(uri, record(host=socket.gethostname(), pid=int(dead.stdout), owner="ab" * 16), token)
    with pytest.raises(lease.LeaseHeld):
        lease.Lease(store, "build").acquire()
    _, token = storage.read_versioned(uri)
    storage.write_if(uri, record(released=True), token)
    # a process of this machine killed while it held the lease: taken over at once
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from delf_index.runtime import lease; lease.Lease({store!r}, 'update').acquire(); "
         "print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "DELF_INDEX_LEASE_SECONDS": "300"},
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lease.LeaseHeld, match="`update`"):
        lease.Lease(store, "build").acquire()  # alive: refused
    holder.kill()
    holder.wait()
    held = lease.Lease(store, "build").acquire()
    _, token = storage.read_versioned(uri)
    storage.write_if(uri, record(id="thief", expires=time.time() + 60), token)  # taken over meanwhile
    with pytest.raises(lease.LeaseLost, match="nothing was committed"):
        held.check()
    held.release()
    assert json.loads(storage.read_versioned(uri)[0])["id"] == "thief"  # a lost lease is not released by its loser


def test_a_renewal_calls_until_stopped_or_lost_and_rides_out_store_hiccups(tmp_path):
    calls = []

    def renew():
        calls.append(1)
        if len(calls) == 2:
            raise OSError("a store hiccup")  # skipped: the next call comes all the same
        return len(calls) < 5  # False: the claim is lost, nothing more to renew

    ended = renewal.Renewal(renew, 0.01, "test").start()
    deadline = time.time() + 30
    while ended._thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert len(calls) == 5 and not ended._thread.is_alive()
    with renewal.Renewal(lambda: calls.append(1), 0.01, "test"):
        while len(calls) < 8 and time.time() < deadline:
            time.sleep(0.01)
    stopped = len(calls)
    time.sleep(0.1)
    assert len(calls) == stopped >= 8  # no call once the block has ended
    # a lease is renewed while held, and learns by its renewal that another writer took it
    store = str(tmp_path / "store")
    held = lease.Lease(store, "build", ttl=0.2).acquire()
    first = json.loads(storage.read_versioned(f"{store}/_lease.json")[0])["expires"]
    while json.loads(storage.read_versioned(f"{store}/_lease.json")[0])["expires"] == first:
        assert time.time() < deadline
        time.sleep(0.01)
    while True:  # taken over (between two renewals: a renewal in between refuses the write)
        _, token = storage.read_versioned(f"{store}/_lease.json")
        with contextlib.suppress(storage.PreconditionFailed):
            storage.write_if(f"{store}/_lease.json", record(id="thief"), token)
            break
    while held.lost is None:
        assert time.time() < deadline
        time.sleep(0.01)
    assert held.lost["id"] == "thief"
    held.release()


# -- the features table ---------------------------------------------------------------------------
def test_commits_planned_on_the_same_version_the_second_is_refused(store, pictures, tmp_path):
    images = str(tmp_path / "images")
    put(images, pictures, ["astronaut.jpg", "coffee.jpg"])
    table = f"{store}/features"
    extract.run(images, table, beam_options=ONE_WORKER)
    snap = tables.snapshot(table)
    props = snap.raw_properties
    entries = []
    for n in range(2):
        row = schema.status_record(f"x{n}", "removed", note="test")
        entries.append(
            tables.write_records(table, f"part-test-{n}.parquet", [row], snap.records_schema, props, f"r{n}")
        )
    assert tables.commit(table, [entries[0]], props, snap, "r0", "remove") == snap.version + 1
    with pytest.raises(tables.TableChanged, match=f"planned on version {snap.version}: nothing was committed"):
        tables.commit(table, [entries[1]], props, snap, "r1", "remove")
    assert tables.snapshot(table).version == snap.version + 1


# -- the index: publishes, pruning, pins, readers --------------------------------------------------
def publish_copy(index, built_root, grace=0.0, keep=2):
    """A new version of `index`: a copy of a built version, published as build does."""
    base = current_entry(index)
    source = current_version(str(built_root / "index"))
    version = new_version_name(base)
    work = version_work_folder(index, version)
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as f, open(os.path.join(work, name), "wb") as g:
            g.write(f.read())
    place_version(work, index, version)
    return commit_version(index, version, base, keep, grace)


def test_publishes_never_collide_and_pruning_keeps_what_readers_need(built, tmp_path):
    index = str(tmp_path / "index")
    first = publish_copy(index, built)
    # two writers planned on the same version: the second publishes nothing, its folder goes
    base = current_entry(index)
    source = current_version(str(built / "index"))
    names = [new_version_name(base) for _ in range(2)]
    assert names[0] != names[1] and names[0][:7] == names[1][:7] == "v000002"
    for name in names:
        work = version_work_folder(index, name)
        for f in os.listdir(source):
            os.link(os.path.join(source, f), os.path.join(work, f))
        place_version(work, index, name)
    commit_version(index, names[0], base)
    with pytest.raises(IndexChanged, match="nothing was published"):
        commit_version(index, names[1], base)
    assert current_entry(index)["version"] == names[0] and names[1] not in list_versions(index)
    # an orphan (a build that died before publishing) stays while it is young, never counted as kept
    orphan = new_version_name(current_entry(index))
    os.makedirs(os.path.join(index, "versions", orphan))
    with open(os.path.join(index, "versions", orphan, "manifest.json"), "w") as f:
        f.write("{}")
    third = publish_copy(index, built, grace=3600.0, keep=1)
    assert set(list_versions(index)) == {first["version"], names[0], orphan, third["version"]}  # grace
    with pin(index, names[0], "a batch search"):
        publish_copy(index, built, grace=0.0, keep=1)
        assert names[0] in list_versions(index) and orphan not in list_versions(index)  # pinned; no grace
    fourth = publish_copy(index, built, grace=0.0, keep=1)
    assert list_versions(index) == [fourth["version"]]  # the current one is never pruned
    stale = new_version_name(fourth)  # an orphan older than the grace period goes
    os.makedirs(os.path.join(index, "versions", stale))
    old = time.time() - 7200
    os.utime(os.path.join(index, "versions", stale), (old, old))
    prune(index, keep=1, grace=600.0)
    assert list_versions(index) == [fourth["version"]]
    assert len(Index.load(index).artifact.row_of) == 8


def test_a_reader_whose_version_vanished_reads_the_log_again(built, tmp_path, monkeypatch):
    index = str(tmp_path / "index")
    publish_copy(index, built)
    fetch = fetch_manifested
    calls = []

    def publish_and_prune_meanwhile(uri, name, what):
        if not calls:  # the first fetch: a newer version is published and this one pruned
            calls.append(uri)
            publish_copy(index, built, grace=0.0, keep=1)
        return fetch(uri, name, what)

    monkeypatch.setattr(art, "fetch_manifested", publish_and_prune_meanwhile)
    loaded = art.Artifact.load(index)
    assert os.path.basename(loaded.folder) == current_entry(index)["version"] != os.path.basename(calls[0])


def test_the_cache_is_bounded_never_evicts_what_is_in_use_and_hashes_once(built, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("DELF_INDEX_CACHE", str(tmp_path / "cache"))
    index = f"s3://{s3_bucket}/cached-{time.time_ns()}"
    fs = storage.filesystem(index)[0]
    local = str(tmp_path / "local-index")
    first = publish_copy(local, built)
    fs.put(
        os.path.join(local, "versions", first["version"]), f"{index[5:]}/versions/{first['version']}", recursive=True
    )
    storage.write_if(f"{index}/_log/{1:020d}.json", json.dumps(first).encode())
    size = sum(
        os.path.getsize(os.path.join(local, "versions", first["version"], n))
        for n in os.listdir(os.path.join(local, "versions", first["version"]))
    )
    monkeypatch.setenv("DELF_INDEX_CACHE_SIZE", str(int(size * 1.5)))  # room for one version, not two
    hashed = []
    sha256_of = storage.sha256_of
    monkeypatch.setattr(storage, "sha256_of", lambda path, *a: hashed.append(path) or sha256_of(path, *a))
    reader = art.Artifact.load(index)  # fetched, each blob hashed once when it arrives
    assert len(hashed) == len(reader.manifest["files"])
    art.Artifact.load(index)  # from the cache: nothing hashed again
    assert len(hashed) == len(reader.manifest["files"])
    # a second version with other bytes: the cache passes its limit, but the first is in use
    second = dict(first, sequence=2, version=new_version_name(first))
    source = os.path.join(local, "versions", first["version"])
    for name in os.listdir(source):
        data = open(os.path.join(source, name), "rb").read()
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["version"] = second["version"]
            data = json.dumps(manifest).encode()
        fs.pipe(f"{index[5:]}/versions/{second['version']}/{name}", data)
    storage.write_if(f"{index}/_log/{2:020d}.json", json.dumps(second).encode())
    newer = art.Artifact.load(index)
    assert os.path.exists(reader.folder) and newer.folder != reader.folder  # held: not evicted
    del reader
    import gc

    gc.collect()
    third = art.Artifact.load(index)  # loading again evicts the least recently used unheld folder
    assert third.folder == newer.folder and not os.path.exists(
        os.path.join(tmp_path / "cache", "folders", os.path.basename(art.Artifact.load(local).folder))
    )
    assert cache._blob_bytes(str(tmp_path / "cache" / "blobs")) <= size * 1.5


# -- takedowns ------------------------------------------------------------------------------------
def test_a_takedown_stays_down_until_restored(built, pictures, tmp_path):
    images, table, index = (str(tmp_path / n) for n in ("images", "features", "index"))
    put(images, pictures, list(pictures))
    extract.run(images, table, beam_options=ONE_WORKER)
    build.run(table, index, codebooks=str(built / "codebooks"), beam_options=ONE_WORKER)
    taken = ["coffee.jpg", "rocket-mirror.jpg", "never-extracted.jpg"]
    with pytest.raises(UserError, match="1 of the 3 image_ids were never in .*: never-extracted.jpg"):
        build.run(table, index, append=True, remove=taken, beam_options=ONE_WORKER)
    build.run(table, index, append=True, remove=taken, beam_options=ONE_WORKER, allow_unknown=True)
    assert not set(taken) & set(Index.load(index).artifact.row_of)
    put(images, pictures, ["coffee.jpg"])  # still in the bucket, even rewritten: not extracted again
    again = extract.run(images, table, {"max_change": None}, beam_options=ONE_WORKER)
    assert (again["blocked"], again["extracted"]) == (2, 0)
    for rebuilt in (
        build.run(table, index, codebooks=index, beam_options=ONE_WORKER),  # a full build
        build.run(table, index, append=True, beam_options=ONE_WORKER),  # an append
    ):
        assert "coffee.jpg" not in Index.load(index).artifact.row_of and rebuilt["counts"]["images"] == 6
    compact.run(table, retention_hours=0)
    records = tables.snapshot(table).read(["image_id", "status"]).to_pylist()
    assert {(r["image_id"], r["status"]) for r in records if r["image_id"] in taken} == {(i, "removed") for i in taken}
    remove.run(table, ["coffee.jpg"], restore=True)
    back = extract.run(images, table, beam_options=ONE_WORKER)
    assert (back["new"], back["extracted"]) == (1, 1) and "coffee.jpg" in live_rows(table)
    assert "coffee.jpg" not in Index.load(index).artifact.row_of  # until the index is brought up to date
    build.run(table, index, append=True, beam_options=ONE_WORKER)
    served = Index.load(index).artifact.row_of
    assert "coffee.jpg" in served and "rocket-mirror.jpg" not in served


# -- the migration of earlier tables --------------------------------------------------------------
def write_legacy(folder, rows, errors, superseded):
    """An extract output as delf-index wrote it before table version 3."""
    meta = {
        b"delf_index.table": b"features",
        b"delf_index.schema_version": b"2",
        b"delf_index.model_fingerprint": b"f" * 64,
        b"delf_index.model": json.dumps({"descriptor_dim": 4}).encode(),
        b"delf_index.extractor": b"{}",
    }
    descriptors = pa.list_(pa.list_(pa.float16(), 4))
    features = pa.table(
        {
            "image_id": [r["image_id"] for r in rows],
            "uri": [r["image_id"] for r in rows],
            "label": [None] * len(rows),
            "width": pa.array([10] * len(rows), pa.int32()),
            "height": pa.array([10] * len(rows), pa.int32()),
            "num_features": pa.array([1] * len(rows), pa.int32()),
            "x": [[1.0]] * len(rows),
            "y": [[2.0]] * len(rows),
            "scale": [[1.0]] * len(rows),
            "attention": [[0.5]] * len(rows),
            "descriptors": pa.array([[np.full(4, i, np.float16)] for i in range(len(rows))], descriptors),
            "global_descriptor": pa.array([[0.0, 1.0]] * len(rows), pa.list_(pa.float32(), 2)),
            "run": [r["run"] for r in rows],
            "source_size": pa.array([1] * len(rows), pa.int64()),
            "source_version": ["v"] * len(rows),
        }
    )
    for name, table in (
        ("features", features),
        ("errors", pa.Table.from_pylist(errors)),
        ("superseded", pa.Table.from_pylist(superseded)),
    ):
        os.makedirs(os.path.join(folder, name))
        pq.write_table(
            table.replace_schema_metadata({**meta, b"delf_index.table": name.encode()}),
            os.path.join(folder, name, f"{name}-r-00000-of-00001.parquet"),
        )


def test_an_earlier_extract_output_migrates_in_one_command(tmp_path):
    old = str(tmp_path / "old")
    rows = [{"image_id": "a", "run": "20260101T000000000000Z"}, {"image_id": "b", "run": "20260101T000000000000Z"},
            {"image_id": "b", "run": "20260102T000000000000Z"}]  # fmt: skip
    errors = [{"image_id": "c", "uri": "c", "stage": "decode", "error": "bad", "run": "20260102T000000000000Z",
               "source_size": 1, "source_version": "v"}]  # fmt: skip
    superseded = [
        {"image_id": "b", "run": "20260101T000000000000Z", "by_run": "20260102T000000000000Z", "reason": "changed"}
    ]
    write_legacy(old, rows, errors, superseded)
    with pytest.raises(UserError, match="delf-index migrate --features"):
        tables.snapshot(old)
    counts = migrate.run(old)
    assert (counts["extracted"], counts["failed"]) == (2, 1)
    live = live_rows(old)
    assert {i: (r["status"], r["run"]) for i, r in live.items()} == {
        "a": ("extracted", "20260101T000000000000Z"),
        "b": ("extracted", "20260102T000000000000Z"),
        "c": ("failed", "20260102T000000000000Z"),
    }
    features = dict(tables.iter_features(old))
    np.testing.assert_array_equal(features["b"].descriptors, np.full((1, 4), 2, np.float32))
