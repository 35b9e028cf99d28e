"""The match graph's refresh in a scheduled `update` (issue 28): its cost for a day of 1 % new
images at 10,000 images, against a full `match --augment` of the same index.

    python -m benchmarks.incremental --workdir /tmp/incremental --images 10000 --size 256   # the collection
    python -m benchmarks.graph_refresh --workdir /tmp/incremental --scratch /tmp/graph_refresh
    python -m benchmarks.graph_refresh --workdir /tmp/incremental --scratch /tmp/graph_refresh --full

`--workdir` is left as it is: its images, features table and index are linked into
`--scratch` (hard links for the files that are never rewritten: images, the table's data
files, the index's version files). Steps:

1. an augmented index to start from: without `--full`, a match graph of the shape a full
   match gives this collection (each image verified with up to `--degree` other copies of its
   photo, inliers 12 to 200, seeded) published by match's own `augment_index`; with `--full`,
   a real `match --augment` (hours on 2 cores at 10,000 images);
2. the full match's search, timed on `--sample` images of the index through the refresh's
   query path (match's Neighbours, in Beam) and scaled to the index's images (the job's
   start-up, timed on 4 images, counted once), unless `--full` timed it whole;
3. the day: `--new` new images (benchmarks/incremental.py's recipe) and one `update`, whose
   graph refresh searches only them. Prints one JSON line per step and the ratio.

Figures: benchmarks/README.md, "Match graph refresh in update (issue 28)".
"""

import argparse
import glob
import json
import os
import shutil
import time

import numpy as np

from benchmarks.incremental import sources, write_images
from benchmarks.landmarks import LANDMARKS
from delf_index.indexing import artifact as art
from delf_index.indexing.versions import current_entry, current_manifest, current_version
from delf_index.pipelines import match, update
from delf_index.runtime.conf import resolve_conf

# files a run rewrites or adds next to its own (logs, leases, summaries) are copied, not linked
LINKED = (".jpg", ".parquet", ".npy", ".faiss", ".ivfdata", ".npz")


def link_tree(source, target):
    """`source` as `target`: hard links for data files, copies of the rest."""

    def place(src, dst):
        if src.endswith(LINKED) and "_delta_log" not in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=place, ignore=shutil.ignore_patterns("_lease.json*", "_staging"))


def shaped_graph(index, degree, seed=0):
    """Pairs (match's pairs-table rows) like a full match's: each image with up to `degree`
    other copies of its photo (image n is a copy of photo n % photos, benchmarks/incremental.py)."""
    image_ids, _, _ = art.read_images(index)
    photos = len(glob.glob(os.path.join(LANDMARKS, "images", "*.jpg"))) or 4  # sources()'s photos
    by_photo = {}
    for image_id in image_ids:
        by_photo.setdefault(int(image_id.split(".")[0]) % photos, []).append(image_id)
    rng = np.random.default_rng(seed)
    pairs = {}
    for image_id in image_ids:
        copies = by_photo[int(image_id.split(".")[0]) % photos]
        for other in rng.choice(copies, min(degree, len(copies)), replace=False):
            if other != image_id:
                pairs[tuple(sorted((image_id, str(other))))] = int(rng.integers(12, 201))
    return [{"image_a": a, "image_b": b, "inliers": n} for (a, b), n in pairs.items()]


def scaled_match(index, sample, conf):
    """Seconds of a full match's search of every image of `index`, from the search of `sample`
    images and of 4 (the job's start-up and index loading, which a full match pays once)."""
    image_ids = art.read_images(index)[0]
    chosen = [str(i) for i in np.random.default_rng(1).choice(image_ids, sample + 4, replace=False)]
    seconds = []
    for images in (chosen[:4], chosen[4:]):
        start = time.time()
        match.search_images(current_version(index), current_manifest(index), images, conf,
                            os.path.join(index, "_staging", "sample"))  # fmt: skip
        seconds.append(time.time() - start)
    per_image = max(seconds[1] - seconds[0], 0) / (sample - 4)
    return seconds[0] + per_image * (len(image_ids) - 4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a benchmarks.incremental workdir (left as it is)")
    parser.add_argument("--scratch", required=True, help="emptied, then the linked copy and the day")
    parser.add_argument("--new", type=float, default=0.01, help="share of new images on the day")
    parser.add_argument("--sample", type=int, default=100, help="images whose search times the full match")
    parser.add_argument("--degree", type=int, default=20, help="verified neighbours per image of the shaped graph")
    parser.add_argument("--full", action="store_true", help="a real match --augment first (hours at 10,000)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.scratch, ignore_errors=True)
    os.makedirs(args.scratch)
    for name in ("images", "features", "index"):
        link_tree(os.path.join(args.workdir, name), os.path.join(args.scratch, name))
    images, features, index = (os.path.join(args.scratch, n) for n in ("images", "features", "index"))
    count = len(art.read_images(index)[0])
    matched = resolve_conf(None, match.default_conf, "match")

    start = time.time()
    if args.full:
        summary = match.run(index, os.path.join(args.scratch, "match"), conf={"sheet": False}, augment=True)
        full_s, how = time.time() - start, "measured"
        pairs = summary["rows"]["pairs"]
    else:
        graph_pairs = shaped_graph(index, args.degree)
        match.augment_index(index, graph_pairs, current_entry(index)["version"], matched=match.matched_with(matched))
        pairs = len(graph_pairs)
        full_s = scaled_match(index, args.sample, matched)
        how = f"scaled from {args.sample} images"
    print(json.dumps({"augmented": {"images": count, "pairs": pairs, "full_match_search_s": round(full_s, 1),
                                    "full_match": how}}), flush=True)  # fmt: skip

    new = max(1, round(count * args.new))
    first = 1 + max(int(name.split(".")[0]) for name in os.listdir(images))
    write_images(images, first, new, sources(256), seed=first)
    conf = {"compact_above": None, "compact_table_above": None}
    start = time.time()
    counts = update.run(images, features, index, conf=conf)
    day_s = time.time() - start
    refreshed = current_manifest(index)["augmented"]["refreshed"]
    result = {
        "images": count,
        "new": new,
        "update_day_s": round(day_s, 1),
        "graph_refresh_s": refreshed["seconds"],
        "full_match_s": round(full_s, 1),
        "refresh_share_of_full_match": round(refreshed["seconds"] / full_s, 4),
        "refreshed": refreshed,
        "update": counts,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
