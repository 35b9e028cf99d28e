"""Which features to keep per image: L2 norm, trained heads, non-learned spreads and an oracle,
each measured with the whole system on landmarks-dev (benchmarks/README.md, "Learned keypoint
selection"; docs/index.md, "Features per image").

Every candidate cell of every landmarks-dev image is extracted once with the shipped model
(`cells`: all pyramid levels, no limit, about 1 GB). A selection is a function that reorders an
image's cells (Features -> Features); each one gives a features table of the best 1000 cells
(`tables.derive`), which `delf-index evaluate`'s curve then truncates to every number asked,
fits, builds and ranks, for each codebook seed (the default ranking, leave-one-out mAP).

    python -m benchmarks.selection cells --workdir /tmp/sel
    python -m benchmarks.selection curve --workdir /tmp/sel --select l2norm levels grid oracle \\
        head=/tmp/runs/verified/attention.pt --max-features 1000 500 300 --seed 0 1 2

Selections: `l2norm` (the shipped ranking), `head=PATH` (an attention head from `delf-index
train`, applied to the cells' raw features: descriptor x L2 norm), `levels` (the best of each
pyramid level in turn, the extractor's `selection="levels"`), `levels-head=PATH` (a head's
order within each level, the levels in turn), `grid` (the best of each of 4 x 4 image regions in turn), `nms=IOU`
(the extractor's NMS on receptive-field boxes), `oracle` (cells that RANSAC verifies between
images of the same group first, an upper bound that knows the answers: in-sample, never a
candidate). Results: <workdir>/<selection>/eval/curve.md and <workdir>/selection.md.
"""

import argparse
import json
import os

import numpy as np

from benchmarks.landmarks import LANDMARKS, read_groups
from delf_index.pipelines import evaluate
from delf_index.runtime import storage, tables
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.extractor import nms

CANDIDATES = 1000  # cells kept per image in a selection's table: the curve's largest number
ORACLE_CELLS = 3000  # cells per image (best by L2 norm) matched for the oracle


def order_by(features, scores, n=CANDIDATES):
    """The best n features by `scores` (ties by position, as the extractor breaks them), their
    scores as the attention."""
    order = np.lexsort((features.x, features.y, features.scale, -scores))[:n]
    chosen = features.take(order)
    chosen.attention = scores[order].astype(np.float32)
    return chosen


def round_robin(features, groups, scores=None, n=CANDIDATES):
    """The best feature (by `scores`, default the L2 norm) of each group in turn, then the
    second of each, ...: `groups` [N] ints. The attention becomes the rank's complement, so
    that best-first order and truncation keep working."""
    scores = features.attention if scores is None else scores
    rank = np.zeros(len(features), np.int64)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        rank[members[np.argsort(-scores[members], kind="stable")]] = np.arange(len(members))
    order = np.lexsort((-scores, rank))[:n]
    chosen = features.take(order)
    chosen.attention = (1.0 - np.arange(len(order)) / max(len(features), 1)).astype(np.float32)
    return chosen


def select_levels(features, scores=None):
    return round_robin(features, np.unique(features.scale, return_inverse=True)[1], scores)


def select_grid(features, side=4):
    col = np.minimum((features.x / max(features.width, 1) * side).astype(int), side - 1)
    row = np.minimum((features.y / max(features.height, 1) * side).astype(int), side - 1)
    return round_robin(features, row * side + col)


def select_nms(features, iou, receptive_field=339.0):
    keep = nms(features.x, features.y, features.scale * receptive_field, iou, CANDIDATES)
    return features.take(keep)


def head_scorer(path):
    """Logits of an attention head (attention.pt of `delf-index train`) for Features whose
    attention is the L2 norm of their raw features (the shipped model's)."""
    import torch

    from delf_index.model.delf import AttentionHead

    state = torch.load(path, map_location="cpu", weights_only=True)
    norm = {"norm_weight": 0.0} if "norm_weight" in state else {}
    head = AttentionHead(state["conv1.weight"].shape[1], state["conv1.weight"].shape[0], **norm)
    head.load_state_dict(state)
    head.eval()

    def score(features):
        raw = torch.from_numpy(features.descriptors * features.attention[:, None]).float()
        with torch.no_grad():
            return head.logits(raw.T[None, :, :, None])[0, :, 0].numpy()

    return score


def oracle_marks(cells_table, workdir, root=LANDMARKS):
    """{image_id: bool [N] over its cells}: cells (among its best ORACLE_CELLS by L2 norm) that
    are RANSAC inliers with another image of its group; cached in workdir/oracle.npz."""
    cache = os.path.join(workdir, "oracle.npz")
    if os.path.exists(cache):
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}
    import torch

    from delf_index.indexing import verify
    from delf_index.model.cells import mutual_nearest

    group_of = dict(read_groups(root))
    feats = {i: f for i, f in tables.iter_features(cells_table) if group_of.get(i)}
    marks = {i: np.zeros(len(f), bool) for i, f in feats.items()}
    ids = sorted(feats)
    for k, a in enumerate(ids):
        for b in ids[k + 1 :]:
            if group_of[a] != group_of[b]:
                continue
            fa, fb = feats[a].take(slice(ORACLE_CELLS)), feats[b].take(slice(ORACLE_CELLS))
            matches = mutual_nearest(torch.from_numpy(fa.descriptors), torch.from_numpy(fb.descriptors))
            if len(matches) < 3:
                continue
            ma, mb = matches[:, 0], matches[:, 1]
            size, conf = (fb.width, fb.height), {"max_trials": 10000}
            scales = {"scales_a": fa.scale[ma], "scales_b": fb.scale[mb]}
            _, inliers = verify.ransac_affine(fa.keypoints[ma], fb.keypoints[mb], size, conf, **scales)
            if inliers.sum() >= 12:
                marks[a][matches[inliers, 0]] = True
                marks[b][matches[inliers, 1]] = True
        print(f"  oracle: {k + 1}/{len(ids)} images", flush=True)
    np.savez(cache, **marks)
    return marks


def selection(name, workdir, cells_table):
    """((image_id, Features) -> Features) of a selection's name."""
    kind, _, arg = name.partition("=")
    if kind == "l2norm":
        return lambda _, f: f.take(slice(CANDIDATES))
    if kind == "levels":
        return lambda _, f: select_levels(f)
    if kind == "grid":
        return lambda _, f: select_grid(f)
    if kind == "nms":
        return lambda _, f: select_nms(f, float(arg))
    if kind == "head":
        score = head_scorer(arg)
        return lambda _, f: order_by(f, score(f))
    if kind == "levels-head":  # a head's order within each level, the levels in turn
        score = head_scorer(arg)
        return lambda _, f: select_levels(f, score(f))
    if kind == "oracle":
        marks = oracle_marks(cells_table, workdir)
        # verified cells first, each part by L2 norm: the norm plus a constant above any norm
        return lambda i, f: order_by(f, f.attention + 1e3 * marks.get(i, np.zeros(len(f), bool)))
    raise SystemExit(f"unknown selection {name!r}")


def recorded(cells, name):
    """The extractor settings a selection's table records: the cells' with CANDIDATES features,
    and the extractor's own `selection` where it has one. Queries in the table need none;
    synthesized views of a query are extracted with these (L2 norm order for heads and the
    oracle)."""
    settings = {**tables.snapshot(cells).properties["extractor"], "max_features": CANDIDATES}
    return {**settings, "selection": "levels" if name == "levels" else "score"}


def folder_name(name):
    kind, _, arg = name.partition("=")
    if kind in ("head", "levels-head"):
        return f"{kind}-" + os.path.basename(os.path.dirname(os.path.abspath(arg)))
    return name.replace("=", "-")


def extract_cells(workdir, root=LANDMARKS):
    """workdir/cells: every candidate cell of every landmarks-dev image (the shipped model)."""
    manifest, _ = evaluate.groups_protocol(os.path.join(root, "groups.csv"), os.path.join(root, "images"))
    overrides = {"extract": {"extractor": {"max_features": 65535, "score_threshold": 0.0}}}
    conf = resolve_conf(overrides, evaluate.default_conf, "evaluate")
    return evaluate.extract_step(manifest, workdir, conf, None, None, False)


def run_curve(workdir, names, counts, seeds, root=LANDMARKS):
    """Each selection's table of its best CANDIDATES cells, then its curve; returns {name: rows}."""
    cells = os.path.join(workdir, "features")
    out = {}
    for name in names:
        folder = os.path.join(workdir, folder_name(name))
        table = os.path.join(folder, "features")
        if not tables.exists(table):
            select = selection(name, workdir, cells)
            tables.derive(cells, table, select, recorded(cells, name))
        out[name] = evaluate.curve(os.path.join(root, "images"), folder, counts, seeds,
                                   groups=os.path.join(root, "groups.csv"), conf={"ablation": False},
                                   features=table)  # fmt: skip
    return out


def summary(workdir):
    """workdir/selection.md: every selection's curve in one table."""
    lines = ["| selection | features/image | mAP (mean ± std over seeds) | per seed | bytes/image | s/query | "
             "k-NN s/query | verify s/query |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name, "eval", "curve.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for r in json.load(f):
                lines.append(
                    f"| {name} | {r['max_features']} | {r['mAP']:.4f} ± {r['mAP_std']:.4f} | "
                    f"{' / '.join(map(str, r['mAP_per_seed']))} | {r['bytes_per_image']:,} | "
                    f"{r['seconds_per_query']:.3f} | {r['knn_seconds_per_query']:.3f} | "
                    f"{r['verify_seconds_per_query']:.3f} |"
                )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "selection.md"), "w") as f:
        f.write(text)
    return text


def proxy(workdir, names, counts, root=LANDMARKS):
    """A quick screen of selections without the system: the mean share of an image's oracle
    cells (RANSAC-verified with its own group, oracle_marks) that a selection keeps among its
    best n; {name: {n: share}}."""
    cells = os.path.join(workdir, "features")
    marks = oracle_marks(cells, workdir, root)
    selects = {name: selection(name, workdir, cells) for name in names}
    shares = {name: {n: [] for n in counts} for name in names}
    for image_id, features in tables.iter_features(cells, set(marks)):
        if not marks[image_id].any():
            continue
        # which cell each kept feature is: a cell is its position and scale
        lookup = {(x, y, sc): k for k, (x, y, sc) in enumerate(zip(features.x, features.y, features.scale))}
        for name, select in selects.items():
            chosen = select(image_id, features)
            index = np.array([lookup[(x, y, sc)] for x, y, sc in zip(chosen.x, chosen.y, chosen.scale)])
            for n in counts:
                shares[name][n].append(marks[image_id][index[:n]].sum() / marks[image_id].sum())
    return {name: {n: round(float(np.mean(v)), 4) for n, v in per.items()} for name, per in shares.items()}


# -- selection learned from landmarks-dev's own match graph, cross-validated over groups -------------
def folds_of(root, k):
    """{group: fold} of landmarks-dev's groups: sorted by size (largest first, then name) and
    dealt to the k folds in turn, so that every fold gets large and small groups."""
    rows = read_groups(root)
    sizes = {}
    for _, g in rows:
        if g:
            sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: (-sizes[g], g))
    return {g: n % k for n, g in enumerate(order)}


def fold_match(match, folder, held_out):
    """A copy of a match output without the pairs that touch an image of `held_out` (image
    ids): what a head may learn from while those images are evaluated."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.join(folder, "pairs"), exist_ok=True)
    os.makedirs(os.path.join(folder, "clusters"), exist_ok=True)
    with open(os.path.join(match, "_SUMMARY.json")) as f:
        summary = f.read()
    with open(os.path.join(folder, "_SUMMARY.json"), "w") as f:
        f.write(summary)
    pairs = storage.read_parquet_rows(os.path.join(match, "pairs"))
    pairs = [r for r in pairs if r["image_a"] not in held_out and r["image_b"] not in held_out]
    clusters = storage.read_parquet_rows(os.path.join(match, "clusters"))
    pq.write_table(pa.Table.from_pylist(pairs), os.path.join(folder, "pairs", "part-0.parquet"))
    pq.write_table(pa.Table.from_pylist(clusters), os.path.join(folder, "clusters", "c.parquet"))
    return len(pairs)


def crossval(workdir, match, counts, seeds, k=3, train_conf=None, root=LANDMARKS):
    """`delf-index train --from-match` on landmarks-dev's own match graph, cross-validated: for
    each of k folds of the groups, a head learns from the pairs that touch no image of the
    fold, every image is selected by it, and only the fold's queries are scored. Returns
    {max_features: [mAP per seed]} over all queries, and writes workdir/crossval/crossval.json."""
    import pyarrow.parquet as pq

    from delf_index.model import train

    fold_of = folds_of(root, k)
    group_of = dict(read_groups(root))
    cells = os.path.join(workdir, "features")
    aps = {}  # (n, seed) -> [AP of each query]
    for fold in range(k):
        base = os.path.join(workdir, "crossval", f"fold{fold}")
        held_out = {i for i, g in group_of.items() if g and fold_of[g] == fold}
        pairs = fold_match(match, os.path.join(base, "match"), held_out)
        head = os.path.join(base, "run", "attention.pt")
        if not os.path.exists(head):
            conf = {"classification_weight": 0.0, "verified_weight": 1.0, **(train_conf or {})}
            train.train(None, os.path.join(base, "run"), conf, match=os.path.join(base, "match"))
        print(f"fold {fold}: {len(held_out)} held-out images, {pairs} training pairs", flush=True)
        table = os.path.join(base, "features")
        if not tables.exists(table):
            tables.derive(cells, table, selection(f"head={head}", workdir, cells), recorded(cells, "head"))
        evaluate.curve(os.path.join(root, "images"), base, counts, seeds, groups=os.path.join(root, "groups.csv"),
                       conf={"ablation": False}, features=table)  # fmt: skip
        for n in counts:
            for seed in seeds:
                rows = pq.read_table(os.path.join(base, f"n{n}", f"seed{seed}", "eval", "queries.parquet")).to_pylist()
                aps.setdefault((n, seed), []).extend(r["default|all|ap"] for r in rows if r["query"] in held_out)
    result = {n: [round(float(np.mean(aps[(n, s)])), 4) for s in seeds] for n in counts}
    with open(os.path.join(workdir, "crossval", "crossval.json"), "w") as f:
        json.dump({"folds": k, "mAP_per_seed": result, "queries": len(aps[(counts[0], seeds[0])])}, f, indent=1)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("cells", "curve", "proxy", "crossval", "summary"))
    parser.add_argument("--match", help="crossval: the `delf-index match` output of a landmarks-dev index")
    parser.add_argument("--train-conf", default="{}", help="crossval: training options, JSON")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--select", nargs="+", default=["l2norm"], help="selections (module docstring)")
    parser.add_argument("--max-features", type=int, nargs="+", default=[1000, 500, 300])
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    if args.command == "cells":
        extract_cells(args.workdir)
    elif args.command == "curve":
        run_curve(args.workdir, args.select, args.max_features, args.seed)
    elif args.command == "proxy":
        for name, shares in proxy(args.workdir, args.select, args.max_features).items():
            print(f"{name}: share of verified cells kept " + ", ".join(f"{n}: {v:.3f}" for n, v in shares.items()))
        return
    elif args.command == "crossval":
        conf = json.loads(args.train_conf)
        for n, maps in crossval(args.workdir, args.match, args.max_features, args.seed, train_conf=conf).items():
            print(f"from-match, cross-validated, {n} features: mAP {np.mean(maps):.4f} ± {np.std(maps):.4f} {maps}")
    print(summary(args.workdir))


if __name__ == "__main__":
    main()
