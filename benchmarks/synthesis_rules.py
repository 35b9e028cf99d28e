"""Choosing the view-synthesis rule offline: which stages, from how many inliers.

    python -m benchmarks.synthesis_rules --workdir /tmp/lm --set landmarks --records /tmp/rules-lm.json
    python -m benchmarks.synthesis_rules --workdir /tmp/lm --set extreme --out /tmp/extreme \\
        --records /tmp/rules-extreme.json

For every query (landmarks-dev's leave-one-out queries from the workdir's tables, or the
extreme-viewpoint set of benchmarks/extreme_views.py), the plain ranking's fused scores and
inliers (no expansion, no synthesis), and where it verified under `--below` inliers, every
view of every stage of indexing/synthesis.py ranked and verified on its own (as
`Index._synthesize` does) with the rows it verifies: each view is extracted once. Each rule
(stages in order, a threshold that both starts synthesis and accepts a view's result) is then
replayed on those records and printed with its mAP (per tilt and rotation on the extreme set)
and views per query, as JSON lines. `--records` keeps the records; given again, it replays
them without extracting.
"""

import argparse
import csv
import dataclasses
import json
import os

import numpy as np

from benchmarks import extreme_views
from benchmarks.landmarks import LANDMARKS
from delf_index.indexing import metrics, synthesis
from delf_index.indexing.retrieval import PLAIN, Index, verified_first
from delf_index.runtime.tables import iter_features

ORDERS = [["rotations"], ["tilt2"], ["tilt4"], ["rotations", "tilt2"], ["tilt2", "rotations"],
          ["rotations", "tilt4"], ["rotations", "tilt2", "tilt4"]]  # fmt: skip
THRESHOLDS = (12, 15, 20, 25, 30)


def landmark_queries(workdir):
    """landmarks-dev's grouped images, each left out of its own ranking, with its features."""
    with open(os.path.join(LANDMARKS, "groups.csv")) as f:
        group = {r["image"]: r["group"] or None for r in csv.DictReader(f)}
    names = [n for n, g in group.items() if g]
    features = dict(iter_features(os.path.join(workdir, "features"), set(names)))
    return [{"id": n, "uri": os.path.join(LANDMARKS, "images", n), "features": features[n], "exclude": [n],
             "positives": [o for o, g in group.items() if g == group[n] and o != n]} for n in names]  # fmt: skip


def record(index, query, below):
    """The plain ranking of one query, and what each view verifies when it verified too little."""
    pixels = index.query_pixels(query["uri"])
    features = query.get("features") or index.query_features(pixels)
    plain = index._rank(features, None, query["exclude"], None, None)
    out = {k: query[k] for k in ("id", "positives", "tilt", "rotation") if k in query}
    out.update(fused=plain["fused"].tolist(), inliers=plain["inliers"].tolist(), order=plain["order"].tolist(),
               views={})  # fmt: skip
    if plain["inliers"].max(initial=0) < below:
        for stage, views in synthesis.STAGES.items():
            found = synthesis.synthesized(index.view_extractor, pixels[0], views)
            for (tilt, phi), view in zip(views, found):
                view = dataclasses.replace(view.rescaled(*pixels[1]), global_descriptor=features.global_descriptor)
                seen = index._rank(view, None, query["exclude"], None, None, expand=False)["inliers"]
                out["views"][f"{stage}|{tilt:.2f}|{phi:.0f}"] = {int(r): int(seen[r]) for r in np.flatnonzero(seen)}
    return out


def replay(rec, image_ids, stages, threshold):
    """(AP, views) of one query's record under a rule, as Index._synthesize would rank it."""
    inliers, views = np.array(rec["inliers"]), 0
    for stage in stages:
        if inliers.max(initial=0) >= threshold:
            break
        for name, found in rec["views"].items():
            if name.split("|")[0] == stage:
                views += 1
                for row, n in found.items():
                    if n >= threshold:
                        inliers[int(row)] = max(inliers[int(row)], n)
    order = verified_first(np.array(rec["order"]), np.array(rec["fused"]), inliers)
    return metrics.query_metrics([image_ids[r] for r in order], rec["positives"])["ap"], views


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a landmarks-dev workdir of `delf-index evaluate`")
    parser.add_argument("--set", choices=["landmarks", "extreme"], default="landmarks")
    parser.add_argument("--out", default="/tmp/extreme", help="where the extreme set's queries are written")
    parser.add_argument("--records", required=True, help="JSON of the records: written, or replayed when present")
    parser.add_argument("--below", type=int, default=30, help="record the views of queries under these inliers")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(LANDMARKS, "groups.csv")):
        raise SystemExit(f"needs landmarks-dev at {LANDMARKS}")
    index = Index.load(os.path.join(args.workdir, "index"), conf=PLAIN)
    if not os.path.exists(args.records):
        queries = landmark_queries(args.workdir) if args.set == "landmarks" else [
            {**q, "exclude": []} for q in extreme_views.build_queries(args.out, 1)]  # fmt: skip
        records = [record(index, q, args.below) for q in queries]
        with open(args.records, "w") as f:
            json.dump({"image_ids": list(index.artifact.image_ids), "records": records}, f)
    with open(args.records) as f:
        data = json.load(f)
    image_ids, records = data["image_ids"], data["records"]
    for stages, threshold in [([], 0)] + [(o, t) for o in ORDERS for t in THRESHOLDS if t <= args.below]:
        done = [replay(r, image_ids, stages, threshold) for r in records]
        aps = np.array([ap for ap, _ in done])
        row = {"stages": stages, "from": threshold, "mAP": round(float(aps.mean()), 4),
               "views_per_query": round(float(np.mean([v for _, v in done])), 2)}  # fmt: skip
        for key in sorted({(r["tilt"], r["rotation"]) for r in records if "tilt" in r}):
            chosen = [i for i, r in enumerate(records) if (r["tilt"], r["rotation"]) == key]
            row[f"tilt {key[0]}, rotation {key[1]}"] = round(float(aps[chosen].mean()), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
