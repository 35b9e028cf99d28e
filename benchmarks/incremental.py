"""Incremental day against a full run: extract + fit + build of N images, then a day that adds
1 % new images (extract + append, through `delf-index update`).

    python -m benchmarks.incremental --workdir /tmp/incremental --images 10000 --size 256
    python -m benchmarks.incremental --workdir /tmp/incremental --day-only    # another day on that collection

The collection is made from landmarks-dev photos (or scikit-image's, without it), shrunk to
`--size` pixels and varied per copy (seeded crop, flip and brightness), so that every file
is a distinct image; small images keep the full run within minutes on 2 cores. Prints one
JSON line per step and the ratio the issue asks about.

Figures: benchmarks/README.md, "Incremental runs (issue 13)".
"""

import argparse
import glob
import json
import os
import shutil
import time

import cv2
import numpy as np

from benchmarks.landmarks import LANDMARKS
from delf_index.pipelines import build, extract, fit, update


def sources(size):
    paths = sorted(glob.glob(os.path.join(LANDMARKS, "images", "*.jpg")))
    if paths:
        images = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
    else:
        # scikit-image is optional (the [demo] extra): the fallback when landmarks-dev is absent
        from skimage import data

        images = [np.asarray(getattr(data, n)())[..., :3] for n in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for image in images:
        scale = size / max(image.shape[:2])
        out.append(cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), cv2.INTER_AREA))
    return out


def write_images(folder, first, count, photos, seed=0):
    """Images first .. first + count - 1: a seeded crop, flip and brightness of a photo each."""
    os.makedirs(folder, exist_ok=True)
    for n in range(first, first + count):
        rng = np.random.default_rng([seed, n])
        photo = photos[n % len(photos)]
        h, w = photo.shape[:2]
        y0, x0 = rng.integers(0, h // 8 + 1), rng.integers(0, w // 8 + 1)
        image = photo[y0 : y0 + h - h // 8, x0 : x0 + w - w // 8]
        image = image[:, ::-1] if rng.random() < 0.5 else image
        image = np.clip(image.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(folder, f"{n:06d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="largest side of the images")
    parser.add_argument("--new", type=float, default=0.01, help="share of new images on the incremental day")
    parser.add_argument("--day-only", action="store_true", help="one more day on the workdir's collection")
    args = parser.parse_args(argv)
    if args.day_only:
        return another_day(args.workdir, args.new, args.size)
    shutil.rmtree(args.workdir, ignore_errors=True)
    photos = sources(args.size)
    images = os.path.join(args.workdir, "images")
    write_images(images, 0, args.images, photos)
    features, codebooks, index = (os.path.join(args.workdir, n) for n in ("features", "codebooks", "index"))
    steps = {}
    start = time.time()
    extract.run(images, features)
    steps["full extract"] = time.time() - start
    start = time.time()
    fit.run(features, codebooks)
    steps["fit"] = time.time() - start
    start = time.time()
    manifest = build.run(features, index, codebooks=codebooks)
    steps["full build"] = time.time() - start
    full = sum(steps.values())
    print(json.dumps({"full run": {k: round(v, 1) for k, v in steps.items()}, "images": args.images}), flush=True)

    new = max(1, round(args.images * args.new))
    write_images(images, args.images, new, photos)
    start = time.time()
    counts = update.run(images, features, index)
    day = time.time() - start
    result = {
        "images": args.images,
        "new": new,
        "size": args.size,
        "descriptors": manifest["counts"]["descriptors"],
        "full_s": round(full, 1),
        "full_extract_and_build_s": round(steps["full extract"] + steps["full build"], 1),
        "incremental_s": round(day, 1),
        "incremental_share_of_full": round(day / full, 4),
        "incremental_share_of_extract_and_build": round(day / (steps["full extract"] + steps["full build"]), 4),
        "update": counts,
    }
    print(json.dumps(result), flush=True)


def another_day(workdir, share, size):
    """One more day on an existing workdir: `share` new images, one `update`, timed in this
    process after a warm-up (a day with nothing new), as the full run's day is."""
    images = os.path.join(workdir, "images")
    count = len(os.listdir(images))
    features, index = os.path.join(workdir, "features"), os.path.join(workdir, "index")
    update.run(images, features, index)  # imports and caches warm, as after the full run
    new = max(1, round(count * share))
    write_images(images, count, new, sources(size), seed=count)
    start = time.time()
    counts = update.run(images, features, index)
    print(json.dumps({"images": count, "new": new, "incremental_s": round(time.time() - start, 1), "update": counts}))


if __name__ == "__main__":
    main()
