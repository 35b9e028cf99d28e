"""Wrong input cannot change what an index serves (issue 33): an index bound to the table it
was built from, image_ids checked, unchanged bytes unchanged on local disk, takedowns
physically gone, and the smaller refusals; on copies of the `built` table and index."""

import json
import logging
import os
import shutil
import time

import pyarrow.parquet as pq
import pytest

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing.versions import current_manifest
from delf_index.pipelines import build, cli, compact, extract, match, remove, search, update
from delf_index.runtime import tables
from tests.conftest import ONE_WORKER, put

TAKEN = "coffee.jpg"


@pytest.fixture
def copies(built, tmp_path):
    """(images, features, index) copied from `built`: a table and an index this test may change."""
    paths = tuple(str(tmp_path / name) for name in ("images", "features", "index"))
    for name, path in zip(("images", "features", "index"), paths):
        shutil.copytree(built / name, path)
    return paths


def served(index):
    """{image_id: run} of what the current version of an index serves, and that version."""
    artifact = art.Artifact.load(index)
    return {i: artifact.runs[row] for i, row in artifact.row_of.items()}, artifact.manifest["version"]


def records_on_storage(table):
    """(image_id, status) of every record in every data file of a table's folder, referenced or not."""
    out = []
    for name in sorted(os.listdir(table)):
        if name.endswith(".parquet"):
            out += [(r["image_id"], r["status"]) for r in pq.read_table(os.path.join(table, name)).to_pylist()]
    return out


def test_an_index_follows_only_its_own_table(copies, built, tmp_path, pictures):
    """Item 1: a mistyped --features in the nightly update after a takedown; item 2: an append
    from another table or from a stale copy of its own; and the same refusals for remove
    --index, match and search, each before any work."""
    images, features, index = copies
    stale = str(tmp_path / "stale")
    shutil.copytree(features, stale)  # a copy of the table at the version the index names
    remove.main(["--features", features, "--ids", TAKEN, "--index", index, "--max-change", "1"])
    before = served(index)
    assert TAKEN not in before[0]
    typo = features + "-typo"
    with pytest.raises(UserError, match=f"no features table at {typo}, and {index} was built from"):
        update.run(images, typo, index, beam_options=ONE_WORKER)
    assert not os.path.exists(typo)  # nothing created, not even a lease
    other = str(tmp_path / "other")
    put(str(tmp_path / "other-images"), pictures, ["rocket.jpg", "chelsea.jpg"])
    extract.run(str(tmp_path / "other-images"), other, beam_options=ONE_WORKER)
    refusals = {
        "another features table": [
            lambda: update.run(images, other, index, beam_options=ONE_WORKER),
            lambda: build.run(other, index, append=True, beam_options=ONE_WORKER),
            lambda: remove.main(["--features", other, "--ids", "rocket.jpg", "--index", index]),
            lambda: match.run(index, str(tmp_path / "match"), features=other, beam_options=ONE_WORKER),
            lambda: search.run(other, index, str(tmp_path / "search"), {"exclude_self": True}, beam_options=ONE_WORKER),
        ],
        "older than the one": [  # the stale copy: version 1, the index names version 2
            lambda: update.run(images, stale, index, beam_options=ONE_WORKER),
            lambda: build.run(stale, index, append=True, beam_options=ONE_WORKER),
            lambda: match.run(index, str(tmp_path / "match"), features=stale, beam_options=ONE_WORKER),
            lambda: search.run(stale, index, str(tmp_path / "search"), beam_options=ONE_WORKER),
        ],
    }
    for message, calls in refusals.items():
        for call in calls:
            with pytest.raises(UserError, match=message):
                call()
    assert served(index) == before and tables.snapshot(other).version == 1
    assert current_manifest(index)["features"]["table_id"] == tables.snapshot(features).table_id
    assert [tables.snapshot(t).version for t in (features, stale)] == [2, 1]
    assert not os.path.exists(str(tmp_path / "match")) and not os.path.exists(str(tmp_path / "search"))
    # the table itself, moved: the same table id, a newer version; the index follows it
    moved = str(tmp_path / "moved")
    shutil.copytree(features, moved)
    assert update.run(images, moved, index, beam_options=ONE_WORKER)["index"] == "unchanged"


def test_ids_the_table_never_held_are_refused_before_anything_is_written(copies):
    """Item 3: a takedown id with a typo, in a list of 12 unknown ones."""
    _, features, index = copies
    version, before = tables.snapshot(features).version, served(index)
    with pytest.raises(UserError, match="1 of the 1 image_ids were never in .*: coffe.jpg; nothing was removed"):
        remove.main(["--features", features, "--ids", "coffe.jpg", "--index", index])
    unknown = ",".join([f"new-{n:02d}.jpg" for n in range(12)] + [TAKEN])
    with pytest.raises(UserError, match=r"12 of the 13 .*: new-00.jpg, .*new-09.jpg and 2 more; .*--allow-unknown"):
        remove.main(["--features", features, "--ids", unknown, "--max-change", "1"])
    with pytest.raises(UserError, match="never in"):
        remove.restore_main(["--features", features, "--ids", "coffe.jpg"])
    with pytest.raises(UserError, match="never in"):
        build.run(features, index, append=True, remove=["coffe.jpg"], beam_options=ONE_WORKER)
    assert tables.snapshot(features).version == version and served(index) == before
    # a takedown list ahead of the table: allowed by name
    remove.main(["--features", features, "--ids", "not-listed-yet.jpg", "--allow-unknown"])
    assert tables.snapshot(features).version == version + 1


def test_a_takedown_without_index_says_what_stays_served(copies, caplog, capsys):
    """Item 4, and a mistyped --index: refused before the takedown is recorded."""
    _, features, index = copies
    with pytest.raises(UserError, match=f"no index at {index}-typo"):
        remove.main(["--features", features, "--ids", TAKEN, "--index", index + "-typo", "--max-change", "1"])
    assert tables.snapshot(features).version == 1
    with caplog.at_level(logging.WARNING):
        remove.main(["--features", features, "--ids", TAKEN, "--max-change", "1"])
    assert "every index built from it serves them until its next `build --append` or `update`" in caplog.text
    assert TAKEN in served(index)[0]  # as the warning says


def test_identical_bytes_written_again_are_unchanged_on_local_disk(copies):
    """Item 5: a collection copied back without its mtimes (a restore from a backup, `cp`
    without -p): nothing is changed, the guard has nothing to refuse, and files are hashed
    only where size and mtime say they might differ."""
    images, features, index = copies
    quiet = extract.run(images, features, beam_options=ONE_WORKER)
    later = time.time() + 3600
    for name in os.listdir(images):
        path = os.path.join(images, name)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (later, later))
    restored = update.run(images, features, index, beam_options=ONE_WORKER)
    assert (restored["unchanged"], restored["changed"], restored["index"]) == (8, 0, "unchanged")
    with open(os.path.join(images, TAKEN), "ab") as f:
        f.write(b"\0")  # other bytes, this time
    changed = extract.run(images, features, {"max_change": None}, beam_options=ONE_WORKER)
    assert (changed["changed"], changed["unchanged"]) == (1, 7)
    # read for a hash: nothing while size and mtime are as recorded, then the 8 touched files,
    # then the 7 still touched (their records keep the mtime of their extraction)
    assert [quiet["hashed"], restored["hashed"], changed["hashed"]] == [0, 8, 7]


def test_a_takedown_leaves_no_record_of_the_image_on_storage(copies, monkeypatch):
    """Item 6: when `remove` ends, no data file in the table's folder holds a record of the
    image but its removal: not the current version's (rewritten), not an earlier version's,
    not a dead run's; and time travel to a version that held it says why it cannot."""
    images, features, _ = copies
    current = tables.snapshot(features).files[0]
    shutil.copy(current, os.path.join(features, "part-20200101T000000000000Z-00000-of-00001.parquet"))  # a dead run
    assert records_on_storage(features).count((TAKEN, "extracted")) == 2
    counts = remove.run(features, [TAKEN, "rocket.jpg"], note="request 1", max_change=None)
    others = [(i, "extracted") for i in sorted(os.listdir(images)) if i not in (TAKEN, "rocket.jpg")]
    assert sorted(records_on_storage(features)) == sorted(others + [(TAKEN, "removed"), ("rocket.jpg", "removed")])
    assert (counts["removed"], counts["files_rewritten"], counts["files_deleted"]) == (2, 1, 2)
    assert set(tables.live_records(tables.snapshot(features).read()).column("image_id").to_pylist()) == {
        i for i, _ in others
    }
    with pytest.raises(tables.FileGone, match=r"version 1 of .* no longer be read: .* gone \(deleted by a takedown"):
        tables.snapshot(features, 1).read()
    # killed between its commit and its deletions: out of every read already, gone once run again
    with monkeypatch.context() as patched:
        patched.setattr(tables, "purge", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            remove.run(features, ["chelsea.jpg"], max_change=None)
    assert ("chelsea.jpg", "extracted") in records_on_storage(features)
    again = remove.run(features, ["chelsea.jpg"], max_change=None)
    assert (again["removed"], again["unchanged"], again["files_deleted"]) == (0, 1, 1)
    assert ("chelsea.jpg", "extracted") not in records_on_storage(features)


def test_update_with_nothing_to_append_says_the_index_is_unchanged(copies, caplog):
    """Item 7: not "index appended" when build had nothing to append."""
    images, features, index = copies
    with caplog.at_level(logging.INFO, logger="delf_index"):
        counts = update.run(images, features, index, beam_options=ONE_WORKER)
    assert counts["index"] == "unchanged" and counts["version"] == served(index)[1]
    assert "index unchanged" in caplog.text


def test_a_version_vacuumed_by_compaction_is_named_as_such(copies):
    """Item 7: `build --table-version N` of a version whose files compaction vacuumed."""
    _, features, index = copies
    remove.run(features, [TAKEN], max_change=None)
    remove.run(features, [TAKEN], restore=True)  # the removal record is dead now
    compact.run(features, retention_hours=0)  # its file is rewritten, then vacuumed
    with pytest.raises(UserError, match="version 2 of .* can no longer be read: .*vacuumed by `delf-index compact`"):
        build.run(features, index, codebooks=index, table_version=2, beam_options=ONE_WORKER)


def test_a_mistyped_query_index_is_not_an_unfinished_build(copies, capsys):
    """Item 7: `query --index` with a path where nothing is."""
    images, _, index = copies
    assert cli.main(["query", "--index", index + "-typo", os.path.join(images, TAKEN)]) == 1
    assert f"no index at {index}-typo: check the path (--index)" in capsys.readouterr().err


def test_lease_files_record_the_process_token(copies):
    """A lease names its holder by a random token of its process, not by hostname and pid."""
    _, features, _ = copies
    from delf_index.runtime import lease

    with lease.writing(features, "test"):
        record = json.loads(open(os.path.join(features, "_lease.json")).read())
    assert record["owner"] == lease.process_token() and len(record["owner"]) == 32
