"""Geometric verification: one-to-one correspondences and RANSAC affine (OpenCV).

As the official DELF matcher, the model is an affine transform fitted by RANSAC (residual
threshold 20 px, 1000 trials) and the score is its inlier count. Two departures, both
measured to matter: correspondences are one-to-one (mutual nearest neighbours, optionally
with a ratio test), because many-to-one matches let dozens of query points land on a few
database points and count as "inliers"; and degenerate models (collapsing or wildly
stretching the image) are rejected. OpenCV's RANSAC seeds its generator on every call, so
results are deterministic.
"""

import cv2
import numpy as np

default_conf = {
    "ransac_threshold": 20.0,  # residual in pixels of the image scaled to `reference_size`
    "reference_size": 1024,  # images are measured as if their largest side had this size
    "max_trials": 1000,  # RANSAC iterations (official: 1000)
    "confidence": 0.999,  # RANSAC stops early once this sure of the best model
    "min_inliers": 8,  # fewer inliers than this count as no match
    "max_scale_change": 8.0,  # reject models scaling area by more than this factor squared
    "max_anisotropy": 6.0,  # reject models whose singular values differ more than this
    "scale_tolerance": 2.0,  # inliers' feature-scale ratio must agree with the model's zoom within this factor
    "ratio": None,  # optional Lowe ratio test on top of mutual nearest neighbours
    "max_distance": None,  # optional bound on descriptor L2 distance (official: 0.8)
}


def mutual_matches(desc_a, desc_b, ratio=None, max_distance=None):
    """One-to-one matches [M, 2] between L2-normalised descriptors (mutual nearest neighbours)."""
    assert desc_a.ndim == 2 and desc_b.ndim == 2 and desc_a.shape[1] == desc_b.shape[1]
    if len(desc_a) == 0 or len(desc_b) == 0:
        return np.zeros((0, 2), np.int64)
    sim = desc_a.astype(np.float32) @ desc_b.astype(np.float32).T
    ab = sim.argmax(axis=1)
    ba = sim.argmax(axis=0)
    a = np.nonzero(ba[ab] == np.arange(len(desc_a)))[0]
    b = ab[a]
    keep = np.ones(len(a), bool)
    if max_distance is not None:
        # ||u - v||^2 = 2 - 2 u.v for unit vectors
        keep &= np.sqrt(np.maximum(2 - 2 * sim[a, b], 0)) <= max_distance
    if ratio is not None and sim.shape[1] > 1:
        top2 = -np.partition(-sim[a], 1, axis=1)[:, :2]
        d1 = np.sqrt(np.maximum(2 - 2 * top2[:, 0], 0))
        d2 = np.sqrt(np.maximum(2 - 2 * top2[:, 1], 0))
        keep &= d1 <= ratio * d2
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)


def ransac_affine(points_a, points_b, size_b, conf=None, scales_a=None, scales_b=None):
    """Affine model a -> b and its inlier mask; (None, all False) when none is credible.

    `points_*` are [M, 2] (x, y) pixel coordinates; `size_b` is (width, height) of image b,
    which sets the pixel threshold (see `reference_size`). With the features' scales, an
    inlier must also have a scale ratio that agrees with the model's zoom (DELF features
    carry their pyramid scale; a match of a small feature to a large one at the same spot
    is not evidence).
    """
    conf = {**default_conf, **(conf or {})}
    m = len(points_a)
    none = (None, np.zeros(m, bool))
    if m < max(3, conf["min_inliers"]):
        return none
    threshold = conf["ransac_threshold"] * max(size_b) / conf["reference_size"]
    model, mask = cv2.estimateAffine2D(
        points_a.astype(np.float32).reshape(-1, 1, 2),
        points_b.astype(np.float32).reshape(-1, 1, 2),
        method=cv2.RANSAC,
        ransacReprojThreshold=threshold,
        maxIters=conf["max_trials"],
        confidence=conf["confidence"],
        refineIters=0,
    )
    if model is None or mask is None:
        return none
    inliers = mask.ravel().astype(bool)
    if degenerate(model, conf):
        return none
    if scales_a is not None and scales_b is not None and conf["scale_tolerance"]:
        zoom = np.sqrt(abs(np.linalg.det(model[:, :2])))
        mismatch = np.log(np.asarray(scales_b, np.float64) / np.asarray(scales_a, np.float64)) - np.log(zoom)
        inliers &= np.abs(mismatch) < np.log(conf["scale_tolerance"])
    if inliers.sum() < conf["min_inliers"]:
        return none
    return model, inliers


def degenerate(model, conf=None):
    """True when the linear part of a 2x3 affine model collapses, flips or over-stretches."""
    conf = {**default_conf, **(conf or {})}
    s = np.linalg.svd(model[:, :2], compute_uv=False)
    if s[1] <= 1e-9 or np.linalg.det(model[:, :2]) <= 0:
        return True
    area = s[0] * s[1]
    limit = conf["max_scale_change"] ** 2
    return not (1 / limit <= area <= limit) or s[0] / s[1] > conf["max_anisotropy"]


def fit_shape(points_a, points_b):
    """(stretch, turn): how the least-squares affine map of matched points a -> b deforms the
    image: the ratio of its singular values (1: no stretch) and the angle in degrees of its
    closest rotation (its polar factor; counter-clockwise as the image shows it: negative)."""
    a = np.hstack([points_a, np.ones((len(points_a), 1))])
    model, *_ = np.linalg.lstsq(a, points_b, rcond=None)
    u, s, vt = np.linalg.svd(model[:2].T)
    rotation = u @ vt
    return float(s[0] / max(s[1], 1e-9)), float(np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0])))


def verify_pair(kp_a, desc_a, kp_b, desc_b, size_b, conf=None):
    """Inlier count, matches [M, 2] and inlier mask between two feature sets."""
    conf = {**default_conf, **(conf or {})}
    matches = mutual_matches(desc_a, desc_b, conf["ratio"], conf["max_distance"])
    if len(matches) == 0:
        return 0, matches, np.zeros(0, bool)
    _, inliers = ransac_affine(kp_a[matches[:, 0]], kp_b[matches[:, 1]], size_b, conf)
    return int(inliers.sum()), matches, inliers
