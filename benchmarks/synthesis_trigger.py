"""When view synthesis pays: each candidate signal of the plain ranking measured against what
synthesis did, on sets where it helps and sets where there is nothing to find (issue 35).

    delf-index evaluate --images $L/images --groups $L/groups.csv --workdir /tmp/lm0 --seed 0
    python -m benchmarks.synthesis_trigger --workdir /tmp/lm0 --out /tmp/trigger
    python -m benchmarks.synthesis_trigger --workdir /tmp/lm0 --out /tmp/trigger \\
        --uploads /tmp/synthesis-cost      # the held-out upload batch of benchmarks/synthesis_cost.py

Sets, each query ranked plainly (no expansion, no synthesis) and, where that verified
nothing, each rotation view ranked and verified alone, its features kept at each set of
pyramid levels of `LEVELS` (the view extracted once with every level, each feature tagged with
its level: a subset's features are the strongest of those levels, as an extraction with only
them gives):

- `landmarks`: landmarks-dev's leave-one-out queries (features from the workdir's table);
- `unmatched`: the same photos with their whole group left out: landmark photos with nothing
  to find (the negatives the rule is tuned on);
- `far`: the real far-apart pairs of landmarks-dev's groups (`far_pairs`): the query photo
  against the index without the rest of its group, the pair's other photo its one positive;
- `extreme`: the synthetic set of benchmarks/extreme_views.py (tilts and rolls);
- `uploads` (held out, with `--uploads`): scikit-image's photos and their mirror images
  against an index of 12 landmarks-dev photos; not used to choose anything.

The records (`--out`/records.json, reused when present) keep per query its signals, its plain
ranking and the rows each view verifies; `--report` then prints, for each signal and
threshold, how often the queries synthesis helped had it and how often queries with nothing
to find had it, and each rule replayed: mAP per set and views per query, as JSON lines.

Figures: benchmarks/README.md, "View synthesis where it pays (issue 35)".
"""

import argparse
import csv
import dataclasses
import json
import math
import os

import numpy as np

from benchmarks import extreme_views
from benchmarks.landmarks import LANDMARKS
from delf_index.indexing import metrics, synthesis, verify
from delf_index.indexing.retrieval import PLAIN, Index, verified_first
from delf_index.indexing.retrieval import default_conf as query_defaults
from delf_index.runtime.extractor import Extractor
from delf_index.runtime.tables import iter_features

# pyramid levels a view may be extracted at (the extractor's default: all seven)
LEVELS = {
    "all": (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0),
    "to 1.41": (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142),
    "to 1": (0.25, 0.3536, 0.5, 0.7071, 1.0),
    "0.5 to 1": (0.5, 0.7071, 1.0),
}
VIEWS = synthesis.STAGES["rotations"]
# a pair is far apart when the affine that verifies it tilts (ratio of its singular values) or
# turns (its closest rotation) at least this much, or when only a rotated view verifies it: on
# landmarks-dev seed 0, 2 % of the plain fits of same-group pairs tilt by 2.5 or more, 1 % turn
# by 30 degrees or more
FAR_TILT, FAR_TURN = 2.5, 30.0


def hough(qxy, dxy, bins=12):
    """The share of correspondence pairs whose relative turn (query segment to database
    segment) falls in the fullest of `bins` bins: 1 / bins when turns are random, near 1
    when the tentative matches agree on one rotation."""
    if len(qxy) < 6:
        return 0.0
    i, j = np.triu_indices(len(qxy), 1)
    dq, dd = qxy[j] - qxy[i], dxy[j] - dxy[i]
    turn = np.arctan2(dd[:, 1], dd[:, 0]) - np.arctan2(dq[:, 1], dq[:, 0])
    counts = np.bincount(((turn % (2 * np.pi)) / (2 * np.pi) * bins).astype(int) % bins, minlength=bins)
    return float(counts.max() / counts.sum())


def signals(index, features, prepared, ranked):
    """The candidate signals of one plain ranking (see the module docstring)."""
    order, rows = ranked["order"], ranked["order"][: index.conf["shortlist"]]
    glob, local = ranked["global"][order], ranked["local"][order]
    best = {"partial": 0, "partial_tilt": 1.0, "partial_turn": 0.0}
    correspondences, turns = 0, 0.0
    for rank, row in enumerate(rows):
        q, qxy, dxy, _, _ = index.correspondences(features, prepared["neighbours"], row)
        correspondences = max(correspondences, len(q))
        if rank < 5:
            turns = max(turns, hough(qxy, dxy))
        count, qin, din = index._verify(features, prepared, row)
        if 0 < count < index.conf["min_inliers"] and count > best["partial"]:
            tilt, turn = verify.fit_shape(qin, din)
            best = {"partial": count, "partial_tilt": tilt, "partial_turn": abs(turn)}
    finite = glob[np.isfinite(glob)]
    votes = np.sort(local)[::-1]
    return {
        **best,
        "correspondences": correspondences,
        "hough": turns,
        "top_global": float(finite.max(initial=0.0)),
        "global_gap": float(finite[0] - finite[1:11].mean()) if len(finite) > 1 else 0.0,
        "vote_top": float(votes[0]) if len(votes) else 0.0,
        "vote_share": float(votes[0] / max(votes.sum(), 1e-9)) if len(votes) else 0.0,
        "vote_ratio": float(votes[0] / max(votes[1], 1e-9)) if len(votes) > 1 else 0.0,
    }


def view_features(index, pixels, cache):
    """Each rotation view's features at every level, tagged with its level (cached as .npz)."""
    extractor = Extractor(conf={**index.extractor.conf, "max_features": 5000}, engine=index.extractor.engine)
    out = []
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    for tilt, phi in VIEWS:
        path = f"{cache}-{tilt:.0f}-{phi:.0f}.npz"
        if not os.path.exists(path):
            warped, affine = synthesis.view(pixels[0], tilt, phi, extractor.conf["max_image_size"])
            found = extractor(warped)
            level = np.argmin(np.abs(np.log(found.scale)[:, None] + np.log(LEVELS["all"])[None]), axis=1)
            np.savez(path, affine=affine, level=level, **dataclasses.asdict(found))
        with np.load(path) as data:
            fields = {f.name: data[f.name] for f in dataclasses.fields(synthesis.Features)}
            fields.update(width=int(fields["width"]), height=int(fields["height"]))
            out.append((synthesis.Features(**fields), data["affine"], data["level"]))
    return out


def at_levels(found, level, scales, keep):
    """The `keep` strongest features of a view among pyramid levels `scales`."""
    chosen = np.flatnonzero(np.isin(np.asarray(LEVELS["all"])[level], scales))[:keep]  # sorted by attention
    return dataclasses.replace(
        found,
        x=found.x[chosen],
        y=found.y[chosen],
        scale=found.scale[chosen],
        attention=found.attention[chosen],
        descriptors=found.descriptors[chosen],
    )


def views_record(index, views, pixels, features, exclude, levels=tuple(LEVELS)):
    """{levels name: {view name: {row: inliers}}}: what each view verifies, at each of `levels`."""
    h, w = pixels[0].shape[:2]
    out = {}
    for name, scales in ((name, LEVELS[name]) for name in levels):
        out[name] = {}
        for (_, phi), (found, affine, level) in zip(VIEWS, views):
            view = synthesis.map_back(at_levels(found, level, scales, index.conf["synthesis_features"]), affine, w, h)
            view = dataclasses.replace(view.rescaled(*pixels[1]), global_descriptor=features.global_descriptor)
            seen = index._rank(view, None, exclude, None, None, expand=False)
            out[name][f"{phi:.0f}"] = {int(r): int(seen["inliers"][r]) for r in np.flatnonzero(seen["inliers"])}
    return out


def record(index, query, features, pixels, cache, exclude, positives, views=None):
    """One query in one context (what it excludes, what its positives are); the views' rows
    where the plain ranking verified nothing (`views` None), always (True) or never (False:
    queries with nothing to find need only their signals)."""
    prepared = index.prepare(features)
    ranked = index._rank(features, None, exclude, prepared, None, expand=False)
    out = {k: query[k] for k in ("set", "id", "tilt", "rotation") if k in query}
    out.update(positives=positives, fused=ranked["fused"].tolist(), order=ranked["order"].tolist(),
               inliers=ranked["inliers"].tolist(), signals=signals(index, features, prepared, ranked))  # fmt: skip
    failed = ranked["inliers"].max(initial=0) < index.conf["min_inliers"]
    if views or (views is None and failed):  # every level where views may run, else (far pairs) all only
        levels = tuple(LEVELS) if failed else ("all",)
        out["views"] = views_record(index, view_features(index, pixels, cache), pixels, features, exclude, levels)
    return out


def pair_geometry(index, features, rows):
    """{row: [inliers, tilt, turn]} of the plain query against each of `rows` (any raw fit)."""
    prepared, out = index.prepare(features), {}
    for row in rows:
        count, qxy, dxy = index._verify(features, prepared, row)
        out[int(row)] = [count, *verify.fit_shape(qxy, dxy)] if count else [0, 1.0, 0.0]
    return out


def landmark_groups():
    with open(os.path.join(LANDMARKS, "groups.csv")) as f:
        return {r["image"]: r["group"] or None for r in csv.DictReader(f)}


def landmark_records(index, workdir, cache, views=True):
    """The `landmarks` and `unmatched` records of every grouped photo, the first with every
    view (None: only where nothing verified) and the geometry of the plain fit with each photo
    of its group (for `far_pairs`)."""
    groups = landmark_groups()
    names = [n for n, g in groups.items() if g]
    features = dict(iter_features(os.path.join(workdir, "features"), set(names)))
    out = []
    for n, name in enumerate(names):
        members = [o for o, g in groups.items() if g == groups[name] and o != name]
        pixels = index.query_pixels(os.path.join(LANDMARKS, "images", name))
        where = os.path.join(cache, name)
        rec = record(index, {"set": "landmarks", "id": name}, features[name], pixels, where, [name], members, views)
        rec["pairs"] = pair_geometry(index, features[name], [index.artifact.row_of[m] for m in members])
        out.append(rec)
        out.append(record(index, {"set": "unmatched", "id": name}, features[name], pixels, where, [name] + members, [],
                          False))  # fmt: skip
        print(f"  landmarks {n + 1}/{len(names)}", flush=True)
    return out


def distractor_records(index, workdir, cache):
    """landmarks-dev's distractors (indoor scenes, objects) against the index without any of
    them: photos unlike the index's places, with nothing to find."""
    groups = landmark_groups()
    names = [n for n, g in groups.items() if not g]
    features = dict(iter_features(os.path.join(workdir, "features"), set(names)))
    return [record(index, {"set": "distractors", "id": n}, features[n], None, os.path.join(cache, n), names, [], False)
            for n in names]  # fmt: skip


def far_pairs(records, image_ids, min_inliers):
    """Unordered pairs of a group far apart in viewpoint: the plain fit of either direction
    tilts by FAR_TILT or turns by FAR_TURN degrees, or only a rotated view verifies it."""
    pairs = set()
    for rec in (r for r in records if r["set"] == "landmarks"):
        by_view = {}
        for found in rec["views"]["all"].values():
            for row, count in found.items():
                by_view[int(row)] = max(by_view.get(int(row), 0), count)
        for row, (count, tilt, turn) in rec["pairs"].items():
            plain = count >= min_inliers and (tilt >= FAR_TILT or abs(turn) >= FAR_TURN)
            if plain or (count < min_inliers and by_view.get(int(row), 0) >= min_inliers):
                pairs.add(tuple(sorted((rec["id"], image_ids[int(row)]))))
    return sorted(pairs)


def far_records(index, workdir, cache, pairs):
    """Each far pair in both directions: the query against the index without the rest of its group."""
    groups = landmark_groups()
    features = dict(iter_features(os.path.join(workdir, "features"), {n for p in pairs for n in p}))
    out = []
    for a, b in pairs:
        for query, other in ((a, b), (b, a)):
            others = [o for o, g in groups.items() if g == groups[query] and o not in (query, other)]
            pixels = index.query_pixels(os.path.join(LANDMARKS, "images", query))
            out.append(record(index, {"set": "far", "id": f"{query} > {other}"}, features[query], pixels,
                              os.path.join(cache, query), [query] + others, [other]))  # fmt: skip
    return out


def image_records(index, queries, cache, label):
    """Records of queries given as image files ({"id", "uri", "positives", ...})."""
    out = []
    for n, query in enumerate(queries):
        pixels = index.query_pixels(query["uri"])
        features = index.query_features(pixels)
        where = os.path.join(cache, label + "-" + query["id"])
        out.append(record(index, {**query, "set": label}, features, pixels, where, [], query["positives"],
                          None if query["positives"] else False))  # fmt: skip
        if n % 20 == 0:
            print(f"  {label} {n + 1}/{len(queries)}", flush=True)
    return out


def replay(rec, image_ids, rule, levels="all", min_inliers=12):
    """(AP or None, views) of one record under `rule` (a test of its signals: synthesize or
    not, where the plain ranking verified nothing), the views at pyramid levels `levels`."""
    inliers, views = np.array(rec["inliers"]), 0
    if inliers.max(initial=0) < min_inliers and rule(rec["signals"]):
        views = len(VIEWS)  # queries with nothing to find keep no views: they change no AP
        for found in rec.get("views", {}).get(levels, {}).values():
            for row, count in found.items():
                if count >= min_inliers:
                    inliers[int(row)] = max(inliers[int(row)], count)
    order = verified_first(np.array(rec["order"]), np.array(rec["fused"]), inliers)
    scored = metrics.query_metrics([image_ids[r] for r in order], rec["positives"])
    return (scored["ap"] if scored else None), views


def outcomes(data):
    """Per record: (set, signals, eligible, helped): eligible when the plain ranking verified
    nothing, helped when every view at every level raised its AP."""
    out = []
    for rec in data["records"]:
        ids = data["image_ids"][rec["set"]]
        plain, _ = replay(rec, ids, lambda s: False)
        synthesized, _ = replay(rec, ids, lambda s: True)
        eligible = max(rec["inliers"], default=0) < 12
        out.append((rec["set"], rec["signals"], eligible, plain is not None and synthesized > plain + 1e-9))
    return out


TUNING, NEGATIVE = ("landmarks", "far", "extreme"), ("unmatched", "distractors", "uploads")
SIGNALS = ("partial", "partial_tilt", "partial_turn", "correspondences", "hough", "top_global", "global_gap",
           "vote_top", "vote_share", "vote_ratio")  # fmt: skip


def signal_table(data):
    """For each signal and threshold (the values the helped queries had, by deciles): the share
    of helped queries at or above it (per tuning set, and all), and of eligible queries with
    nothing to find (unmatched: tuning; uploads: held out)."""
    done = outcomes(data)
    helped = [(s, sig) for s, sig, _, h in done if h and s in TUNING]
    for name in SIGNALS if helped else ():
        values = np.array([sig[name] for _, sig in helped])
        for threshold in sorted(set(np.round(np.quantile(values, np.linspace(0, 0.9, 10)), 4))):
            row = {"signal": name, "at least": float(threshold)}
            for label in TUNING:
                chosen = [sig[name] >= threshold for s, sig in helped if s == label]
                row[f"helped {label}"] = f"{sum(chosen)}/{len(chosen)}"
            row["helped all"] = round(float(np.mean(values >= threshold)), 3)
            for label in NEGATIVE:
                chosen = [sig[name] >= threshold for s, sig, eligible, _ in done if s == label and eligible]
                row[label] = f"{sum(chosen)}/{len(chosen)}"
            print(json.dumps(row), flush=True)


def rule_table(data, rules, levels=("all",)):
    """Each rule replayed: mAP per tuning set, the share of each set's queries synthesized and
    the views per query."""
    for name, rule in rules.items():
        for level in levels:
            row = {"rule": name, "levels": level}
            for label in TUNING + NEGATIVE:
                recs = [r for r in data["records"] if r["set"] == label]
                if not recs:
                    continue
                done = [replay(r, data["image_ids"][label], rule, level) for r in recs]
                aps = [ap for ap, _ in done if ap is not None]
                if aps:
                    row[f"mAP {label}"] = round(float(np.mean(aps)), 4)
                row[f"synthesized {label}"] = round(float(np.mean([v > 0 for _, v in done])), 3)
            print(json.dumps(row), flush=True)


def collect(args, cache, data):
    """`data` with the records of the sets asked for that it lacks (see the module docstring)."""
    index = Index.load(os.path.join(args.workdir, "index"), conf=PLAIN)
    ids, have = list(index.artifact.image_ids), {r["set"] for r in data["records"]}
    records, image_ids = data["records"], data["image_ids"]
    image_ids.update({s: ids for s in ("landmarks", "unmatched", "far", "extreme", "distractors")})
    known = os.path.exists(args.pairs or "")
    if "landmarks" in args.sets and "landmarks" not in have:
        records += landmark_records(index, args.workdir, cache, None if known else True)
    if "landmarks" in args.sets and "far" not in have:
        if known:
            with open(args.pairs) as f:
                pairs = [tuple(p) for p in json.load(f)]
        else:
            pairs = far_pairs(records, ids, index.conf["min_inliers"])
            if args.pairs:
                with open(args.pairs, "w") as f:
                    json.dump(pairs, f)
        records += far_records(index, args.workdir, cache, pairs)
    if "distractors" in args.sets and "distractors" not in have:
        records += distractor_records(index, args.workdir, cache)
    if "extreme" in args.sets and "extreme" not in have:
        extreme = extreme_views.build_queries(os.path.join(args.out, "extreme"), 1)
        records += image_records(index, extreme, cache, "extreme")
    if args.uploads and "uploads" not in have:
        from benchmarks import synthesis_cost

        uploads = Index.load(os.path.join(args.uploads, "index"), conf=PLAIN)
        paths = synthesis_cost.upload_paths(args.uploads)
        records += image_records(uploads, [{"id": os.path.basename(u), "uri": u, "positives": []} for u in paths],
                                 cache, "uploads")  # fmt: skip
        image_ids["uploads"] = list(uploads.artifact.image_ids)
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a landmarks-dev workdir of `delf-index evaluate`")
    parser.add_argument("--out", required=True, help="records.json and the extreme set's queries go here")
    parser.add_argument("--cache", help="the views' features (default: --out/views; the same for every seed)")
    parser.add_argument("--sets", nargs="*", default=["landmarks", "distractors", "extreme"],
                        choices=["landmarks", "distractors", "extreme"],
                        help="landmarks: the landmarks, unmatched and far sets")  # fmt: skip
    parser.add_argument("--pairs", help="JSON of the far pairs: read when present, else found and written")
    parser.add_argument("--uploads", help="the workdir of benchmarks/synthesis_cost.py (held-out uploads)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(LANDMARKS, "groups.csv")):
        raise SystemExit(f"needs landmarks-dev at {LANDMARKS}")
    path = os.path.join(args.out, "records.json")
    os.makedirs(args.out, exist_ok=True)
    data = {"image_ids": {}, "records": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    count = len(data["records"])
    data = collect(args, args.cache or os.path.join(args.out, "views"), data)
    if len(data["records"]) > count:
        with open(path, "w") as f:
            json.dump(data, f)
    signal_table(data)
    rule_table(data, RULES, tuple(LEVELS))
    budget_table(data, "to 1.41")


TURN, GLOBAL, VOTES = (query_defaults[k] for k in ("synthesis_turn", "synthesis_global", "synthesis_votes"))


def turned(s):
    return s["partial"] > 0 and s["partial_turn"] >= TURN


RULES = {  # the default's rule (Index.wants_views), its parts and what else was tried
    "every query that verified nothing (issue 28)": lambda s: True,
    "any partial fit": lambda s: s["partial"] > 0,
    "partial fit turned by synthesis_turn": turned,
    "global neighbour at synthesis_global": lambda s: s["top_global"] >= GLOBAL,
    "local score at synthesis_votes": lambda s: s["vote_top"] >= VOTES,
    "global neighbour and local score": lambda s: s["top_global"] >= GLOBAL and s["vote_top"] >= VOTES,
    "default: turned fit, or global neighbour and local score": lambda s: (
        turned(s) or (s["top_global"] >= GLOBAL and s["vote_top"] >= VOTES)
    ),
    "none": lambda s: False,
}


def promise(s):
    """Index.wants_views' promise, from the recorded signals."""
    return (s["partial"] if turned(s) else 0) + s["vote_top"]


def budget_table(data, levels):
    """Each set searched as one batch under the default rule and each budget: mAP and the
    share synthesized (the most promising first, as search's SynthesisBudget takes them)."""
    rule = RULES["default: turned fit, or global neighbour and local score"]
    for share in (0.05, 0.1, 0.2, 1.0):
        row = {"budget": share, "levels": levels}
        for label in TUNING:
            recs = [r for r in data["records"] if r["set"] == label]
            wanted = sorted((-promise(r["signals"]), r["id"]) for r in recs
                            if max(r["inliers"], default=0) < 12 and rule(r["signals"]))  # fmt: skip
            chosen = {i for _, i in wanted[: math.floor(share * len(recs) + 1e-9)]}
            done = [replay(r, data["image_ids"][label], lambda s, r=r, c=chosen: r["id"] in c, levels) for r in recs]
            row[f"mAP {label}"] = round(float(np.mean([ap for ap, _ in done if ap is not None])), 4)
            row[f"synthesized {label}"] = round(len(chosen) / max(len(recs), 1), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
