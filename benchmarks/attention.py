"""Does the trained attention select better features? Measured on landmarks-dev's validation groups.

landmarks-dev is split by group: sorted by size (largest first, then by name), the groups
alternate between training and validation, so that both halves get large and small groups
and wide-baseline pairs. Distractors are never trained on; all of them join the validation
database. Validation protocol: every image of a validation group is a query once against all
other validation images and distractors (leave-one-out, revisitop AP).

For each training run (a `delf-index train` output folder: attention.pt, plus backbone.pt
when stage 1 ran), every validation image is extracted with the default procedure (7 scales,
largest side 1024, no threshold), and its features are selected three ways with the same
number per image: by the trained attention, by descriptor L2 norm (the untrained default)
and at random. Features come sorted by score, so the best N of 1000 are the N-feature
selection. Every pair is then matched (mutual nearest neighbours, RANSAC affine).

    python -m benchmarks.attention manifest --workdir /tmp/attn
    delf-index train --manifest /tmp/attn/train.csv --output /tmp/attn/runs/cls
    python -m benchmarks.attention evaluate --workdir /tmp/attn --run cls=/tmp/attn/runs/cls

`headroom` asks how much any head could gain over L2-norm selection on this data: on the
training groups themselves, an oracle that knows which cells RANSAC verifies between images
of the same landmark puts those cells first (in L2-norm order), then the rest by L2 norm.
A head trained on that signal can at best reproduce the oracle, in-sample.

    python -m benchmarks.attention headroom --workdir /tmp/attn
"""

import argparse
import csv
import hashlib
import json
import os
import time
from collections import Counter

import numpy as np

from benchmarks.landmarks import LANDMARKS, extract_all, leave_one_out_map, pairwise_local_scores, read_groups
from delf_index.indexing import metrics, verify
from delf_index.model.weights import sha256_file
from delf_index.runtime.extractor import Extractor, OnnxEngine, top_cells
from delf_index.runtime.features import Features
from delf_index.runtime.images import read_image

MODES = ("attention", "l2norm", "random")
BUDGETS = (1000, 300, 100)


def split_groups(rows):
    """(training groups, validation groups) of [(image, group)]: sorted by size, alternating."""
    sizes = Counter(g for _, g in rows if g)
    order = sorted(sizes, key=lambda g: (-sizes[g], g))
    return order[0::2], order[1::2]


def write_manifest(path, root=LANDMARKS):
    """train.csv (GLDv2 shape: id, path, landmark_id) of the training groups' images, which
    stay where they are; returns the number of rows."""
    rows = read_groups(root)
    train_groups, _ = split_groups(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = os.path.abspath(os.path.join(root, "images"))
    count = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "landmark_id"])
        for name, group in rows:
            if group in train_groups:
                writer.writerow([os.path.splitext(name)[0], os.path.join(images, name), group])
                count += 1
    return count


def validation_rows(root=LANDMARKS):
    """[(image, group or None)]: the validation groups' images and every distractor."""
    rows = read_groups(root)
    _, val_groups = split_groups(rows)
    return [(name, group) for name, group in rows if group is None or group in val_groups]


class SelectionEngine:
    """An engine whose scores are the network's attention, descriptor L2 norms or random
    numbers. Network outputs are memoised in `memo` (shared by the three), so that one
    forward pass serves all selections of an image; clear it between images."""

    def __init__(self, engine, mode, memo):
        self.engine, self.mode, self.memo = engine, mode, memo
        self.metadata, self.fingerprint = engine.metadata, engine.fingerprint

    def __call__(self, images):
        key = (images.shape, hashlib.sha1(images.tobytes()).hexdigest())
        if key not in self.memo:
            self.memo[key] = self.engine(images)
        feats, scores, glob = self.memo[key]
        if self.mode == "l2norm":
            scores = np.linalg.norm(feats, axis=1)
        elif self.mode == "random":
            rng = np.random.default_rng(int(key[1][:15], 16))  # same image, same draw
            scores = rng.random(scores.shape, dtype=np.float32)
        return feats, scores, glob

    def candidates(self, images, valid_sizes, k=None):
        feats, scores, glob = self(images)
        meta = self.metadata
        return [
            (*top_cells(feats[b], scores[b], valid_sizes[b], k, meta["stride"], meta["centre_offset"]), glob[b])
            for b in range(len(images))
        ]


def run_network(run_dir):
    """(backbone, feature layer) a training run trained its head for (its conf.json)."""
    with open(os.path.join(run_dir, "conf.json")) as f:
        conf = json.load(f)
    if not conf.get("feature_layer"):
        raise ValueError(f"{run_dir}/conf.json does not name its feature layer (a run from before it was recorded)")
    return conf["backbone"], conf["feature_layer"]


def export_run(run_dir, output):
    """The ONNX model of a training run (its head, and its backbone when stage 1 ran)."""
    from delf_index.model.export import build_model, export_onnx, metadata

    backbone, layer = run_network(run_dir)
    weights = os.path.join(run_dir, "backbone.pt")
    model, provenance = build_model(
        backbone,
        weights=weights if os.path.exists(weights) else None,
        attention=os.path.join(run_dir, "attention.pt"),
        feature_layer=layer,
    )
    export_onnx(model, output, metadata(model, provenance, score_threshold=0.0))


def extract_modes(model_path, folders, rows, root=LANDMARKS, threads=1):
    """{mode: [Features of each row]} for the modes of `folders` ({mode: cache folder of .npz})."""
    engine = OnnxEngine(model_path, threads=threads)
    memo = {}
    extractors = {m: Extractor(engine=SelectionEngine(engine, m, memo), conf={"score_threshold": 0.0}) for m in folders}
    out = {m: [] for m in folders}
    start = time.time()
    for n, (name, _) in enumerate(rows):
        image = None
        for mode, folder in folders.items():
            cache = os.path.join(folder, name + ".npz")
            if os.path.exists(cache):
                out[mode].append(Features.load(cache))
                continue
            if image is None:
                image = read_image(os.path.join(root, "images", name))
            os.makedirs(folder, exist_ok=True)
            features = extractors[mode](image)
            features.save(cache)
            out[mode].append(features)
        memo.clear()
        if image is not None and n % 20 == 0:
            print(f"  {n}/{len(rows)} images, {time.time() - start:.0f}s", flush=True)
    return out


def reorder(features, order):
    """`features` with its rows in `order`, an index array or a slice (what a different
    selection score would give)."""
    return Features(
        **{k: getattr(features, k)[order] for k in ("x", "y", "scale", "attention", "descriptors")},
        global_descriptor=features.global_descriptor,
        width=features.width,
        height=features.height,
    )


def truncate(features, n):
    """The best n features (Features are sorted by score, best first)."""
    return reorder(features, slice(0, n))


def pair_scores(feats, cache):
    """[N, N] mutual-NN match and RANSAC inlier counts of all pairs, cached as .npz."""
    if os.path.exists(cache):
        with np.load(cache) as data:
            return data["matches"], data["inliers"]
    matches, inliers = pairwise_local_scores(feats)
    np.savez_compressed(cache, matches=matches, inliers=inliers)
    return matches, inliers


def query_aps(scores, groups):
    """AP of every query (an image of a validation group) ranking all other images by `scores`."""
    aps = []
    for q, group in enumerate(groups):
        if group is None:
            continue
        order = [i for i in np.argsort(-scores[q], kind="stable") if i != q]
        aps.append(metrics.query_metrics(order, [i for i, g in enumerate(groups) if g == group and i != q])["ap"])
    return np.array(aps)


def bootstrap_difference(a, b, resamples=2000, seed=0):
    """Mean of a - b (paired per query) and its 90 % bootstrap interval over queries."""
    rng = np.random.default_rng(seed)
    diff = a - b
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 5)), float(np.percentile(means, 95))


def measure(matches, inliers, groups):
    """mAP by inliers (ties by mutual NN count) and by mutual NN, mean inliers of positive and
    negative pairs, and the fraction of positive / negative pairs verified (any inliers)."""
    g = np.array([x or "" for x in groups], dtype=object)
    same = (g[:, None] == g[None, :]) & (g[:, None] != "")
    upper = np.triu(np.ones_like(same), 1)
    positive, negative = same & upper, ~same & upper
    aps = query_aps(inliers + matches / 1e4, groups)
    return {
        "mAP_inliers": float(aps.mean()),
        "mAP_mutual_nn": leave_one_out_map(matches, groups)["mAP"],
        "inliers_pos": float(inliers[positive].mean()),
        "inliers_neg": float(inliers[negative].mean()),
        "verified_pos": float((inliers[positive] > 0).mean()),
        "verified_neg": float((inliers[negative] > 0).mean()),
        "aps": aps,
    }


def evaluate(runs, workdir, budgets=BUDGETS, root=LANDMARKS, threads=1):
    """One result row per (run, selection mode, budget); prints them as JSON lines.

    L2-norm and random selections depend on the backbone only: runs that share it (every run
    without stage 1) share those features and scores.
    """
    rows = validation_rows(root)
    groups = [g for _, g in rows]
    results = []
    for name, run_dir in runs:
        work = os.path.join(workdir, "eval", f"{name}-{sha256_file(os.path.join(run_dir, 'attention.pt'))[:10]}")
        network = "-".join(run_network(run_dir))
        backbone = os.path.join(run_dir, "backbone.pt")
        weights = "imagenet" if not os.path.exists(backbone) else f"finetuned-{sha256_file(backbone)[:10]}"
        shared = os.path.join(workdir, "eval", f"{network}-{weights}")
        folders = {m: os.path.join(work if m == "attention" else shared, m) for m in MODES}
        os.makedirs(work, exist_ok=True)
        model_path = os.path.join(work, "model.onnx")
        if not os.path.exists(model_path):
            export_run(run_dir, model_path)
        per_mode = extract_modes(model_path, folders, rows, root, threads)
        glob = np.stack([f.global_descriptor for f in per_mode["attention"]])
        global_map = leave_one_out_map(glob @ glob.T, groups)["mAP"]
        for budget in budgets:
            for mode in MODES:
                cache = os.path.join(os.path.dirname(folders[mode]), f"pairs-{mode}-{budget}.npz")
                matches, inliers = pair_scores([truncate(f, budget) for f in per_mode[mode]], cache)
                row = {"run": name, "mode": mode, "budget": budget, "global": global_map}
                row.update(measure(matches, inliers, groups))
                results.append(row)
            # paired differences, attention minus each baseline, over the same queries
            att = results[-3]
            for base in results[-2:]:
                att[f"vs_{base['mode']}"] = bootstrap_difference(att["aps"], base["aps"])
            for row in results[-3:]:
                print(json.dumps({k: v for k, v in row.items() if k != "aps"}), flush=True)
    return results


def verified_cells(feats, groups, conf=None):
    """Per image, a mask of its features that are RANSAC inliers with another image of its
    group (every same-group pair is verified; images without a group are never marked)."""

    marks = [np.zeros(len(f.descriptors), bool) for f in feats]
    for a in range(len(feats)):
        for b in range(a + 1, len(feats)):
            if groups[a] is None or groups[a] != groups[b]:
                continue
            fa, fb = feats[a], feats[b]
            _, m, inliers = verify.verify_pair(
                fa.keypoints, fa.descriptors, fb.keypoints, fb.descriptors, (fb.width, fb.height), conf
            )
            marks[a][m[inliers, 0]] = True
            marks[b][m[inliers, 1]] = True
    return marks


def headroom(workdir, budgets=BUDGETS, candidates=3000, root=LANDMARKS, threads=1):
    """mAP by inliers on the training groups (+ all distractors) of three selections of the
    same `candidates` best cells by L2 norm: L2 norm, random, and the verified-first oracle
    (see the module docstring). One result row per (selection, budget), as `evaluate`."""
    rows = read_groups(root)
    train_groups, _ = split_groups(rows)
    rows = [(name, group) for name, group in rows if group is None or group in train_groups]
    groups = [g for _, g in rows]
    extractor = Extractor(engine=OnnxEngine(None, threads=threads), conf={"max_features": candidates})
    if extractor.metadata["attention"]["type"] != "l2norm":
        raise ValueError("headroom needs the default model's L2-norm ranking")
    work = os.path.join(workdir, "headroom", extractor.fingerprint[:12])
    # the default model ranks by L2 norm: each image's best `candidates` cells, best first
    feats = extract_all(extractor, os.path.join(work, "features"), root, rows=rows)
    marks = verified_cells(feats, groups)
    rng = np.random.default_rng(0)
    orders = {
        "l2norm": [np.arange(len(m)) for m in marks],
        "random": [rng.permutation(len(m)) for m in marks],
        "oracle": [np.argsort(~m, kind="stable") for m in marks],  # verified first, each part by L2 norm
    }
    share = sum(int(m.sum()) for m in marks) / max(sum(len(m) for m in marks), 1)
    print(f"{len(rows)} images, {share:.1%} of the candidate cells verified", flush=True)
    results = []
    for budget in budgets:
        for mode, order in orders.items():
            cache = os.path.join(work, f"pairs-{mode}-{candidates}-{budget}.npz")
            selected = [reorder(f, o[:budget]) for f, o in zip(feats, order)]
            matches, inliers = pair_scores(selected, cache)
            row = {"run": "headroom", "mode": mode, "budget": budget, "verified_share": share}
            row.update(measure(matches, inliers, groups))
            results.append(row)
        oracle = results[-1]
        for base in results[-3:-1]:
            oracle[f"vs_{base['mode']}"] = bootstrap_difference(oracle["aps"], base["aps"])
        for row in results[-3:]:
            print(json.dumps({k: v for k, v in row.items() if k != "aps"}), flush=True)
    return results


def table(results):
    """Markdown table, one line per run, budget and selection."""
    lines = [
        "| run | features/image | selection | mAP | this - L2 norm; - random [90% CI] | mAP (mutual NN) | "
        "inliers, positive pairs | verified positive pairs | verified negative pairs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        delta = ""
        if "vs_l2norm" in r:
            delta = "; ".join(
                f"{r[f'vs_{m}'][0]:+.3f} [{r[f'vs_{m}'][1]:+.3f}, {r[f'vs_{m}'][2]:+.3f}]" for m in ("l2norm", "random")
            )
        lines.append(
            f"| {r['run']} | {r['budget']} | {r['mode']} | {r['mAP_inliers']:.3f} | {delta} | "
            f"{r['mAP_mutual_nn']:.3f} | {r['inliers_pos']:.1f} | {r['verified_pos']:.3f} | {r['verified_neg']:.4f} |"
        )
    globals_ = {r["run"]: r["global"] for r in results if "global" in r}
    if globals_:
        lines.append("")
        lines.append("global descriptor mAP: " + ", ".join(f"{k} {v:.3f}" for k, v in globals_.items()))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest", help="write train.csv of the training groups")
    m.add_argument("--workdir", required=True)
    e = sub.add_parser("evaluate", help="compare selections on the validation groups")
    e.add_argument("--workdir", required=True)
    e.add_argument("--run", nargs="+", required=True, metavar="NAME=DIR", help="training output folders")
    e.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    e.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    h = sub.add_parser("headroom", help="the verified-first oracle against L2 norm, on the training groups")
    h.add_argument("--workdir", required=True)
    h.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    h.add_argument("--candidates", type=int, default=3000, help="cells per image, best by L2 norm")
    h.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    args = parser.parse_args(argv)
    if args.command == "manifest":
        path = os.path.join(args.workdir, "train.csv")
        count = write_manifest(path)
        train_groups, val_groups = split_groups(read_groups())
        print(f"wrote {path}: {count} images of {len(train_groups)} training groups")
        print(f"training groups: {', '.join(train_groups)}")
        print(f"validation groups: {', '.join(val_groups)} (+ all distractors)")
        return 0
    if args.command == "headroom":
        results = headroom(args.workdir, args.budgets, args.candidates, threads=args.threads)
        print()
        print(table(results))
        return 0
    runs = [tuple(r.split("=", 1)) for r in args.run]
    results = evaluate(runs, args.workdir, args.budgets, threads=args.threads)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    main()
