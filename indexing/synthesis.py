"""Views of a query synthesized for far-apart viewpoints (ASIFT: Morel and Yu, 2009; in stages
of growing cost as MODS: Mishkin, Matas and Perdoch, 2015).

DELF's features come from an upright image pyramid: they tolerate scale and moderate
perspective, not a strong tilt or an in-plane rotation. A query whose best result verifies
weakly is therefore extracted again under simulated camera poses: a view is the image
rotated by `phi` degrees, blurred along x (sigma 0.8 sqrt(t^2 - 1), against aliasing) and
shrunk by 1/t along x, the tilt `t` = 1 / cos(latitude). Each view's keypoints map back into
the query's own pixel frame through the inverse of that affine map, so that search and
verification see one query; the database keeps its features.
"""

import math

import cv2
import numpy as np

from delf_index.runtime.features import Features

# Stages of growing cost, tried in order while the best verified result has fewer inliers than
# the index's `synthesis_min_inliers`: each names views as (tilt, phi in degrees).
STAGES = {
    # a phone held sideways, a photo upside down
    "rotations": [(1.0, 90.0), (1.0, 180.0), (1.0, 270.0)],
    # latitude 60 degrees; longitudes every 72 / t = 36 degrees below 180 (ASIFT's sampling)
    "tilt2": [(2.0, phi) for phi in (0.0, 36.0, 72.0, 108.0, 144.0)],
    # latitudes 69 and 75.5 degrees (tilts 2.8 and 4)
    "tilt4": [(2 * math.sqrt(2), phi) for phi in np.arange(0.0, 180.0, 72 / (2 * math.sqrt(2)))]
    + [(4.0, phi) for phi in np.arange(0.0, 180.0, 72 / 4.0)],
}


def view(image, tilt=1.0, phi=0.0):
    """(the view, A): `image` (uint8 RGB [H, W, 3]) rotated by `phi` degrees on a canvas that
    holds all of it, blurred along x and shrunk by 1/`tilt` along x; A (2 x 3) maps a pixel
    of the image (x, y; centres at integers) to the view's."""
    h, w = image.shape[:2]
    rotation = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), phi, 1.0)  # counter-clockwise
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64) @ rotation.T
    rotation[:, 2] -= corners.min(axis=0)
    size = np.ceil(corners.max(axis=0) - corners.min(axis=0)).astype(int) + 1
    out = image
    if phi % 360:
        out = cv2.warpAffine(image, rotation, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))  # fmt: skip
    if tilt > 1:
        sigma = 0.8 * math.sqrt(tilt * tilt - 1)
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=0.01)
        shrink = np.array([[1 / tilt, 0, 0.5 / tilt - 0.5], [0, 1, 0]])  # pixel centres: (x + 0.5) / t - 0.5
        width = max(1, int(round(out.shape[1] / tilt)))
        out = cv2.warpAffine(out, shrink, (width, out.shape[0]), flags=cv2.INTER_LINEAR)
    else:
        shrink = np.eye(3)[:2]
    affine = shrink @ np.vstack([rotation if phi % 360 else np.eye(3)[:2], [0, 0, 1]])
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


def union(base, extra):
    """`base` and the features of other views of the same image, as one query (the global
    descriptor stays `base`'s)."""
    parts = [base, *extra]
    return Features(
        x=np.concatenate([p.x for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        scale=np.concatenate([p.scale for p in parts]),
        attention=np.concatenate([p.attention for p in parts]),
        descriptors=np.concatenate([p.descriptors for p in parts if len(p)] or [base.descriptors]),
        global_descriptor=base.global_descriptor,
        width=base.width,
        height=base.height,
    )


def synthesized(extractor, image, views, features_per_view=None):
    """The features of `image` (uint8 RGB, as the extractor prepares queries) under `views`
    ([(tilt, phi)]), each mapped back into its pixels; at most `features_per_view` each."""
    h, w = image.shape[:2]
    out = []
    for tilt, phi in views:
        warped, affine = view(image, tilt, phi)
        found = extractor.extract_image(warped)
        if features_per_view is not None and len(found) > features_per_view:
            keep = np.argsort(-found.attention, kind="stable")[:features_per_view]
            found = Features(found.x[keep], found.y[keep], found.scale[keep], found.attention[keep],
                             found.descriptors[keep], found.global_descriptor, found.width, found.height)  # fmt: skip
        out.append(map_back(found, affine, w, h))
    return out
