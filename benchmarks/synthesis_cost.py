"""What view synthesis costs a batch `search`: the default against `--synthesis` (off), on a
batch of uploads that match nothing and on a batch with matches, in one run (issue 35).

    python -m benchmarks.synthesis_cost --workdir /tmp/synthesis-cost
    python -m benchmarks.synthesis_cost --workdir /tmp/synthesis-cost --repeats 3 -- --workers 2

Under `--workdir` (made once, reused): an index of 12 landmarks-dev photos (the first photo of
each of the first 12 groups by name; extract, fit and build with their defaults), `uploads/`:
scikit-image's 16 photographs and their mirror images (32 queries, none of them in the index,
none a view of an indexed place), and `matches/`: links to at most 4 other photos of each
indexed group (31 queries, each with a match in the index, a few far apart: WxBS pairs).
Each batch is searched with the default ranking and with `--synthesis` alone (off), the two
alternating, `--repeats` times each; the best wall-clock seconds of each command, their
ratio, every run's seconds, and the search summary's queries that wanted views, that were
synthesized, and extractions per query are printed as one JSON line per batch. Anything
after `--` goes to every `delf-index` command.

Figures: benchmarks/README.md, "View synthesis where it pays (issue 35)".
"""

import argparse
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np

from benchmarks.landmarks import LANDMARKS, read_groups

# scikit-image's photographs (cat is chelsea, page and text are scans of text)
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
                  "stereo_motorcycle")  # fmt: skip
INDEXED_GROUPS, OTHERS_PER_GROUP = 12, 4


def upload_paths(workdir):
    """The upload batch's files, written on first use: each photo and its mirror image."""
    from skimage import data  # the [dev] extra's photos

    folder = os.path.join(workdir, "uploads")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in SKIMAGE_PHOTOS:
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image
        image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
        for suffix, pixels in (("", image), ("-mirror", image[:, ::-1])):
            path = os.path.join(folder, f"{name}{suffix}.jpg")
            if not os.path.exists(path):
                bgr = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2BGR)
                cv2.imwrite(path, bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            paths.append(path)
    return paths


def landmark_batches(workdir):
    """(the index's manifest rows, the matched batch's folder): written on first use."""
    groups = {}
    for name, group in read_groups():
        if group:
            groups.setdefault(group, []).append(name)
    chosen = sorted(groups)[:INDEXED_GROUPS]
    indexed = [(sorted(groups[g])[0], g) for g in chosen]
    folder = os.path.join(workdir, "matches")
    os.makedirs(folder, exist_ok=True)
    for group in chosen:
        for name in sorted(groups[group])[1 : 1 + OTHERS_PER_GROUP]:
            link = os.path.join(folder, name)
            if not os.path.exists(link):
                os.symlink(os.path.abspath(os.path.join(LANDMARKS, "images", name)), link)
    return indexed, folder


def command(*args):
    """Run `delf-index` quietly; its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "delf_index", *args, "-q"], check=True)
    return time.perf_counter() - start


def build_index(workdir, indexed, extra):
    """extract, fit and build the 12 photos' index under `workdir`, once."""
    if os.path.exists(os.path.join(workdir, "index", "_log")):
        return
    manifest = os.path.join(workdir, "index-manifest.csv")
    with open(manifest, "w") as f:
        f.write("id,uri,label\n")
        f.writelines(f"{name},{os.path.abspath(os.path.join(LANDMARKS, 'images', name))},{group}\n"
                     for name, group in indexed)  # fmt: skip
    features, codebooks = os.path.join(workdir, "features"), os.path.join(workdir, "codebooks")
    command("extract", "--input", manifest, "--output", features, *extra)
    command("fit", "--features", features, "--output", codebooks, *extra)
    index = os.path.join(workdir, "index")
    command("build", "--features", features, "--output", index, "--codebooks", codebooks, *extra)


def timed_batch(workdir, batch, queries, repeats, extra):
    """Each ranking's wall-clock seconds over `repeats` alternating runs, and its last summary."""
    rankings = {"default": [], "synthesis off": ["--synthesis"]}
    seconds, summaries = {name: [] for name in rankings}, {}
    for _ in range(repeats):
        for name, flags in rankings.items():
            output = os.path.join(workdir, "search", f"{batch}-{name.replace(' ', '-')}")
            took = command("search", "--input", queries, "--index", os.path.join(workdir, "index"),
                           "--output", output, *flags, *extra)  # fmt: skip
            with open(os.path.join(output, "_SUMMARY.json")) as f:
                summaries[name] = json.load(f)
            seconds[name].append(round(took, 1))
    return seconds, summaries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the index, the batches and the searches go here")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command (the best counts)")
    parser.add_argument("extra", nargs="*", help="after --: options of every delf-index command (--workers ...)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(LANDMARKS, "groups.csv")):
        raise SystemExit(f"needs landmarks-dev at {LANDMARKS}")
    indexed, matched = landmark_batches(args.workdir)
    build_index(args.workdir, indexed, args.extra)
    upload_paths(args.workdir)
    for batch, queries in (("no matches", os.path.join(args.workdir, "uploads")), ("matches", matched)):
        seconds, summaries = timed_batch(args.workdir, batch.replace(" ", "-"), queries, args.repeats, args.extra)
        best = {name: min(runs) for name, runs in seconds.items()}
        row = {"batch": batch, "queries": summaries["default"]["queries"],
               **{f"{name} s": s for name, s in best.items()},
               "ratio": round(best["default"] / best["synthesis off"], 3), "runs": seconds}  # fmt: skip
        for key in ("synthesis_wanted", "synthesized", "extractions_per_query"):
            row[key] = summaries["default"].get(key)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
