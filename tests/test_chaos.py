"""The transaction model under chaos: seeded random sequences of update, extract, append,
remove, restore, compact, queries and operations given wrong input, two at a time, writers
killed at random moments and at the named failpoints, the invariants checked after every
step (benchmarks/chaos.py, whose long runs are reported in benchmarks/README.md, with the
runs that catch fixed bugs switched back on)."""

import random

import pytest

from benchmarks import chaos


@pytest.fixture(scope="module")
def codebooks(tmp_path_factory):
    pytest.importorskip("skimage")
    return chaos.codebooks_for(str(tmp_path_factory.mktemp("chaos-codebooks")))


def test_chaos_on_local_disk(tmp_path, codebooks):
    """The tour: every operation kind once, alone, each one succeeding (wrong input refused)."""
    root = str(tmp_path)
    steps = 2 + len(chaos.tour(random.Random(0)))
    summary = chaos.run(f"{root}/images", f"{root}/features", f"{root}/index", codebooks, steps=steps, seed=3,
                        kill_rate=0.5, cache=f"{root}/cache", require_all=True)  # fmt: skip
    assert summary["steps"] == summary["checks"] == steps and summary["kills"] == 1  # the commit-window kill
    assert summary["self_queries"] >= steps - 2


def test_chaos_on_s3(s3_bucket, tmp_path, codebooks):
    root = f"s3://{s3_bucket}/chaos"
    summary = chaos.run(f"{root}/images", f"{root}/features", f"{root}/index", codebooks, steps=8, seed=5,
                        kill_rate=0.5, cache=str(tmp_path / "cache"))  # fmt: skip
    assert summary["steps"] == summary["checks"] == 8


def test_single_writer_crashes_on_gcs(gcs_bucket, tmp_path, codebooks):
    """Images and the index on the GCS emulator, one writer at a time (the emulator ignores
    preconditions, so overlapping writers would prove nothing there); the table on local disk."""
    root = f"gs://{gcs_bucket}/chaos"
    summary = chaos.run(f"{root}/images", str(tmp_path / "features"), f"{root}/index", codebooks, steps=8, seed=7,
                        single_writer=True, kill_rate=0.5, cache=str(tmp_path / "cache"))  # fmt: skip
    assert summary["steps"] == summary["checks"] == 8
