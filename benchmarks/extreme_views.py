"""An extreme-viewpoint evaluation set anyone can rebuild from landmarks-dev: photos seen under
a strong camera tilt and an in-plane rotation, searched against the landmarks-dev index.

    delf-index evaluate --images ../shared/data/landmarks-dev/images \\
        --groups ../shared/data/landmarks-dev/groups.csv --workdir /tmp/lm --seed 0
    python -m benchmarks.extreme_views --workdir /tmp/lm --out /tmp/extreme
    python -m benchmarks.extreme_views --workdir /tmp/lm --out /tmp/extreme --stages rotations tilt2

For `--per-group` photos of each landmarks-dev group, one query per (tilt angle, rotation): the
photo warped by the homography of seeing it turned by the tilt angle about its vertical axis
(a plane one focal length away, the focal length its larger side) and rolled by the
rotation, cropped to the warped photo. A query's positives are its group's images (its own source among them:
the index holds the original). The queries are written to `--out` (nothing is committed) and
are not indexed. Prints mAP per tilt and rotation without view synthesis and with the
`--stages` of indexing/synthesis.py, and what synthesis cost per query (views extracted,
seconds), as JSON lines.

Figures: benchmarks/README.md, "View synthesis and fused local rankings (issue 28)" and
"View synthesis where it pays (issue 35)".
"""

import argparse
import csv
import json
import math
import os
import time

import cv2
import numpy as np

from benchmarks.landmarks import LANDMARKS
from delf_index.indexing import metrics
from delf_index.indexing.retrieval import Index
from delf_index.runtime.images import read_image

TILTS = (0, 45, 60, 70, 78)  # degrees of camera rotation about the vertical axis
ROTATIONS = (0, 90)  # degrees of in-plane roll


def homography(width, height, tilt, rotation):
    """The homography of seeing the photo, a plane facing the camera, turned by `tilt` degrees
    about its vertical axis (focal length the photo's larger side: the photo fills the view at
    a distance of one focal length), then rolled by `rotation` degrees. In normalised
    coordinates x' = x cos(t) / (1 + x sin(t)): the ASIFT tilt of its centre is 1 / cos(t)."""
    f = max(width, height)
    k = np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]])
    t, r = math.radians(tilt), math.radians(rotation)
    turn = np.array([[math.cos(t), 0, 0], [0, 1, 0], [math.sin(t), 0, 1]])
    roll = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return k @ roll @ turn @ np.linalg.inv(k)


def warp(image, tilt, rotation):
    """`image` as the turned and rolled camera sees it, cropped to the warped photo."""
    h, w = image.shape[:2]
    matrix = homography(w, h, tilt, rotation)
    corners = cv2.perspectiveTransform(np.float32([[[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]]), matrix)[0]
    shift = np.array([[1, 0, -corners[:, 0].min()], [0, 1, -corners[:, 1].min()], [0, 0, 1]])
    size = np.ceil(corners.max(axis=0) - corners.min(axis=0)).astype(int) + 1
    scale = min(1.0, 1024 / max(size))  # a photo of ordinary size, as a phone would save it
    fit = np.diag([scale, scale, 1.0])
    out = (max(16, int(size[0] * scale)), max(16, int(size[1] * scale)))
    return cv2.warpPerspective(image, fit @ shift @ matrix, out, flags=cv2.INTER_AREA, borderValue=(0, 0, 0))


def build_queries(out, per_group, seed=0):
    """Write the queries; returns [{"id", "uri", "tilt", "rotation", "positives"}]."""
    with open(os.path.join(LANDMARKS, "groups.csv")) as f:
        rows = [(r["image"], r["group"]) for r in csv.DictReader(f)]
    groups = {}
    for name, group in rows:
        if group:
            groups.setdefault(group, []).append(name)
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    queries = []
    for _, names in sorted(groups.items()):
        for name in sorted(rng.choice(sorted(names), min(per_group, len(names)), replace=False)):
            image = read_image(os.path.join(LANDMARKS, "images", name))
            for tilt in TILTS:
                for rotation in ROTATIONS:
                    path = os.path.join(out, f"{os.path.splitext(name)[0]}-t{tilt}-r{rotation}.jpg")
                    if not os.path.exists(path):
                        cv2.imwrite(path, cv2.cvtColor(warp(image, tilt, rotation), cv2.COLOR_RGB2BGR))
                    queries.append({"id": os.path.basename(path), "uri": path, "tilt": tilt, "rotation": rotation,
                                    "positives": names})  # fmt: skip
    return queries


def run(index, queries, stages):
    """Per query: AP and the synthesis cost, with the given synthesis stages."""
    index.conf["synthesis_stages"] = list(stages)
    rows = []
    for query in queries:
        timings = {}
        start = time.perf_counter()
        results = index.search(query["uri"], top_k=None, with_matches=False, timings=timings)
        seconds = time.perf_counter() - start
        ranking = [r.image_id for r in results]
        ap = metrics.query_metrics(ranking, query["positives"])["ap"]
        top = results[0].inliers if results else 0
        rows.append({**{k: query[k] for k in ("id", "tilt", "rotation")}, "ap": ap, "seconds": seconds,
                     "views": timings.get("synthesis_views", 0), "top_inliers": top})  # fmt: skip
    return rows


def summary(rows):
    """mAP per (tilt, rotation), and over all."""
    out = {}
    for tilt in TILTS:
        for rotation in ROTATIONS:
            chosen = [r for r in rows if r["tilt"] == tilt and r["rotation"] == rotation]
            out[f"tilt {tilt}, rotation {rotation}"] = round(float(np.mean([r["ap"] for r in chosen])), 3)
    out["all"] = round(float(np.mean([r["ap"] for r in rows])), 3)
    out["seconds_per_query"] = round(float(np.mean([r["seconds"] for r in rows])), 3)
    out["views_per_query"] = round(float(np.mean([r["views"] for r in rows])), 2)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a landmarks-dev workdir of `delf-index evaluate`")
    parser.add_argument("--out", required=True, help="where the queries are written")
    parser.add_argument("--per-group", type=int, default=2, help="source photos per group")
    parser.add_argument("--stages", nargs="*", default=["rotations", "tilt2", "tilt4"])
    parser.add_argument("--min-inliers", type=int, help="synthesis_min_inliers (default: the index's)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(LANDMARKS, "groups.csv")):
        raise SystemExit(f"needs landmarks-dev at {LANDMARKS}")
    queries = build_queries(args.out, args.per_group)
    index = Index.load(os.path.join(args.workdir, "index"))
    if args.min_inliers is not None:
        index.conf["synthesis_min_inliers"] = args.min_inliers
    for label, stages in (("plain", []), ("synthesis", args.stages)):
        rows = run(index, queries, stages)
        with open(os.path.join(args.out, f"rows-{label}.json"), "w") as f:
            json.dump(rows, f)
        print(json.dumps({"ranking": label, "stages": stages, "queries": len(rows), **summary(rows)}), flush=True)


if __name__ == "__main__":
    main()
