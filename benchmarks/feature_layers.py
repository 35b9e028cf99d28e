"""Which layer should give the local features? Measured on landmarks-dev.

For each candidate (backbone, feature layer) the default model is exported, every
landmarks-dev image extracted with the default extractor settings, and every pair matched
exhaustively (mutual nearest neighbours, then RANSAC affine). Reported, leave-one-out mAP:

- global: the GeM global descriptor alone (the same for every layer of a backbone);
- mutual NN: images ranked by the number of mutual nearest-neighbour matches;
- inliers: ranked by RANSAC inliers, ties broken by mutual NN count;
- inliers+global: ranked by RANSAC inliers, ties broken by global similarity.

    python benchmarks/feature_layers.py --workdir /tmp/layers [--configs efficientnet_lite0:stage5 ...]
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.landmarks import extract_all, leave_one_out_map, pairwise_local_scores, read_groups
from model.export import build_model, export_onnx, metadata
from pipelines.extractor import Extractor

CANDIDATES = [
    "efficientnet_lite0:stage4",
    "efficientnet_lite0:stage5",
    "efficientnet_lite0:stage6_expand",
    "efficientnet_lite2:stage5",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--configs", nargs="+", default=CANDIDATES)
    args = parser.parse_args(argv)
    groups = [g for _, g in read_groups()]
    results = []
    for config in args.configs:
        backbone, layer = config.split(":")
        work = os.path.join(args.workdir, f"{backbone}-{layer}")
        os.makedirs(work, exist_ok=True)
        onnx_path = os.path.join(work, "model.onnx")
        if not os.path.exists(onnx_path):
            model, provenance = build_model(backbone, feature_layer=layer)
            export_onnx(model, onnx_path, metadata(model, provenance))
        extractor = Extractor(onnx_path)
        timing = os.path.join(work, "extract_seconds.txt")
        start = time.time()
        feats = extract_all(extractor, os.path.join(work, "features"))
        if not os.path.exists(timing):  # features are cached: keep the time of the run that made them
            with open(timing, "w") as f:
                f.write(str(time.time() - start))
        with open(timing) as f:
            seconds = float(f.read())
        glob = np.stack([f.global_descriptor for f in feats])
        matches, inliers = pairwise_local_scores(feats)
        row = {
            "config": config,
            "dim": int(feats[0].descriptors.shape[1]),
            "features/image": float(np.mean([len(f) for f in feats])),
            "global": leave_one_out_map(glob @ glob.T, groups)["mAP"],
            "mutual_nn": leave_one_out_map(matches, groups)["mAP"],
            "inliers": leave_one_out_map(inliers + matches / 1e4, groups)["mAP"],
            # final order of the query module: verified inliers first, then global similarity
            "inliers+global": leave_one_out_map(inliers + (glob @ glob.T) / 2, groups)["mAP"],
            "extract_seconds": seconds,
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    print("\n| backbone:layer | dim | global | mutual NN | inliers | inliers+global | extraction s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['config']} | {r['dim']} | {r['global']:.3f} | {r['mutual_nn']:.3f} | {r['inliers']:.3f} "
            f"| {r['inliers+global']:.3f} | {r['extract_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
