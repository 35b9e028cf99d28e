"""CPU extraction near the hardware's limit: precisions, backbones and onnxruntime settings,
measured in one window on the same photos.

    python -m benchmarks.cpu_extraction --workdir /tmp/cpu --images 12 --rounds 3

Exports the variants into --workdir (the default model in float32 is the shipped one; the
ResNet-50 rows use random weights, speed does not depend on them), then:

1. images/s of the whole extraction (7 scales, 1000 features, largest side 1024, both cores)
   per variant, rounds alternating between variants, the best round of each; the share of
   time in the network; the network's GFLOP per image (counted in PyTorch on the pyramid
   levels of the photos) and the arithmetic rate that makes;
2. onnxruntime session settings on the default model's levels of one photo: optimisation
   level, threads, spinning, and batching the levels of 4 images of one size;
3. agreement of every faster variant of the default backbone with its float32 features:
   keypoints found within one pixel at the same scale, descriptor cosine of those.

Figures: benchmarks/README.md, "CPU extraction (issue 18)".
"""

import argparse
import glob
import json
import os
import time

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.landmarks import LANDMARKS
from delf_index.model.backbones import ResNet50
from delf_index.model.export import build_model, export_onnx, metadata
from delf_index.model.quantize import quantize_int8
from delf_index.runtime.extractor import Extractor, load_model, shipped_model_path
from delf_index.runtime.images import read_image


def export_variants(workdir):
    """{name: (onnx path, backbone, global_from)} of the variants, exported once."""
    os.makedirs(workdir, exist_ok=True)
    weights = os.path.join(workdir, "resnet50-random.pth")
    if not os.path.exists(weights):
        torch.manual_seed(0)
        torch.save(ResNet50().state_dict(), weights)
    plan = {
        "efficientnet_lite0 fp32 (shipped)": ("efficientnet_lite0", None, "final", "fp32"),
        "efficientnet_lite0 int8": ("efficientnet_lite0", None, "final", "int8"),
        "efficientnet_lite0 fp32, global from the local layer": ("efficientnet_lite0", None, "local", "fp32"),
        "efficientnet_lite0 int8, global from the local layer": ("efficientnet_lite0", None, "local", "int8"),
        "resnet50 fp32, layer4 global": ("resnet50", weights, "final", "fp32"),
        "resnet50 fp32, no layer4 (global from layer3)": ("resnet50", weights, "local", "fp32"),
        "resnet50 int8, no layer4": ("resnet50", weights, "local", "int8"),
    }
    out = {}
    for name, (backbone, w, global_from, precision) in plan.items():
        path = os.path.join(workdir, name.split(" (")[0].replace(" ", "_").replace(",", "") + ".onnx")
        if name.endswith("(shipped)"):
            path = shipped_model_path("float32")
        elif not os.path.exists(path):
            model, provenance = build_model(backbone, w, "l2norm", None, global_from)
            meta = metadata(model, provenance)
            if precision == "int8":
                if backbone.startswith("efficientnet"):
                    model.fold_normalisation()
                export_onnx(model, path + ".fp32", meta)
                quantize_int8(path + ".fp32", path)
            else:
                export_onnx(model, path, meta)
        out[name] = (path, backbone, w, global_from)
    return out


def photos(count):
    paths = sorted(glob.glob(os.path.join(LANDMARKS, "images", "*.jpg")))
    if not paths:
        raise SystemExit(f"needs landmarks-dev at {LANDMARKS}")
    return [read_image(p) for p in paths[:: max(1, len(paths) // count)][:count]]


def gflop_per_image(backbone, weights, global_from, images):
    """Float multiply-adds x 2 of the network on the pyramid levels of `images`, per image."""
    model, _ = build_model(backbone, weights, "l2norm", None, global_from)
    extractor = Extractor()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for image in images:
            for _, level, _ in extractor.pyramid(image):
                model(torch.from_numpy(level[None]))
    return counter.get_total_flops() / len(images) / 1e9


def session_settings(image):
    """Seconds per image of the default model's 7 levels, per onnxruntime setting."""
    data, _, _ = load_model("float32")
    levels = [level for _, level, _ in Extractor().pyramid(image)]
    rows = {}
    settings = {
        "ORT_ENABLE_ALL, 2 threads (the default)": {},
        "ORT_ENABLE_EXTENDED": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
        "ORT_ENABLE_BASIC": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC},
        "1 thread": {"threads": 1},
        "no spinning": {"spin": "0"},
    }
    for name, s in settings.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = s.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.intra_op_num_threads = s.get("threads", 0)
        options.add_session_config_entry("session.intra_op.allow_spinning", s.get("spin", "1"))
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        for level in levels:
            session.run(None, {"image": level[None]})
        start = time.perf_counter()
        for _ in range(3):
            for level in levels:
                session.run(None, {"image": level[None]})
        rows[name] = round((time.perf_counter() - start) / 3, 3)
    # 4 images of one size: each level one pass of batch 4, or 4 passes of batch 1
    four = [image] * 4
    for name, batch in (("batch of 4 same-size images, levels batched", 8), ("the same 4, one level at a time", 1)):
        extractor = Extractor(conf={"max_batch": batch})
        extractor.extract_batch(four)
        start = time.perf_counter()
        for _ in range(2):
            extractor.extract_batch(four)
        rows[name + " (whole extraction)"] = round((time.perf_counter() - start) / 8, 3)
    return rows


def agreement(reference, other, images):
    """Share of the reference keypoints that `other` finds within 1 px at the same scale, and
    the median cosine of their descriptors."""
    found, cosines = [], []
    for image in images:
        a, b = reference(image), other(image)
        for scale in np.unique(a.scale):
            ia, ib = np.nonzero(a.scale == scale)[0], np.nonzero(np.isclose(b.scale, scale))[0]
            if not len(ib):
                found += [False] * len(ia)
                continue
            d = np.hypot(a.x[ia, None] - b.x[None, ib], a.y[ia, None] - b.y[None, ib])
            near = d.min(axis=1) <= 1.0
            found += near.tolist()
            pairs = d.argmin(axis=1)[near]
            cosines += (a.descriptors[ia[near]] * b.descriptors[ib[pairs]]).sum(axis=1).tolist()
    return float(np.mean(found)), float(np.median(cosines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    variants = export_variants(args.workdir)
    images = photos(args.images)
    extractors = {name: Extractor(path) for name, (path, *_) in variants.items()}
    for extractor in extractors.values():  # warm-up: first-shape costs are not throughput
        extractor(images[0])
    best = {name: float("inf") for name in extractors}
    network = {}
    for _ in range(args.rounds):
        for name, extractor in extractors.items():
            extractor.stats["seconds_network"] = 0.0
            start = time.perf_counter()
            for image in images:
                extractor(image)
            seconds = time.perf_counter() - start
            if seconds < best[name]:
                best[name], network[name] = seconds, extractor.stats["seconds_network"] / seconds
    for name, (_, backbone, weights, global_from) in variants.items():
        gflop = gflop_per_image(backbone, weights, global_from, images[:3])
        rate = len(images) / best[name]
        print(
            json.dumps(
                {
                    "variant": name,
                    "images/s": round(rate, 3),
                    "network share": round(network[name], 3),
                    "GFLOP/image (float)": round(gflop, 1),
                    "GFLOP/s": round(gflop * rate, 1),
                }
            ),
            flush=True,
        )
    print(json.dumps({"session settings, s per image of 7 levels": session_settings(images[1])}), flush=True)
    reference = extractors["efficientnet_lite0 fp32 (shipped)"]
    for name in ("efficientnet_lite0 int8",):
        share, cosine = agreement(reference, extractors[name], images)
        print(
            json.dumps(
                {
                    "agreement with fp32": name,
                    "keypoints within 1 px": round(share, 3),
                    "median descriptor cosine": round(cosine, 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
