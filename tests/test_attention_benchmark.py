"""The attention benchmark's oracle: which cells count as verified, and how it reorders."""

import numpy as np

from benchmarks.attention import reorder, truncate, verified_cells
from delf_index.runtime.features import Features


def features(xy, descriptors, size=(640, 480)):
    n = len(xy)
    return Features(
        x=xy[:, 0].astype(np.float32),
        y=xy[:, 1].astype(np.float32),
        scale=np.ones(n, np.float32),
        attention=np.linspace(1, 0, n).astype(np.float32),
        descriptors=descriptors.astype(np.float32),
        global_descriptor=np.ones(4, np.float32) / 2,
        width=size[0],
        height=size[1],
    )


def test_verified_cells_marks_inliers_of_same_group_pairs_only():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(60, 16))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    xy = rng.uniform(20, 460, size=(60, 2))
    a = features(xy, d)
    # b: the same scene moved by a similarity; its last 20 cells are unrelated clutter
    angle = np.radians(10)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = xy @ rot.T * 0.9 + [30, 10]
    clutter = rng.normal(size=(20, 16))
    b = features(
        np.concatenate([moved[:40], rng.uniform(20, 460, (20, 2))]),
        np.concatenate([d[:40], clutter / np.linalg.norm(clutter, axis=1, keepdims=True)]),
    )
    marks = verified_cells([a, b, a], ["g", "g", None])
    assert marks[0][:40].all() and not marks[0][40:].any()
    assert marks[1][:40].all() and not marks[1][40:].any()
    assert not marks[2].any()  # identical to image 0, but without a group: never a positive
    # a different group: no pair is verified
    assert not any(m.any() for m in verified_cells([a, b], ["g", "h"]))


def test_reorder_puts_marked_cells_first_then_truncates():
    rng = np.random.default_rng(1)
    f = features(rng.uniform(0, 400, (10, 2)), np.eye(10, 16))
    mark = np.zeros(10, bool)
    mark[[7, 3]] = True
    best = truncate(reorder(f, np.argsort(~mark, kind="stable")), 3)
    assert len(best) == 3
    np.testing.assert_array_equal(best.descriptors, f.descriptors[[3, 7, 0]])  # marked (in order), then the best rest
    np.testing.assert_array_equal(best.x, f.x[[3, 7, 0]])
