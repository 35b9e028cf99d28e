"""Which layer should give the local features? Measured on landmarks-dev.

For each candidate (backbone, feature layer) the default model is exported, every
landmarks-dev image extracted with the default extractor settings, and every pair matched
exhaustively (mutual nearest neighbours, then RANSAC affine). Reported, leave-one-out mAP:

- global: the GeM global descriptor alone (the same for every layer of a backbone);
- mutual NN: images ranked by the number of mutual nearest-neighbour matches;
- inliers: ranked by RANSAC inliers, ties broken by mutual NN count;
- inliers+global: ranked by RANSAC inliers, ties broken by global similarity;
- PQ votes, system: the whole system on these features (PCA 40 + PQ index from `fit` and
  `build` with their defaults, queries through indexing/retrieval.py): k-NN votes alone, and
  the full ranking (global + votes, verified shortlist).

    python benchmarks/feature_layers.py --workdir /tmp/layers [--configs efficientnet_lite0:stage5 ...]
"""

import argparse
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq

from benchmarks.landmarks import extract_all, leave_one_out_map, pairwise_local_scores, read_groups
from delf_index.indexing.artifact import Artifact
from delf_index.indexing.retrieval import Index
from delf_index.model.export import build_model, export_onnx, metadata
from delf_index.pipelines import build, fit
from delf_index.runtime.extractor import Extractor, load_model
from delf_index.schemas import features as fs

CANDIDATES = [
    "efficientnet_lite0:stage4",
    "efficientnet_lite0:stage5",
    "efficientnet_lite0:stage6_expand",
    "efficientnet_lite2:stage5",
]


def system_map(feats, groups, work, onnx_path):
    """mAP of the whole system on these features: a features table, `fit` and `build` with
    the defaults, then leave-one-out queries ranked by the query module (votes only; fused
    with verification)."""
    _, meta, fingerprint = load_model(onnx_path)
    names = [name for name, _ in read_groups()]
    schema = fs.features_schema(
        meta["descriptor_dim"], meta["global_dim"], "float16", fs.table_metadata("features", fingerprint, meta, {})
    )
    table = os.path.join(work, "table", "features")
    os.makedirs(table, exist_ok=True)
    rows = [fs.feature_row(n, n, g, f) for n, g, f in zip(names, groups, feats)]
    pq.write_table(fs.rows_to_table(rows, schema), os.path.join(table, "features-00000-of-00001.parquet"))
    fit.run(table, os.path.join(work, "codebooks"), beam_options={"workers": 1})
    build.run(
        table, os.path.join(work, "index"), codebooks=os.path.join(work, "codebooks"), beam_options={"workers": 1}
    )
    artifact = Artifact.load(os.path.join(work, "index"))
    out = {}
    for key, conf in (("votes", {"use_global": False, "use_verification": False}), ("system", {})):
        index = Index(artifact, conf)
        scores = np.zeros((len(names), len(names)))
        for q, (name, group) in enumerate(zip(names, groups)):
            if group is None:
                continue
            results = index.search(feats[q], top_k=None, exclude=[name], with_matches=False)
            for rank, r in enumerate(results):
                scores[q, r.row] = len(results) - rank  # the module's order as scores
        out[key] = leave_one_out_map(scores, groups)["mAP"]
    return out


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
            **system_map(feats, groups, work, onnx_path),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    print("\n| backbone:layer | dim | global | mutual NN | inliers | inliers+global | PQ votes | system |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['config']} | {r['dim']} | {r['global']:.3f} | {r['mutual_nn']:.3f} | {r['inliers']:.3f} "
            f"| {r['inliers+global']:.3f} | {r['votes']:.3f} | {r['system']:.3f} |"
        )


if __name__ == "__main__":
    main()
