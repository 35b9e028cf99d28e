"""Extraction throughput: the onnxruntime path against torch eager, same photos, one run.

Both run the same Extractor procedure (pyramid, selection, geometry); only the engine that
runs the network differs:

- ``onnxruntime``: the exported model on onnxruntime's CPU provider (what workers run);
- ``torch-eager``: the same network in plain PyTorch eager mode, fp32, NCHW, no_grad
  (`TorchEngine.from_onnx(device="cpu", bf16=False, channels_last=False)`).

Engines alternate over `--rounds` rounds and each reports its best round, so that a busy
machine penalises both alike.

    python -m benchmarks.extract_throughput [--images 12] [--rounds 3] [--max-image-size 1024]

Figures: benchmarks/README.md, "Extraction throughput, CPU".
"""

import argparse
import glob
import json
import os
import platform
import time

import numpy as np

from benchmarks.landmarks import LANDMARKS
from delf_index.runtime.extractor import Extractor
from delf_index.runtime.images import read_image


def load_photos(count):
    """The first `count` landmarks-dev photos, or scikit-image's photos when absent."""
    paths = sorted(glob.glob(os.path.join(LANDMARKS, "images", "*.jpg")))
    if paths:
        step = max(1, len(paths) // count)
        return [read_image(p) for p in paths[::step][:count]], "landmarks-dev"
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left"]
    return [np.ascontiguousarray(getattr(data, n)()[:, :, :3]) for n in names][:count], "scikit-image"


def time_round(extractor, photos):
    start = time.perf_counter()
    for photo in photos:
        extractor(photo)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-image-size", type=int, default=1024)
    parser.add_argument("--model", help="exported model (default: the shipped one)")
    args = parser.parse_args(argv)
    from delf_index.model.torch_engine import TorchEngine

    photos, source = load_photos(args.images)
    conf = {"max_image_size": args.max_image_size}
    engines = {
        "onnxruntime": Extractor(args.model, conf),
        "torch-eager": Extractor(
            args.model, conf, engine=TorchEngine.from_onnx(args.model, device="cpu", bf16=False, channels_last=False)
        ),
    }
    for extractor in engines.values():  # warm-up: first-shape costs are not throughput
        time_round(extractor, photos[:2])
    best = {name: float("inf") for name in engines}
    for _ in range(args.rounds):
        for name, extractor in engines.items():
            best[name] = min(best[name], time_round(extractor, photos))
    sizes = [f"{p.shape[1]}x{p.shape[0]}" for p in photos]
    result = {
        "photos": f"{len(photos)} from {source} ({sizes[0]} .. {sizes[-1]})",
        "scales": len(engines["onnxruntime"].conf["scales"]),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        **{f"{name} images/s": round(len(photos) / t, 3) for name, t in best.items()},
        "speed-up": round(best["torch-eager"] / best["onnxruntime"], 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
