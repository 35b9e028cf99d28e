"""`delf-index extract-image`: DELF features of one image, with a summary.

    delf-index extract-image photo.jpg
    delf-index extract-image photo.jpg --output photo.npz --max-features 500
    delf-index extract-image gs://bucket/photo.jpg --model gs://bucket/model.onnx --json

The saved .npz holds x, y, scale, attention, descriptors, global_descriptor, width, height
(pipelines.extractor.Features; read it with Features.load or numpy.load).
"""

import argparse
import json
import sys
import time

import numpy as np

from pipelines.extractor import Extractor, default_conf
from pipelines.images import read_image


def add_extractor_arguments(parser):
    """Command-line options for every knob of the extractor conf."""
    group = parser.add_argument_group("extraction")
    group.add_argument("--model", help="exported .onnx model, any fsspec URI (default: the shipped model)")
    group.add_argument("--scales", type=float, nargs="+", help=f"pyramid scales (default {default_conf['scales']})")
    group.add_argument(
        "--max-image-size", type=int, help="largest side before the pyramid, 0 = no limit (default 1024)"
    )
    group.add_argument("--score-threshold", type=float, help="attention threshold (default: the model's)")
    group.add_argument("--max-features", type=int, help="features kept per image (default 1000)")
    group.add_argument("--nms-iou", type=float, help="NMS on receptive-field boxes at this IoU (default: off)")
    group.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    group.add_argument(
        "--providers", nargs="+", help="onnxruntime execution providers (default: CUDA if present, else CPU)"
    )
    group.add_argument(
        "--engine",
        choices=["onnx", "torch"],
        default="onnx",
        help="run the network with onnxruntime (default) or PyTorch (needs the [model] extra)",
    )


def extractor_from_args(args):
    conf = {}
    for key in ("scales", "score_threshold", "max_features", "nms_iou"):
        value = getattr(args, key)
        if value is not None:
            conf[key] = tuple(value) if key == "scales" else value
    if args.max_image_size is not None:
        conf["max_image_size"] = args.max_image_size or None
    engine = None
    if args.engine == "torch":
        from model.torch_engine import TorchEngine

        engine = TorchEngine.from_onnx(args.model)
    return Extractor(args.model, conf, engine=engine, providers=args.providers, threads=args.threads)


def summary(features, seconds):
    scales, counts = np.unique(np.round(features.scale, 3), return_counts=True)
    att = features.attention
    return {
        "width": features.width,
        "height": features.height,
        "num_features": len(features),
        "descriptor_dim": int(features.descriptors.shape[1]),
        "features_per_scale": {f"{s:g}": int(c) for s, c in zip(scales, counts)},
        "attention_min": float(att.min()) if len(att) else None,
        "attention_max": float(att.max()) if len(att) else None,
        "seconds": round(seconds, 3),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index extract-image", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="image path or fsspec URI")
    parser.add_argument("--output", help="save the features to this .npz file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_extractor_arguments(parser)
    args = parser.parse_args(argv)
    extractor = extractor_from_args(args)
    image = read_image(args.image)
    start = time.perf_counter()
    features = extractor(image)
    info = summary(features, time.perf_counter() - start)
    if args.output:
        features.save(args.output)
        info["output"] = args.output
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"{args.image}: {info['width']}x{info['height']}, {info['num_features']} features "
        f"({info['descriptor_dim']}-d) in {info['seconds']:.2f}s"
    )
    print(f"  model: {extractor.describe()}")
    print("  per scale (1 / pyramid scale): " + ", ".join(f"{k}: {v}" for k, v in info["features_per_scale"].items()))
    if info["num_features"]:
        print(f"  attention {info['attention_min']:.3f} .. {info['attention_max']:.3f}")
    if args.output:
        print(f"  saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
