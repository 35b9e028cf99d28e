"""`delf-index extract-image`: DELF features of one image, with a summary.

    delf-index extract-image photo.jpg
    delf-index extract-image photo.jpg --output photo.npz --max-features 500
    delf-index extract-image gs://bucket/photo.jpg --model gs://bucket/model.onnx --json

The image is decoded and shrunk exactly as `delf-index extract` does with every image
(`Extractor.extract_image`), so the features equal that image's row of a features table.
The saved .npz holds x, y, scale, attention, descriptors, global_descriptor, width, height
(delf_index.Features; read it with Features.load or numpy.load).
"""

import json
import time

import numpy as np

from delf_index.pipelines import cli
from delf_index.runtime.extractor import Extractor


def make_extractor(args):
    conf = cli.extractor_conf_from_args(args)
    engine = None
    if args.engine == "torch":
        # torch is optional (the [model] extra) and needed only here
        from delf_index.model.torch_engine import TorchEngine

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
    parser = cli.Parser("extract-image", __doc__)
    parser.add_argument("image", help="image path or fsspec URI")
    parser.add_argument("--output", help="save the features to this .npz file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    cli.add_extractor_arguments(parser)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--providers", nargs="+", help="onnxruntime execution providers (default: CUDA if present)")
    parser.add_argument(
        "--engine",
        choices=["onnx", "torch"],
        default="onnx",
        help="run the network with onnxruntime (default) or PyTorch (needs the [model] extra)",
    )
    args = parser.parse_args(argv)
    extractor = make_extractor(args)
    start = time.perf_counter()
    features = extractor.extract_image(args.image)
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
