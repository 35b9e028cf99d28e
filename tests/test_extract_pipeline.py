"""The Beam extraction job: inputs in three forms, bad images, the features table, reruns, gs://."""

import io
import json
import os
import tarfile

import duckdb
import numpy as np
import pyarrow.compute as pc
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from deltalake import DeltaTable
from PIL import Image

from delf_index.errors import UserError
from delf_index.pipelines import extract
from delf_index.runtime import tables
from delf_index.runtime.extractor import Extractor
from delf_index.schemas.features import descriptor_layout, descriptors_of
from tests.conftest import ONE_WORKER, jpeg, live_rows, rgb

GOOD = ("astronaut", "coffee", "chelsea", "rocket")
LIVE_ROWS_SQL = open(os.path.join(os.path.dirname(__file__), "..", "docs", "live_rows.sql")).read()


def bad_images(photo):
    """What users' buckets contain besides photos, with the stage each must fail at."""
    good = jpeg(photo, quality=92)
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, "PNG")
    return {
        "truncated.jpg": (good[: len(good) // 3], "decode"),
        "empty.jpg": (b"", "decode"),
        "notes.jpg": (b"this is a text file with an image name\n", "decode"),
        "tiny.png": (tiny.getvalue(), "size"),
    }


@pytest.fixture(scope="module")
def small_photos(photos):
    # half-size photos keep the suite fast; content stays real
    return {name: np.ascontiguousarray(rgb(photos[name])[::2, ::2]) for name in GOOD}


@pytest.fixture()
def image_dir(tmp_path, small_photos):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, (name, photo) in enumerate(small_photos.items()):
        target = folder / "sub" if i % 2 else folder
        (target / f"{name}.jpg").write_bytes(jpeg(photo, quality=92))
    for name, (data, _) in bad_images(small_photos["coffee"]).items():
        (folder / name).write_bytes(data)
    (folder / "README.txt").write_text("not an input: directories take image extensions only")
    return folder


GOOD_IDS = {"astronaut.jpg", "sub/coffee.jpg", "chelsea.jpg", "sub/rocket.jpg"}
BAD_IDS = {"truncated.jpg": "decode", "empty.jpg": "decode", "notes.jpg": "decode", "tiny.png": "size"}


def records(out, columns=None):
    """Every record of the table's current version (a pyarrow Table)."""
    return DeltaTable(out).to_pyarrow_table(columns=columns)


def test_job_on_a_test_pipeline_writes_one_commit(image_dir, tmp_path):
    """The job with Beam's test harness injected (run(..., test_pipeline=...))."""
    out = str(tmp_path / "out")
    summary = extract.run(str(image_dir), out, test_pipeline=BeamTestPipeline(runner="FnApiRunner"))
    table = records(out)
    extracted = table.filter(pc.equal(table.column("status"), "extracted")).to_pylist()
    assert sorted(r["image_id"] for r in extracted) == sorted(GOOD_IDS)
    dtype, dim = descriptor_layout(DeltaTable(out).schema().to_arrow())
    for r in extracted:
        assert r["num_features"] == len(r["x"]) == len(r["descriptors"]) // (dim * dtype.itemsize) > 100
        assert 0 <= min(r["x"]) and max(r["x"]) < r["width"] and max(r["y"]) < r["height"]
    failed = table.filter(pc.equal(table.column("status"), "failed")).to_pylist()
    assert {r["image_id"]: r["stage"] for r in failed} == BAD_IDS and all(r["error"] for r in failed)
    # one run, one commit: the table's version 0 is its creation, 1 the run
    assert summary["table_version"] == DeltaTable(out).version() == 1
    assert {r["run"] for r in table.to_pylist()} == {summary["run"]}


def test_the_table_reads_in_pandas_duckdb_and_polars(image_dir, tmp_path, small_photos):
    out = str(tmp_path / "out")
    summary = extract.run(str(image_dir), out, beam_options=ONE_WORKER)
    assert (summary["images"], summary["extracted"], summary["failed"]) == (8, 4, 4)
    snap = tables.snapshot(out)
    meta = snap.properties
    assert meta["model_fingerprint"] == Extractor().fingerprint and meta["descriptor_dtype"] == "float16"
    table = records(out)
    extracted = table.filter(pc.equal(table.column("status"), "extracted"))
    assert summary["features"] == pc.sum(extracted.column("num_features")).as_py()
    # descriptors: one flat numpy array in place, or per record
    assert descriptors_of(extracted).shape == (summary["features"], meta["model"]["descriptor_dim"])
    frame = table.to_pandas()
    row = frame[frame.image_id == "chelsea.jpg"].iloc[0]
    assert row["width"] == small_photos["chelsea"].shape[1]
    descriptors = np.frombuffer(row["descriptors"], np.float16).reshape(int(row["num_features"]), -1)
    # features equal a bare extractor call on the same decoded image (float16 storage)
    decoded = np.asarray(Image.open(image_dir / "chelsea.jpg").convert("RGB"))
    direct = Extractor()(decoded)
    np.testing.assert_array_equal(np.asarray(row["x"]), direct.x)
    np.testing.assert_allclose(descriptors.astype(np.float32), direct.descriptors, atol=2e-3)
    # DuckDB over the table's snapshot (delta_scan needs an extension download; docs/tables.md)
    dataset = DeltaTable(out).to_pyarrow_dataset()  # noqa: F841 - DuckDB finds it by name
    live = duckdb.sql(LIVE_ROWS_SQL.replace("delta_scan('OUT')", "dataset")).fetchall()
    assert sorted(r[0] for r in live) == sorted(GOOD_IDS)
    polars = pytest.importorskip("polars")
    assert polars.read_delta(out).height == 8
    with open(os.path.join(out, "_SUMMARY.json")) as f:
        assert json.load(f)["model_fingerprint"] == meta["model_fingerprint"]


def test_reruns_extract_only_what_is_new_changed_or_asked_for(image_dir, tmp_path, small_photos):
    out = str(tmp_path / "out")
    guard = {"max_change": None}
    first = extract.run(str(image_dir), out, {"rows_per_shard": 1}, beam_options=ONE_WORKER)
    assert first["new"] == 8 and len(tables.snapshot(out).files) > 2  # a file per shard that got records
    before = live_rows(out)
    # nothing changed: nothing extracted, nothing committed
    again = extract.run(str(image_dir), out, beam_options=ONE_WORKER)
    assert (again["unchanged"], again["images"], again["table_version"]) == (8, 0, first["table_version"])
    # another descriptor type cannot join this table
    with pytest.raises(UserError, match="holds float16 descriptors, this run writes float32"):
        extract.run(str(image_dir), out, {"descriptor_dtype": "float32"}, beam_options=ONE_WORKER)
    # a day later: one new image, one rewritten with other content, one deleted
    (image_dir / "new.jpg").write_bytes(jpeg(small_photos["coffee"][::-1], quality=92))
    (image_dir / "chelsea.jpg").write_bytes(jpeg(small_photos["rocket"], quality=92))
    (image_dir / "sub" / "rocket.jpg").unlink()
    day = extract.run(str(image_dir), out, guard, beam_options=ONE_WORKER)
    assert {k: day[k] for k in ("new", "changed", "deleted", "unchanged", "extracted")} == {
        "new": 1,
        "changed": 1,
        "deleted": 1,
        "unchanged": 6,
        "extracted": 2,
    }
    live = live_rows(out)
    assert set(live) == set(before) - {"sub/rocket.jpg"} | {"new.jpg"}
    assert live["chelsea.jpg"]["run"] == day["run"] != before["chelsea.jpg"]["run"]
    assert live["astronaut.jpg"] == before["astronaut.jpg"]  # untouched records stay as they were
    # the failures again, on request
    retried = extract.run(str(image_dir), out, beam_options=ONE_WORKER, retry_errors=True)
    assert (retried["retried"], retried["failed"], retried["extracted"]) == (4, 4, 0)
    assert {i for i, r in live_rows(out).items() if r["status"] == "failed"} == set(BAD_IDS)
    # everything again, on two worker processes: the same live features
    full = extract.run(str(image_dir), out, beam_options={"workers": 2}, full=True)
    assert (full["full"], full["recomputed"], full["images"]) == (True, 8, 8)
    again = live_rows(out)
    assert set(again) == set(live) and all(r["run"] == full["run"] for r in again.values())
    features = dict(tables.iter_features(out))
    assert sorted(features) == sorted(GOOD_IDS - {"sub/rocket.jpg"} | {"new.jpg"})


def test_a_wrong_listing_is_refused_before_any_work(image_dir, tmp_path):
    """One folder too high, or only part of the collection: the run stops, naming the counts
    and the flags; a partial listing goes through with --keep-unlisted."""
    out = str(tmp_path / "out")
    extract.run(str(image_dir / "sub"), out, beam_options=ONE_WORKER)  # ids coffee.jpg, rocket.jpg
    version = tables.snapshot(out).version
    with pytest.raises(
        UserError, match=r"would delete or replace 2 of the 2 live images .*--keep-unlisted.*--max-change"
    ):
        extract.run(str(image_dir), out, beam_options=ONE_WORKER)  # one folder too high: every id new
    assert tables.snapshot(out).version == version and live_rows(out).keys() == {"coffee.jpg", "rocket.jpg"}
    dry = extract.run(str(image_dir), out, {"max_change": None}, beam_options=ONE_WORKER, dry_run=True)
    assert (dry["new"], dry["deleted"], dry["to_extract"]) == (8, 2, 8) and tables.snapshot(out).version == version
    (tmp_path / "today").mkdir()
    (tmp_path / "today" / "coffee2.jpg").write_bytes((image_dir / "sub" / "coffee.jpg").read_bytes())
    partial = extract.run(str(tmp_path / "today"), out, beam_options=ONE_WORKER, keep_unlisted=True)
    assert (partial["new"], partial["deleted"]) == (1, 0)
    assert live_rows(out).keys() == {"coffee.jpg", "rocket.jpg", "coffee2.jpg"}


def test_a_failed_lookup_keeps_the_features_and_is_not_a_change(image_dir, tmp_path):
    """A manifest pointing one folder off (every object missing) must not take the images'
    features out of the table; the run after the fix has nothing to extract."""
    names = ["astronaut.jpg", "chelsea.jpg", "sub/rocket.jpg"]
    good, wrong = tmp_path / "good.csv", tmp_path / "wrong.csv"
    good.write_text("id,uri\n" + "".join(f"{n},{image_dir / n}\n" for n in names))
    wrong.write_text("id,uri\n" + "".join(f"{n},{tmp_path / 'elsewhere' / n}\n" for n in names))
    out = str(tmp_path / "out")
    first = extract.run(str(good), out, beam_options=ONE_WORKER)
    assert first["extracted"] == 3
    before = tables.live_records(tables.snapshot(out).read()).to_pylist()
    failed = extract.run(str(wrong), out, beam_options=ONE_WORKER)
    assert (failed["changed"], failed["failed"], failed["to_extract"]) == (0, 3, 0)
    assert tables.live_records(tables.snapshot(out).read()).to_pylist() == before  # still live
    fixed = extract.run(str(good), out, beam_options=ONE_WORKER)
    assert (fixed["unchanged"], fixed["extracted"]) == (3, 0)
    # listed twice, one copy missing: the first by uri is the image, the other a failure, once
    (tmp_path / "dup.csv").write_text(
        f"id,uri\n{names[0]},{image_dir / names[0]}\n{names[0]},{tmp_path / 'zz' / names[0]}\n"
    )
    dup = extract.run(str(tmp_path / "dup.csv"), out, {"max_change": None}, beam_options=ONE_WORKER)
    assert (dup["deleted"], dup["failed"]) == (2, 1) and set(live_rows(out)) == {names[0]}


def test_a_duplicate_image_id_is_reported_once_not_re_extracted_every_run(tmp_path, small_photos):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("astronaut", "coffee"):
        (folder / f"{name}.jpg").write_bytes(jpeg(small_photos[name], quality=92))
    (folder / "m.csv").write_text("id,url\na1,astronaut.jpg\na1,coffee.jpg\n")
    out = str(tmp_path / "out")
    first = extract.run(str(folder / "m.csv"), out, beam_options=ONE_WORKER)
    table = records(out).to_pylist()
    (failure,) = [r for r in table if r["status"] == "failed"]
    assert first["extracted"] == 1 and failure["error"].startswith("duplicate image_id, also read from")
    assert live_rows(out)["a1"]["status"] == "extracted"  # the failure of the same run does not hide it
    again = extract.run(str(folder / "m.csv"), out, beam_options=ONE_WORKER)
    assert (again["unchanged"], again["extracted"], again["records"]) == (1, 0, 0)


def test_large_images_are_shrunk_before_extraction_but_reported_in_original_pixels(tmp_path, photos):
    big = np.ascontiguousarray(np.tile(rgb(photos["astronaut"]), (3, 3, 1)))  # 1536 x 1536
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.jpg").write_bytes(jpeg(big, quality=92))
    Image.fromarray(big).save(tmp_path / "in" / "big.png")
    out = str(tmp_path / "out")
    extract.run(str(tmp_path / "in"), out, {"extractor": {"max_image_size": 512}}, beam_options=ONE_WORKER)
    stored = dict(tables.iter_features(out))
    features = stored["big.jpg"]
    assert (features.width, features.height) == (1536, 1536)
    assert features.x.max() > 1300 and features.y.max() > 1300
    assert features.scale.min() == pytest.approx(3.0 / 2.0, rel=1e-3)  # pyramid 2.0 on a 3x shrunk image
    # one decode path: a query given as a path, bytes or an array gets its table record's features
    extractor = Extractor(conf={"max_image_size": 512})
    path = tmp_path / "in" / "big.jpg"
    queries = {"path": str(path), "pathlib": path, "bytes": path.read_bytes(), "png array": big}
    for name, query in queries.items():
        expected = stored["big.png" if name == "png array" else "big.jpg"]
        got = extractor.extract_image(query)
        assert (got.width, got.height) == (1536, 1536), name
        np.testing.assert_array_equal(got.x, expected.x, err_msg=name)
        np.testing.assert_array_equal(got.y, expected.y, err_msg=name)
        np.testing.assert_allclose(got.descriptors, expected.descriptors, atol=2e-3, err_msg=name)


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_are_streamed_and_bad_members_reported(tmp_path, small_photos):
    shards = tmp_path / "shards"
    shards.mkdir()
    bad = bad_images(small_photos["coffee"])
    write_tar(
        shards / "images_000.tar",
        [("0/0/astronaut.jpg", jpeg(small_photos["astronaut"], quality=92)), ("0/0/astronaut.json", b"{}")]
        + [(f"0/1/{name}", data) for name, (data, _) in bad.items()],
    )
    members = [(f"1/{n}.jpg", jpeg(small_photos[n], quality=92)) for n in ("coffee", "rocket")]
    write_tar(shards / "images_001.tar", members)
    # a copy cut inside its second member: header, first member padded to 512, second header, 100 bytes
    cut = 512 + -(-len(members[0][1]) // 512) * 512 + 512 + 100
    (shards / "images_002.tar").write_bytes((shards / "images_001.tar").read_bytes()[:cut])
    out = str(tmp_path / "out")
    extract.run(str(shards / "images_*.tar"), out, beam_options=ONE_WORKER)
    table = records(out).to_pylist()
    ids = sorted(r["image_id"] for r in table if r["status"] == "extracted")
    assert ids == ["0/0/astronaut.jpg", "1/coffee.jpg", "1/rocket.jpg"]  # 002's whole first member counts once
    failed = {r["image_id"]: r for r in table if r["status"] == "failed"}
    assert {k: r["stage"] for k, r in failed.items() if k.startswith("0/1/")} == {
        f"0/1/{n}": s for n, (_, s) in bad.items()
    }
    truncated = [k for k in failed if k.endswith("images_002.tar#rest")]
    assert len(truncated) == 1 and failed[truncated[0]]["stage"] == "read"
    # the truncated shard's complete first member duplicated 1/coffee.jpg of shard 001: reported, kept once
    assert [k for k, r in failed.items() if "duplicate" in r["error"]] == ["1/coffee.jpg"]


def test_tar_shards_are_compared_whole_between_runs(tmp_path, small_photos):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "a.tar", [(f"a/{n}.jpg", jpeg(small_photos[n], quality=92)) for n in ("astronaut", "coffee")])
    write_tar(shards / "b.tar", [("b/rocket.jpg", jpeg(small_photos["rocket"], quality=92))])
    out = str(tmp_path / "out")
    first = extract.run(str(shards / "*.tar"), out, beam_options=ONE_WORKER)
    assert (first["new"], first["extracted"]) == (2, 3)  # shards
    # shard a rewritten without coffee and with chelsea; shard b untouched
    write_tar(shards / "a.tar", [(f"a/{n}.jpg", jpeg(small_photos[n], quality=92)) for n in ("astronaut", "chelsea")])
    second = extract.run(str(shards / "*.tar"), out, {"max_change": None}, beam_options=ONE_WORKER)
    assert (second["changed"], second["unchanged"], second["extracted"], second["deleted"]) == (1, 1, 2, 1)
    live = live_rows(out)
    assert sorted(live) == ["a/astronaut.jpg", "a/chelsea.jpg", "b/rocket.jpg"]
    assert live["a/astronaut.jpg"]["run"] == second["run"] and live["b/rocket.jpg"]["run"] == first["run"]
    # shard a cut inside its second member (an interrupted upload): chelsea keeps its features
    first_member = jpeg(small_photos["astronaut"], quality=92)
    cut = 512 + -(-len(first_member) // 512) * 512 + 512 + 100
    (shards / "a.tar").write_bytes((shards / "a.tar").read_bytes()[:cut])
    third = extract.run(str(shards / "*.tar"), out, {"max_change": None}, beam_options=ONE_WORKER)
    assert (third["changed"], third["extracted"], third["failed"], third["deleted"]) == (1, 1, 1, 0)
    live = live_rows(out)
    assert live["a/chelsea.jpg"]["run"] == second["run"] and live["a/astronaut.jpg"]["run"] == third["run"]


def test_manifest_with_labels_and_missing_files(tmp_path, small_photos):
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    for name in ("astronaut", "coffee"):
        (folder / "img" / f"{name}.jpg").write_bytes(jpeg(small_photos[name], quality=92))
    (folder / "train.csv").write_text(
        "id,url,landmark_id\na1,img/astronaut.jpg,7\nc2,img/coffee.jpg,9\nm3,img/missing.jpg,9\n"
    )
    out = str(tmp_path / "out")
    extract.run(str(folder / "train.csv"), out, beam_options=ONE_WORKER)
    live = live_rows(out)
    assert {i: r["label"] for i, r in live.items() if r["status"] == "extracted"} == {"a1": "7", "c2": "9"}
    assert (live["m3"]["status"], live["m3"]["stage"]) == ("failed", "read")
    (folder / "bad.csv").write_text("name,where\nx,y\n")
    with pytest.raises(Exception, match="needs an 'id' column"):
        extract.run(str(folder / "bad.csv"), out, beam_options=ONE_WORKER)


def test_landmarks_dev_subset(landmarks_dir, tmp_path):
    import csv

    with open(os.path.join(landmarks_dir, "groups.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["group"] in ("boat", "dsc_building")]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "uri", "label"])
        for r in rows:
            writer.writerow([r["image"], os.path.join(landmarks_dir, "images", r["image"]), r["group"]])
    out = str(tmp_path / "out")
    summary = extract.run(str(manifest), out, beam_options=ONE_WORKER)
    live = live_rows(out)
    assert summary["extracted"] == len(rows) == 8 and summary["failed"] == 0
    assert {r["label"] for r in live.values()} == {"boat", "dsc_building"}
    assert min(r["num_features"] for r in live.values()) == 1000


def test_images_on_gcs_the_same_bytes_again_are_unchanged(gcs_bucket, small_photos, tmp_path):
    """Images read from gs:// (the GCS emulator); an upload of identical bytes (a new
    generation, the same md5) is unchanged, other bytes are a change. The table itself lives
    on local disk here: delta-rs cannot talk to the emulator (docs/tables.md)."""
    import fsspec

    fs = fsspec.filesystem("gs")
    for name in ("astronaut", "rocket"):
        fs.pipe(f"{gcs_bucket}/in/{name}.jpg", jpeg(small_photos[name], quality=92))
    fs.pipe(f"{gcs_bucket}/in/broken.jpg", b"\xff\xd8\xff\xe0 truncated")
    out = str(tmp_path / "out")
    summary = extract.run(f"gs://{gcs_bucket}/in/*.jpg", out, beam_options=ONE_WORKER)
    assert (summary["extracted"], summary["failed"]) == (2, 1)
    live = live_rows(out)
    assert live["astronaut.jpg"]["source_hash"].startswith("md5:") and live["astronaut.jpg"]["source_version"]
    generation = fs.info(f"{gcs_bucket}/in/astronaut.jpg")["generation"]
    fs.pipe(f"{gcs_bucket}/in/astronaut.jpg", jpeg(small_photos["astronaut"], quality=92))  # the same bytes again
    fs.pipe(f"{gcs_bucket}/in/rocket.jpg", jpeg(small_photos["coffee"], quality=92))  # other bytes
    assert fs.info(f"{gcs_bucket}/in/astronaut.jpg")["generation"] != generation
    again = extract.run(f"gs://{gcs_bucket}/in/*.jpg", out, {"max_change": None}, beam_options=ONE_WORKER)
    assert (again["unchanged"], again["changed"], again["extracted"]) == (2, 1, 1)


def test_a_table_made_before_a_setting_existed_is_extracted_into_as_before(image_dir, tmp_path):
    """A table whose recorded settings lack one added since (`selection`, issue 32) was made
    with that setting's earlier value: the next run adds to it, and an index built from it
    appends, instead of refusing 'other extraction settings'."""
    out = str(tmp_path / "out")
    extract.run(str(image_dir), out, beam_options=ONE_WORKER)
    log = tmp_path / "out" / "_delta_log" / "00000000000000000000.json"
    actions = [json.loads(line) for line in log.read_text().splitlines()]
    for action in actions:  # the table as an earlier delf-index wrote it
        if "metaData" in action:
            conf = action["metaData"]["configuration"]
            settings = json.loads(conf["delf_index.extractor"])
            assert settings.pop("selection") == "score"
            conf["delf_index.extractor"] = json.dumps(settings)
    log.write_text("\n".join(json.dumps(a) for a in actions) + "\n")
    assert "selection" not in json.loads(DeltaTable(out).metadata().configuration["delf_index.extractor"])
    (image_dir / "sub" / "astronaut2.jpg").write_bytes((image_dir / "astronaut.jpg").read_bytes()[:-1] + b"\xd9")
    summary = extract.run(str(image_dir), out, beam_options=ONE_WORKER)
    assert summary["new"] == 1 and tables.snapshot(out).properties["extractor"]["selection"] == "score"
