"""Views of a query synthesized for far-apart viewpoints (ASIFT: Morel and Yu, 2009; in stages
of growing cost as MODS: Mishkin, Matas and Perdoch, 2015).

DELF's features come from an upright image pyramid: they tolerate scale and moderate
perspective, not a strong tilt or an in-plane rotation. A query that verifies nothing, where
its ranking shows evidence of a match (`Index.wants_views`), is therefore extracted again
under simulated camera poses: a view is the image
rotated (a phone held sideways), or stretched by t along a direction with its content
upright, undoing the foreshortening of a camera turned away from the plane by the latitude
arccos(1 / t). Each view's keypoints map back into the query's own pixel frame through the
inverse of that affine map, so that a view's matches are verified and drawn in the query's
pixels; the database keeps its features.
"""

import math

import cv2
import numpy as np

from delf_index.runtime.features import Features

# Stages of growing cost, tried in order while the best verified result has fewer inliers than
# the index's `synthesis_min_inliers`: each names views as (tilt, phi in degrees): a rotation
# by phi when the tilt is 1, else a stretch by tilt along the direction phi.
STAGES = {
    # a phone held sideways, a photo upside down
    "rotations": [(1.0, 90.0), (1.0, 180.0), (1.0, 270.0)],
    # latitude 60 degrees; directions every 72 / t = 36 degrees below 180 (ASIFT's sampling)
    "tilt2": [(2.0, phi) for phi in (0.0, 36.0, 72.0, 108.0, 144.0)],
    # latitudes 69 and 75.5 degrees (tilts 2.8 and 4)
    "tilt4": [(2 * math.sqrt(2), phi) for phi in np.arange(0.0, 180.0, 72 / (2 * math.sqrt(2)))]
    + [(4.0, phi) for phi in np.arange(0.0, 180.0, 72 / 4.0)],
}


def view(image, tilt=1.0, phi=0.0, max_side=None):
    """(the view, A): `image` (uint8 RGB [H, W, 3]) rotated by `phi` degrees when `tilt` is 1,
    else stretched by `tilt` along the direction `phi` with its content kept upright (DELF's
    descriptors are not rotation invariant), on a canvas that holds all of it, at most
    `max_side` pixels on its larger side (for a query at the extractor's cap, a stretch is
    then a shrink across the direction). A (2 x 3) maps a pixel of the image (x, y; centres at
    integers) to the view's."""
    if tilt <= 1:
        return _warp(image, _rotation(phi), max_side) if phi % 360 else (image, np.eye(3)[:2])
    return _warp(image, _rotation(-phi) @ np.diag([tilt, 1.0, 1.0]) @ _rotation(phi), max_side)


def _rotation(phi):
    """3 x 3: a rotation by `phi` degrees counter-clockwise (as the image shows it) about the origin."""
    return np.vstack([cv2.getRotationMatrix2D((0.0, 0.0), phi, 1.0), [0, 0, 1]])


def _warp(image, matrix, max_side=None):
    """(image warped by the 3 x 3 `matrix`, shifted onto a canvas that holds all of it, then
    shrunk to at most `max_side` pixels on its larger side; the 2 x 3 map of its pixels).
    The shrink is a separate area-averaging resize: warpAffine samples bilinearly whatever
    its flag, which aliases below half size."""
    h, w = image.shape[:2]
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64) @ matrix[:2].T
    affine = matrix[:2].copy()
    affine[:, 2] -= corners.min(axis=0)
    size = np.maximum(np.round(corners.max(axis=0) - corners.min(axis=0)).astype(int) + 1, 1)
    out = cv2.warpAffine(image, affine, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))  # fmt: skip
    if max_side and size.max() > max_side:
        fit = np.maximum(np.round(size * max_side / size.max()).astype(int), 1)
        out = cv2.resize(out, (int(fit[0]), int(fit[1])), interpolation=cv2.INTER_AREA)
        # pixel centres at integers: x' = (x + 0.5) * scale - 0.5
        scale = fit / size
        affine = np.diag(scale) @ affine
        affine[:, 2] += 0.5 * scale - 0.5
    return np.ascontiguousarray(out), affine


def map_back(features, affine, width, height):
    """The features of a view in the pixels of the image the view was made of (A: `view`'s);
    keypoints that fall outside it (on the canvas's border) are dropped. Scales scale by the
    square root of the inverse map's determinant (the tilt's anisotropy is not kept)."""
    inverse = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
    xy = np.stack([features.x, features.y, np.ones(len(features))], axis=1) @ inverse.T
    inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= width - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= height - 0.5)
    stretch = math.sqrt(abs(np.linalg.det(inverse[:, :2])))
    return Features(
        x=xy[inside, 0].astype(np.float32),
        y=xy[inside, 1].astype(np.float32),
        scale=(features.scale[inside] * stretch).astype(np.float32),
        attention=features.attention[inside],
        descriptors=features.descriptors[inside],
        global_descriptor=features.global_descriptor,
        width=width,
        height=height,
    )


def synthesized(extractor, image, views):
    """The features of `image` (uint8 RGB, as the extractor prepares queries) under `views`
    ([(tilt, phi)]), each mapped back into its pixels: the views extracted in one call, so that
    pyramid levels of the same shape share forward passes where the extractor batches them
    (on accelerators; `max_batch`). `extractor` decides the levels and the features kept."""
    h, w = image.shape[:2]
    warped = [view(image, tilt, phi, extractor.conf["max_image_size"]) for tilt, phi in views]
    found = extractor.extract_batch([pixels for pixels, _ in warped])
    return [map_back(features, affine, w, h) for features, (_, affine) in zip(found, warped)]
