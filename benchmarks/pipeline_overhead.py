"""Pipeline overhead: `delf-index extract` against a bare Python loop over the same photos.

The bare loop reads each file, decodes it (same size limit) and calls the extractor, in one
process with onnxruntime on all cores. The pipeline runs the whole job (listing, Beam,
RunInference, Parquet writing, finalize) with 1 worker process (all cores to onnxruntime)
and with one process per core (one onnxruntime thread each). Without Beam, the bare loop
also runs as one single-threaded process per core, each on its share of the photos (started
and warmed up before the clock starts): what multi-process mode could gain at best. Runs
alternate over `--rounds`; each mode reports its best.

    python -m benchmarks.pipeline_overhead [--images 24] [--rounds 2]
"""

import argparse
import csv
import glob
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time

from benchmarks.landmarks import LANDMARKS
from delf_index.pipelines import extract
from delf_index.runtime.extractor import Extractor
from delf_index.runtime.images import decode_for_extraction


def photo_paths(count):
    paths = sorted(glob.glob(os.path.join(LANDMARKS, "images", "*.jpg")))
    if not paths:
        raise SystemExit(f"needs landmarks-dev at {LANDMARKS}")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def bare_loop(paths, extractor):
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            image, _ = decode_for_extraction(f.read(), extractor.conf["max_image_size"])
        extractor(image)
    return time.perf_counter() - start


def _bare_share(args):
    paths, start_at = args
    extractor = Extractor(threads=1)
    bare_loop(paths[:1], extractor)  # warm-up
    while time.time() < start_at:  # every process starts together, after its warm-up
        time.sleep(0.01)
    return bare_loop(paths, extractor)


def bare_processes(paths, processes):
    """Wall time of `processes` single-threaded bare loops, each on its share of `paths`."""
    with mp.get_context("spawn").Pool(processes) as pool:
        start_at = time.time() + 15
        shares = [(paths[i::processes], start_at) for i in range(processes)]
        return max(pool.map(_bare_share, shares))


def pipeline(manifest, output, workers):
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    summary = extract.run(manifest, output, beam_options={"workers": workers})
    assert summary["failed"] == 0
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    paths = photo_paths(args.images)
    cores = os.cpu_count()
    work = tempfile.mkdtemp(prefix="delf-overhead-")
    manifest = os.path.join(work, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "uri"])
        writer.writerows([os.path.basename(p), p] for p in paths)
    extractor = Extractor()
    bare_loop(paths[:2], extractor)  # warm-up
    best = {
        "bare loop": float("inf"),
        f"bare loop, {cores} processes x 1 thread": float("inf"),
        "extract, 1 worker": float("inf"),
        f"extract, {cores} workers": float("inf"),
    }
    for _ in range(args.rounds):
        best["bare loop"] = min(best["bare loop"], bare_loop(paths, extractor))
        key = f"bare loop, {cores} processes x 1 thread"
        best[key] = min(best[key], bare_processes(paths, cores))
        best["extract, 1 worker"] = min(best["extract, 1 worker"], pipeline(manifest, f"{work}/out1", 1))
        best[f"extract, {cores} workers"] = min(
            best[f"extract, {cores} workers"], pipeline(manifest, f"{work}/outN", cores)
        )
    result = {"images": len(paths), "cores": cores}
    for mode, seconds in best.items():
        result[mode] = {"seconds": round(seconds, 1), "images/s": round(len(paths) / seconds, 3)}
    result["overhead, 1 worker"] = f"{100 * (best['extract, 1 worker'] / best['bare loop'] - 1):.1f}%"
    result[f"speed-up, {cores} workers vs 1"] = round(best["extract, 1 worker"] / best[f"extract, {cores} workers"], 2)
    print(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
