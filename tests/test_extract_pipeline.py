"""The Beam extraction job: inputs in three forms, bad images, tables, reruns, gs://."""

import io
import json
import os
import tarfile

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, is_not_empty
from PIL import Image

from delf_index.errors import UserError
from delf_index.pipelines import extract
from delf_index.runtime.extractor import Extractor
from delf_index.schemas.features import descriptors_of, read_table_metadata
from tests.conftest import ONE_WORKER, live_rows, rgb

GOOD = ("astronaut", "coffee", "chelsea", "rocket")


def jpeg_bytes(array, quality=92):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bad_images(photo):
    """What users' buckets contain besides photos, with the stage each must fail at."""
    good = jpeg_bytes(photo)
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
        (target / f"{name}.jpg").write_bytes(jpeg_bytes(photo))
    for name, (data, _) in bad_images(small_photos["coffee"]).items():
        (folder / name).write_bytes(data)
    (folder / "README.txt").write_text("not an input: directories take image extensions only")
    return folder


def expected_ids():
    good = {"astronaut.jpg", "sub/coffee.jpg", "chelsea.jpg", "sub/rocket.jpg"}
    bad = {"truncated.jpg": "decode", "empty.jpg": "decode", "notes.jpg": "decode", "tiny.png": "size"}
    return good, bad


def read_tables(output):
    features = pq.read_table(os.path.join(output, "features"))
    errors = pq.read_table(os.path.join(output, "errors"))
    return features, errors


def test_rows_with_test_pipeline(image_dir):
    """The transforms alone, with Beam's test harness asserting on the rows."""
    good, bad = expected_ids()

    def check_rows(rows):
        assert sorted(r["image_id"] for r in rows) == sorted(good)
        for r in rows:
            assert r["num_features"] == len(r["x"]) == len(r["descriptors"]) > 100
            assert 0 <= min(r["x"]) and max(r["x"]) < r["width"] and max(r["y"]) < r["height"]
            assert r["descriptors"].dtype == np.float16

    def check_errors(rows):
        assert {r["image_id"]: r["stage"] for r in rows} == bad
        assert all(r["error"] for r in rows)

    with BeamTestPipeline(runner="FnApiRunner") as p:
        rows, errors, _, _ = extract.build(p, str(image_dir), extract.resolve_conf())
        assert_that(rows, check_rows, label="CheckRows")
        assert_that(errors, check_errors, label="CheckErrors")
        assert_that(rows, is_not_empty(), label="NotEmpty")


def test_job_writes_tables_that_pandas_and_duckdb_read(image_dir, tmp_path, small_photos):
    out = str(tmp_path / "out")
    summary = extract.run(str(image_dir), out, beam_options=ONE_WORKER)
    features, errors = read_tables(out)
    good, bad = expected_ids()
    # every input exactly once, in one table or the other
    assert sorted(features.column("image_id").to_pylist()) == sorted(good)
    assert dict(zip(errors.column("image_id").to_pylist(), errors.column("stage").to_pylist())) == bad
    assert summary["images"] == 8 and summary["extracted"] == 4 and summary["failed"] == 4
    assert summary["features"] == sum(features.column("num_features").to_pylist())
    meta = read_table_metadata(features.schema)
    assert meta["model_fingerprint"] == Extractor().fingerprint and meta["table"] == "features"
    assert read_table_metadata(errors.schema)["model_fingerprint"] == meta["model_fingerprint"]
    # readers: pyarrow (flat numpy), pandas, DuckDB
    assert descriptors_of(features).shape == (summary["features"], meta["model"]["descriptor_dim"])
    frame = pd.read_parquet(os.path.join(out, "features"))
    assert frame.loc[frame.image_id == "astronaut.jpg", "width"].item() == small_photos["astronaut"].shape[1]
    con = duckdb.connect()
    n, dim = con.sql(
        f"select count(*), max(len(descriptors[1])) from '{out}/features/*.parquet' where num_features > 0"
    ).fetchall()[0]
    assert (n, dim) == (4, meta["model"]["descriptor_dim"])
    live = con.sql(
        f"SELECT count(*) FROM '{out}/features/*.parquet' f "
        f"ANTI JOIN '{out}/superseded/*.parquet' s ON f.image_id = s.image_id AND f.run = s.run"
    ).fetchall()[0][0]
    assert live == 4  # docs/tables.md's query of the live rows
    # features equal a bare extractor call on the same decoded image (float16 storage)
    row = frame[frame.image_id == "chelsea.jpg"].iloc[0]
    decoded = np.asarray(Image.open(image_dir / "chelsea.jpg").convert("RGB"))
    direct = Extractor()(decoded)
    np.testing.assert_array_equal(np.asarray(row["x"]), direct.x)
    np.testing.assert_allclose(np.stack(row["descriptors"]).astype(np.float32), direct.descriptors, atol=2e-3)
    with open(os.path.join(out, "_SUMMARY.json")) as f:
        assert json.load(f)["model_fingerprint"] == meta["model_fingerprint"]


def test_reruns_extract_only_what_is_new_changed_or_asked_for(image_dir, tmp_path, small_photos):
    out = str(tmp_path / "out")
    first = extract.run(str(image_dir), out, {"rows_per_shard": 1}, beam_options=ONE_WORKER)
    assert len(os.listdir(os.path.join(out, "features"))) == 4 and first["new"] == 8
    before = live_rows(out)
    # nothing changed: nothing extracted, no table written, the run still recorded
    again = extract.run(str(image_dir), out, beam_options=ONE_WORKER)
    assert (again["unchanged"], again["images"], again["superseded"]) == (8, 0, 0)
    assert len(os.listdir(os.path.join(out, "features"))) == 4 and len(os.listdir(os.path.join(out, "runs"))) == 2
    # another descriptor type cannot join these tables
    with pytest.raises(UserError, match="holds halffloat descriptors .*, this run writes float"):
        extract.run(str(image_dir), out, {"descriptor_dtype": "float32"}, beam_options=ONE_WORKER)
    # a day later: one new image, one rewritten with other content, one deleted
    (image_dir / "new.jpg").write_bytes(jpeg_bytes(small_photos["coffee"][::-1]))
    (image_dir / "chelsea.jpg").write_bytes(jpeg_bytes(small_photos["rocket"]))
    (image_dir / "sub" / "rocket.jpg").unlink()
    day = extract.run(str(image_dir), out, beam_options=ONE_WORKER)
    assert {k: day[k] for k in ("new", "changed", "removed", "unchanged", "extracted")} == {
        "new": 1,
        "changed": 1,
        "removed": 1,
        "unchanged": 6,
        "extracted": 2,
    }
    live = live_rows(out)
    assert set(live) == set(before) - {"sub/rocket.jpg"} | {"new.jpg"}
    assert live["chelsea.jpg"]["run"] == day["run"] != before["chelsea.jpg"]["run"]
    assert live["chelsea.jpg"]["x"] != before["chelsea.jpg"]["x"]  # the new content's features
    assert live["astronaut.jpg"] == before["astronaut.jpg"]  # untouched rows stay where they were
    # the failures again, on request
    retried = extract.run(str(image_dir), out, beam_options=ONE_WORKER, retry_errors=True)
    assert (retried["retried"], retried["failed"], retried["extracted"]) == (4, 4, 0)
    assert {i for i, r in live_rows(out).items() if r["table"] == "errors"} == {
        i for i, r in live.items() if r["table"] == "errors"
    }
    # everything again, on two worker processes: the same live features
    full = extract.run(str(image_dir), out, beam_options={"workers": 2}, full=True)
    assert (full["full"], full["recomputed"], full["images"], full["superseded"]) == (True, 8, 8, 8)
    again = live_rows(out)
    assert set(again) == set(live) and all(r["run"] == full["run"] for r in again.values())
    for image_id, row in again.items():
        if row["table"] == "features":
            assert row["x"] == live[image_id]["x"] and row["descriptors"] == live[image_id]["descriptors"], image_id


def test_a_failed_re_extraction_keeps_the_features_it_would_replace(image_dir, tmp_path):
    """A manifest pointing one folder off (every object missing) must not take the images'
    features out of the live tables; the run after the fix extracts them again."""
    names = ["astronaut.jpg", "chelsea.jpg", "sub/rocket.jpg"]
    good, wrong = tmp_path / "good.csv", tmp_path / "wrong.csv"
    good.write_text("id,uri\n" + "".join(f"{n},{image_dir / n}\n" for n in names))
    wrong.write_text("id,uri\n" + "".join(f"{n},{tmp_path / 'elsewhere' / n}\n" for n in names))
    out = str(tmp_path / "out")
    first = extract.run(str(good), out, beam_options=ONE_WORKER)
    assert first["extracted"] == 3
    before = live_rows(out)
    failed = extract.run(str(wrong), out, beam_options=ONE_WORKER)
    assert (failed["changed"], failed["failed"], failed["superseded"]) == (3, 3, 0)
    assert live_rows(out, ["features"]) == before  # still live, next to the new error rows
    assert set(live_rows(out, ["errors"])) == set(names)
    fixed = extract.run(str(good), out, beam_options=ONE_WORKER)
    assert (fixed["changed"], fixed["extracted"]) == (3, 3)  # the error rows' sources differ: tried again
    after = live_rows(out)  # one live row per image again: the new features
    assert set(after) == set(names)
    assert all(r["table"] == "features" and r["run"] == fixed["run"] for r in after.values())
    # a removed image's rows go, failed or not
    (tmp_path / "one.csv").write_text(f"id,uri\n{names[0]},{image_dir / names[0]}\n")
    removed = extract.run(str(tmp_path / "one.csv"), out, beam_options=ONE_WORKER)
    assert removed["removed"] == 2 and set(live_rows(out)) == {names[0]}
    # listed twice, one copy missing: the copy that extracts replaces the features (once)
    (tmp_path / "dup.csv").write_text(
        f"id,uri\n{names[0]},{image_dir / names[0]}\n{names[0]},{tmp_path / 'elsewhere' / names[0]}\n"
    )
    dup = extract.run(str(tmp_path / "dup.csv"), out, beam_options=ONE_WORKER)
    assert (dup["extracted"], dup["failed"]) == (1, 1)
    assert live_rows(out, ["features"])[names[0]]["run"] == dup["run"]  # live_rows: never twice


def test_large_images_are_shrunk_before_extraction_but_reported_in_original_pixels(tmp_path, photos):
    big = np.ascontiguousarray(np.tile(rgb(photos["astronaut"]), (3, 3, 1)))  # 1536 x 1536
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.jpg").write_bytes(jpeg_bytes(big))
    Image.fromarray(big).save(tmp_path / "in" / "big.png")
    out = str(tmp_path / "out")
    extract.run(str(tmp_path / "in"), out, {"extractor": {"max_image_size": 512}}, beam_options=ONE_WORKER)
    rows = {r["image_id"]: r for r in pq.read_table(os.path.join(out, "features")).to_pylist()}
    row = rows["big.jpg"]
    assert (row["width"], row["height"]) == (1536, 1536)
    assert max(row["x"]) > 1300 and max(row["y"]) > 1300
    assert min(row["scale"]) == pytest.approx(3.0 / 2.0, rel=1e-3)  # pyramid 2.0 on a 3x shrunk image
    # one decode path: a query given as a path, bytes or an array gets its table row's features
    extractor = Extractor(conf={"max_image_size": 512})
    path = tmp_path / "in" / "big.jpg"
    queries = {"path": str(path), "pathlib": path, "bytes": path.read_bytes(), "png array": big}
    for name, query in queries.items():
        expected = rows["big.png" if name == "png array" else "big.jpg"]
        features = extractor.extract_image(query)
        assert (features.width, features.height) == (1536, 1536), name
        np.testing.assert_array_equal(features.x, expected["x"], err_msg=name)
        np.testing.assert_array_equal(features.y, expected["y"], err_msg=name)
        np.testing.assert_allclose(features.descriptors, np.stack(expected["descriptors"]), atol=2e-3, err_msg=name)


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
        [("0/0/astronaut.jpg", jpeg_bytes(small_photos["astronaut"])), ("0/0/astronaut.json", b"{}")]
        + [(f"0/1/{name}", data) for name, (data, _) in bad.items()],
    )
    members = [(f"1/{n}.jpg", jpeg_bytes(small_photos[n])) for n in ("coffee", "rocket")]
    write_tar(shards / "images_001.tar", members)
    # a copy cut inside its second member: header, first member padded to 512, second header, 100 bytes
    cut = 512 + -(-len(members[0][1]) // 512) * 512 + 512 + 100
    (shards / "images_002.tar").write_bytes((shards / "images_001.tar").read_bytes()[:cut])
    out = str(tmp_path / "out")
    extract.run(str(shards / "images_*.tar"), out, beam_options=ONE_WORKER)
    features, errors = read_tables(out)
    ids = sorted(features.column("image_id").to_pylist())
    assert ids == ["0/0/astronaut.jpg", "1/coffee.jpg", "1/rocket.jpg"]  # 002's whole first member counts once
    failed = dict(zip(errors.column("image_id").to_pylist(), errors.column("stage").to_pylist()))
    assert {k: v for k, v in failed.items() if k.startswith("0/1/")} == {f"0/1/{n}": s for n, (_, s) in bad.items()}
    truncated = [k for k in failed if k.endswith("images_002.tar#rest")]
    assert len(truncated) == 1 and failed[truncated[0]] == "read"
    # the truncated shard's complete first member duplicated 1/coffee.jpg of shard 001: reported, kept once
    dup = errors.filter(pa_equal(errors, "error", "duplicate")).to_pylist()
    assert [d["image_id"] for d in dup] == ["1/coffee.jpg"]


def test_tar_shards_are_compared_whole_between_runs(tmp_path, small_photos):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "a.tar", [(f"a/{n}.jpg", jpeg_bytes(small_photos[n])) for n in ("astronaut", "coffee")])
    write_tar(shards / "b.tar", [("b/rocket.jpg", jpeg_bytes(small_photos["rocket"]))])
    out = str(tmp_path / "out")
    first = extract.run(str(shards / "*.tar"), out, beam_options=ONE_WORKER)
    assert (first["new"], first["extracted"]) == (2, 3)  # shards
    # shard a rewritten without coffee and with chelsea; shard b untouched
    write_tar(shards / "a.tar", [(f"a/{n}.jpg", jpeg_bytes(small_photos[n])) for n in ("astronaut", "chelsea")])
    second = extract.run(str(shards / "*.tar"), out, beam_options=ONE_WORKER)
    assert (second["changed"], second["unchanged"], second["extracted"], second["superseded"]) == (1, 1, 2, 2)
    live = live_rows(out)
    assert sorted(live) == ["a/astronaut.jpg", "a/chelsea.jpg", "b/rocket.jpg"]
    assert live["a/astronaut.jpg"]["run"] == second["run"] and live["b/rocket.jpg"]["run"] == first["run"]
    # shard a cut inside its second member (an interrupted upload): chelsea keeps its features
    first_member = jpeg_bytes(small_photos["astronaut"])
    cut = 512 + -(-len(first_member) // 512) * 512 + 512 + 100
    (shards / "a.tar").write_bytes((shards / "a.tar").read_bytes()[:cut])
    third = extract.run(str(shards / "*.tar"), out, beam_options=ONE_WORKER)
    assert (third["changed"], third["extracted"], third["failed"]) == (1, 1, 1)
    live = live_rows(out, ["features"])
    assert live["a/chelsea.jpg"]["run"] == second["run"] and live["a/astronaut.jpg"]["run"] == third["run"]


def pa_equal(table, column, text):
    import pyarrow.compute as pc

    return pc.match_substring(table.column(column), text)


def test_manifest_with_labels_and_missing_files(tmp_path, small_photos):
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    for name in ("astronaut", "coffee"):
        (folder / "img" / f"{name}.jpg").write_bytes(jpeg_bytes(small_photos[name]))
    (folder / "train.csv").write_text(
        "id,url,landmark_id\na1,img/astronaut.jpg,7\nc2,img/coffee.jpg,9\nm3,img/missing.jpg,9\n"
    )
    out = str(tmp_path / "out")
    extract.run(str(folder / "train.csv"), out, beam_options=ONE_WORKER)
    features, errors = read_tables(out)
    assert dict(zip(features.column("image_id").to_pylist(), features.column("label").to_pylist())) == {
        "a1": "7",
        "c2": "9",
    }
    assert errors.to_pylist()[0]["image_id"] == "m3" and errors.to_pylist()[0]["stage"] == "read"
    (folder / "bad.csv").write_text("name,where\nx,y\n")
    with pytest.raises(Exception, match="needs an 'id' column"):
        extract.run(str(folder / "bad.csv"), out, beam_options=ONE_WORKER)


def test_a_duplicate_image_id_is_reported_once_not_re_extracted_every_run(tmp_path, small_photos):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("astronaut", "coffee"):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(small_photos[name]))
    (folder / "m.csv").write_text("id,url\na1,astronaut.jpg\na1,coffee.jpg\n")
    out = str(tmp_path / "out")
    first = extract.run(str(folder / "m.csv"), out, beam_options=ONE_WORKER)
    _, errors = read_tables(out)
    assert (first["extracted"], errors.column("error").to_pylist()[0][:24]) == (1, "duplicate image_id, also")
    again = extract.run(str(folder / "m.csv"), out, beam_options=ONE_WORKER)
    assert (again["unchanged"], again["extracted"]) == (2, 0)


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
    features, errors = read_tables(out)
    assert summary["extracted"] == len(rows) == 8 and errors.num_rows == 0
    assert set(features.column("label").to_pylist()) == {"boat", "dsc_building"}
    assert min(features.column("num_features").to_pylist()) == 1000


def test_gcs_emulator_in_and_out(gcs_bucket, small_photos):
    import fsspec

    fs = fsspec.filesystem("gs")
    for name in ("astronaut", "rocket"):
        fs.pipe(f"{gcs_bucket}/in/{name}.jpg", jpeg_bytes(small_photos[name]))
    fs.pipe(f"{gcs_bucket}/in/broken.jpg", b"\xff\xd8\xff\xe0 truncated")
    summary = extract.run(f"gs://{gcs_bucket}/in/*.jpg", f"gs://{gcs_bucket}/out", beam_options=ONE_WORKER)
    assert (summary["extracted"], summary["failed"]) == (2, 1)
    (table_file,) = fs.glob(f"{gcs_bucket}/out/features/features-{summary['run']}-00000-of-00001.parquet")
    with fs.open(table_file, "rb") as f:
        table = pq.read_table(f)
    assert sorted(table.column("image_id").to_pylist()) == ["astronaut.jpg", "rocket.jpg"]
    assert fs.exists(f"{gcs_bucket}/out/_SUMMARY.json")
