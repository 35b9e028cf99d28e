"""GPU extraction throughput: 7 pyramid scales on 1024x768 photos (device machine).

Two ways of running the same network and procedure:

- ``naive``: fp32, NCHW, one image at a time, each pyramid level its own forward pass;
- ``batched``: bf16 autocast, channels_last, levels of `--batch` images batched per size,
  per-level top-k on the device (only candidates travel to the host), `--threads` host
  threads overlapping resizing and selection with the GPU.

Weights are random: throughput does not depend on their values, and no ResNet-50 weights can
be downloaded here. Prints one JSON line per configuration.

    python -m benchmarks.gpu_throughput --backbone resnet50 --images 512

Figures: benchmarks/README.md, "GPU checks (owed)".
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from delf_index.model.delf import DELF
from delf_index.model.export import metadata
from delf_index.model.torch_engine import TorchEngine
from delf_index.runtime.extractor import Extractor


def photos(count, width=1024, height=768):
    """Real photos (scikit-image) at 1024x768, flipped and shifted so that no two are equal."""
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    base = [cv2.resize(np.ascontiguousarray(b[:, :, :3]), (width, height)) for b in base]
    out = []
    for i in range(count):
        image = base[i % len(base)]
        image = image[:, ::-1] if (i // len(base)) % 2 else image
        out.append(np.ascontiguousarray(np.roll(image, i, axis=1)))
    return out


def engine_for(backbone, device, bf16, channels_last):
    net = DELF(backbone)
    provenance = {"weights": {"source": "random (timing only)", "sha256": ""}, "attention": {"type": "l2norm"}}
    return TorchEngine(net, metadata(net, provenance), "benchmark", device, bf16, channels_last)


def run(extractor, images, batch, threads):
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(extractor.extract_batch, chunks))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert sum(len(r) for r in results) == len(images)
    return len(images) / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--naive-images", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    images = photos(args.images)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"

    naive = Extractor(engine=engine_for(args.backbone, args.device, False, False), conf={"max_batch": 1})
    run(naive, images[:2], 1, 1)  # warm-up
    rate = run(naive, images[: args.naive_images], 1, 1)
    print(
        json.dumps(
            {"backbone": args.backbone, "mode": "naive fp32 batch 1", "images/s": round(rate, 1), "device": device_name}
        ),
        flush=True,
    )

    engine = engine_for(args.backbone, args.device, args.device == "cuda", True)
    for batch in args.batch:
        extractor = Extractor(engine=engine, conf={"max_batch": batch})
        run(extractor, images[: batch * args.threads], batch, args.threads)  # warm-up, cudnn tuning
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rate = run(extractor, images, batch, args.threads)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(
            json.dumps(
                {
                    "backbone": args.backbone,
                    "mode": f"bf16 channels_last batch {batch}",
                    "threads": args.threads,
                    "images/s": round(rate, 1),
                    "peak_gpu_gib": round(peak, 1),
                    "device": device_name,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
