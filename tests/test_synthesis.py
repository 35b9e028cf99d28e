"""View synthesis (indexing/synthesis.py): views map back exactly, and a rotated query that
verifies weakly finds its match again."""

import numpy as np
import pytest

from delf_index.indexing import synthesis
from delf_index.indexing.retrieval import Index
from delf_index.runtime.features import Features
from delf_index.runtime.images import read_image


def features_at(xy, width, height):
    n = len(xy)
    return Features(
        x=xy[:, 0].astype(np.float32),
        y=xy[:, 1].astype(np.float32),
        scale=np.ones(n, np.float32),
        attention=np.arange(n, dtype=np.float32),
        descriptors=np.zeros((n, 4), np.float32),
        global_descriptor=np.zeros(8, np.float32),
        width=width,
        height=height,
    )


def test_a_point_of_the_image_is_where_the_view_shows_it_and_maps_back():
    """Seeded: for random image sizes, tilts, directions and size caps, a bright dot at p in the
    image is centred at A p in the view, and a keypoint at A p maps back to p."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(60, 200, size=2)
        tilt = float(rng.choice([1.0, 2.0, 2 * np.sqrt(2), 4.0]))
        phi = float(rng.choice([0.0, 90.0, 180.0, 270.0, rng.uniform(0, 360)]))
        point = rng.uniform([15, 15], [w - 15, h - 15])
        yy, xx = np.mgrid[:h, :w]
        dot = np.exp(-((xx - point[0]) ** 2 + (yy - point[1]) ** 2) / (2 * 3.0**2))
        image = np.repeat((255 * dot).astype(np.uint8)[:, :, None], 3, axis=2)
        max_side = int(rng.choice([0, 150]))  # 0: no cap; the cap shrinks the canvas and A with it
        out, affine = synthesis.view(image, tilt, phi, max_side or None)
        assert max(out.shape[:2]) <= (max_side or np.inf)
        expected = affine @ np.array([*point, 1.0])
        # the dot's centre of brightness (a stretch makes it a flat-topped ridge: no single peak)
        weight = out[:, :, 0].astype(np.float64)
        centre = np.array([(weight * np.arange(out.shape[1])).sum(), (weight.T * np.arange(out.shape[0])).sum()])
        assert np.abs(centre / weight.sum() - expected).max() <= 0.75, (tilt, phi, max_side, expected)
        back = synthesis.map_back(features_at(expected[None], out.shape[1], out.shape[0]), affine, w, h)
        np.testing.assert_allclose([back.x[0], back.y[0]], point, atol=1e-3)
        assert (back.width, back.height) == (w, h)


def test_keypoints_outside_the_image_are_dropped_and_scales_follow_the_map():
    out, affine = synthesis.view(np.zeros((100, 200, 3), np.uint8), tilt=2.0, phi=45.0)
    corners = np.array([[out.shape[1] - 1, 0], [0, out.shape[0] - 1]], np.float64)  # canvas corners off the image
    inside = affine @ np.array([100.0, 50.0, 1.0])
    back = synthesis.map_back(features_at(np.vstack([corners, inside[None]]), *out.shape[1::-1]), affine, 200, 100)
    assert len(back) == 1
    np.testing.assert_allclose([back.x[0], back.y[0]], [100, 50], atol=1e-3)
    assert back.scale[0] == pytest.approx(np.sqrt(0.5), rel=1e-6)  # the inverse map halves one direction


def test_a_rotated_query_verifies_again_through_synthesized_views(evaluated, corpus):
    """coffee turned 90 and 180 degrees: the upright pyramid finds about a hundred inliers or
    fewer; under a threshold above that, the rotations stage's views find several times more
    with coffee.jpg, in the query's own frame. An upright query that verifies strongly
    synthesizes nothing at the default threshold."""
    index = Index.load(str(evaluated[0] / "index"), conf={"synthesis_stages": ["rotations"]})
    upright = read_image(str(corpus / "images" / "coffee.jpg"))
    timings = {}
    assert index.search(upright, top_k=1, timings=timings)[0].image_id == "coffee.jpg"
    assert timings["synthesis_views"] == 0
    # by default: rotations, from min_inliers (synthesis exactly where nothing verified)
    assert Index(index.artifact).conf["synthesis_stages"] == ["rotations"]
    assert Index(index.artifact, {"min_inliers": 30}).conf["synthesis_min_inliers"] == 30
    forced = Index(index.artifact, {"synthesis_stages": ["rotations"], "synthesis_min_inliers": 200})
    plain = Index(index.artifact, {"synthesis_stages": []})
    for turned in (np.rot90(upright), upright[::-1, ::-1]):
        turned = np.ascontiguousarray(turned)
        before = {r.image_id: r.inliers for r in plain.search(turned, top_k=3)}
        timings = {}
        after = forced.search(turned, top_k=3, timings=timings)
        assert timings["synthesis_wanted"] and timings["synthesis_views"] == 3 and timings["synthesis_s"] > 0
        best = after[0]
        assert before["coffee.jpg"] < 200 and best.image_id == "coffee.jpg" and best.inliers >= 3 * before["coffee.jpg"]
        h, w = turned.shape[:2]
        assert (best.query_xy >= -0.5).all() and (best.query_xy[:, 0] <= w).all() and (best.query_xy[:, 1] <= h).all()


def test_views_run_on_evidence_not_on_absence(evaluated, corpus):
    """With nothing counted as verified (synthesis_min_inliers 1000), a query wants views on
    evidence only: coffee turned 90 degrees, because its best fit turns (its promise, the
    fit's inliers plus a global similarity, above any similarity alone); upright coffee, whose
    fit does not turn, only when its global neighbour counts (synthesis_global); neither when
    both routes are shut. `synthesize` True runs views without evidence, False never."""
    artifact = Index.load(str(evaluated[0] / "index")).artifact
    upright = read_image(str(corpus / "images" / "coffee.jpg"))
    turned = np.ascontiguousarray(np.rot90(upright))
    unseen = {"synthesis_min_inliers": 1000, "synthesis_global": 2.0}  # no global neighbour is enough

    def views(query, synthesize=None, **conf):
        timings = {}
        Index(artifact, {**unseen, **conf}).search(query, top_k=3, timings=timings, synthesize=synthesize)
        return timings["synthesis_wanted"], timings["synthesis_promise"], timings["synthesis_views"]

    wanted, promise, count = views(turned)
    assert wanted and promise > 12 and count == 3
    assert views(turned, synthesis_turn=181.0)[::2] == (False, 0)
    assert views(turned, synthesize=False)[::2] == (True, 0)
    assert views(upright)[::2] == (False, 0)
    wanted, promise, count = views(upright, synthesis_global=-1.0)
    assert wanted and 0 < promise <= 1 and count == 3
    assert views(upright, synthesize=True)[::2] == (False, 3)


def test_views_are_extracted_in_one_call_at_the_views_levels(evaluated):
    """synthesized() hands every view of a stage to one extract_batch; the index's view
    extractor shares the query extractor's network, at synthesis_scales, keeping
    synthesis_features per view."""
    index = Index.load(str(evaluated[0] / "index"), conf={"synthesis_scales": [0.5, 1.0], "synthesis_features": 7})
    views = index.view_extractor
    assert views.engine is index.extractor.engine and views.conf["scales"] == (0.5, 1.0)
    assert views.conf["max_features"] == 7 and index.extractor.conf["max_features"] != 7
    calls = []

    class Recording:
        conf = views.conf

        def extract_batch(self, images):
            calls.append([image.shape for image in images])
            return views.extract_batch(images)

    image = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    found = synthesis.synthesized(Recording(), image, synthesis.STAGES["rotations"])
    assert calls == [[(160, 90, 3), (90, 160, 3), (160, 90, 3)]]
    assert len(found) == 3 and all(len(f) <= 7 and (f.width, f.height) == (160, 90) for f in found)
