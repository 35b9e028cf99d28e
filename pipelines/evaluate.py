"""`delf-index evaluate`: extract -> fit -> build -> every query -> metrics and a report.

    delf-index evaluate --images ../shared/data/landmarks-dev/images \
        --groups ../shared/data/landmarks-dev/groups.csv --workdir /tmp/eval
    delf-index evaluate --images data/roxford5k/jpg --gnd data/roxford5k/gnd_roxford5k.pkl --workdir /tmp/rox
    # features per image as a curve, each number over three codebook seeds (eval/curve.md)
    delf-index evaluate --images ... --groups ... --workdir /tmp/curve --max-features 1000 500 300 --seed 0 1 2
    delf-index evaluate --images ... --groups ... --workdir /tmp/t --features gs://b/features   # a table as it is

Protocols:

- ``--groups groups.csv`` (``image,group``; an empty group marks a distractor): leave one
  out, as landmarks-dev's SOURCES.md describes. Every grouped image is a query once, the
  database is every other image, the positives are the rest of its group.
- ``--gnd file.pkl``: Revisited Oxford/Paris ground truth (revisitop: imlist, qimlist, per
  query bbx, easy, hard, junk). Queries are cropped to their box; Easy, Medium and Hard are
  scored as revisitop does. This reads a pickle: only pass files you trust.

From Python:

    from delf_index.pipelines import evaluate
    summary = evaluate.run("landmarks-dev/images", "/tmp/eval", groups="landmarks-dev/groups.csv",
                           conf={"fit": {"seed": 1}, "query": {"shortlist": 50}})

Scores are revisitop's (indexing/metrics.py): mAP over the full ranking, mP@k, R@1. Outputs
in --workdir/eval: metrics.json, report.md (with the ablation of the ranking stages, a
precision-recall plot and the worst queries), queries.parquet. A step's outputs in --workdir
are reused when its inputs and settings are the same as what made them: extraction is
incremental over the image list (only new and changed images; another model or other
extraction settings start the tables again), codebooks and the index are made again when
the features or the fit settings changed; --fresh recomputes everything. The last line
printed on stdout is a one-line JSON summary (not with -q, which prints only errors).

Several ``--max-features`` or ``--seed`` make a curve (`curve`): the images are extracted
once, at the largest number; each smaller number is a table derived from that one by keeping
every image's best features (what extracting with it gives: tests/test_curve.py), and each
(number, seed) is evaluated in --workdir/n{N}/seed{S}. eval/curve.md and curve.json give, per
number, mAP as mean ± standard deviation over the seeds, the index's bytes per image and the
seconds per query of k-NN voting and of verification. A point already measured from the same
table and settings is not measured again.
"""

import csv
import html
import json
import logging
import os
import pickle
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from matplotlib.figure import Figure

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import codebooks as cb
from delf_index.indexing import metrics
from delf_index.indexing.retrieval import Index, expansion_presets, presets
from delf_index.indexing.retrieval import default_conf as query_defaults
from delf_index.indexing.shards import METHODS
from delf_index.indexing.versions import current_entry, current_manifest
from delf_index.pipelines import build, cli, extract, fit, match, visualize
from delf_index.runtime import console, progress, storage, tables
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.extractor import SELECTIONS, load_model, recorded_settings
from delf_index.runtime.extractor import default_conf as extractor_defaults
from delf_index.runtime.images import read_image
from delf_index.runtime.tables import iter_features
from delf_index.schemas.features import complete_settings

log = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)
FINAL = "default"  # the ranking whose scores are the summary: the query settings given
default_conf = {
    "extract": {},  # overrides of extract.default_conf
    "fit": {},  # overrides of indexing.codebooks.default_conf (seed, pq, ...)
    "query": {},  # overrides of indexing.retrieval.default_conf
    "ablation": True,  # also score each ranking stage alone (retrieval.presets)
    "augment": False,  # match the index against itself (--augment): graph expansion and DBA too
    "method": "knn",  # local ranking: knn (k-NN voting), asmk, or both: side by side and fused (ranking_configs)
}


# -- ground truth --------------------------------------------------------------------------
def absolute(images):
    """Local image folders as absolute paths: the manifest written for `extract` resolves
    relative paths against its own folder, not the working directory."""
    return images if "://" in images else os.path.abspath(images)


def groups_protocol(groups_csv, images):
    """Leave-one-out queries of a groups.csv: (manifest rows, queries)."""
    images = absolute(images)
    with open(groups_csv, newline="") as f:
        rows = [(r["image"], r.get("group") or None) for r in csv.DictReader(f)]
    manifest = [(name, os.path.join(images, name), group) for name, group in rows]
    queries = []
    for name, group in rows:
        if group:
            positives = [other for other, g in rows if g == group and other != name]
            queries.append({"id": name, "uri": os.path.join(images, name), "label": group,
                            "positives": {"all": positives}, "junk": {"all": []}, "exclude": [name]})  # fmt: skip
    return manifest, queries


def gnd_protocol(gnd_path, images):
    """Revisitop queries: (database manifest rows, queries with Easy/Medium/Hard sets)."""
    with open(gnd_path, "rb") as f:
        cfg = pickle.load(f)  # revisitop's format; documented exception to "no pickle"
    images = absolute(images)

    def path_of(name):
        for candidate in (os.path.join(images, name + ".jpg"), os.path.join(images, "jpg", name + ".jpg")):
            if os.path.exists(candidate) or "://" in images:
                return candidate
        return os.path.join(images, name + ".jpg")

    manifest = [(name, path_of(name), None) for name in cfg["imlist"]]
    queries = []
    for name, gnd in zip(cfg["qimlist"], cfg["gnd"]):
        easy = [cfg["imlist"][j] for j in gnd.get("easy", [])]
        hard = [cfg["imlist"][j] for j in gnd.get("hard", [])]
        junk = [cfg["imlist"][j] for j in gnd.get("junk", [])]
        queries.append(
            {
                "id": name,
                "uri": path_of(name),
                "bbx": [float(v) for v in gnd["bbx"]] if gnd.get("bbx") is not None else None,
                "positives": {"easy": easy, "medium": easy + hard, "hard": hard},
                "junk": {"easy": junk + hard, "medium": junk, "hard": junk + easy},
                "exclude": [],
            }
        )
    return manifest, queries


# -- queries as a Beam batch ---------------------------------------------------------------
class RunQueries(beam.DoFn):
    """Query -> per-query row: metrics of every protocol and configuration, top results."""

    def __init__(self, index_uri, configs, keep=10):
        self.index_uri, self.configs, self.keep = index_uri, configs, keep

    def setup(self):
        artifact = art.Artifact.load(self.index_uri)
        self.indexes = {name: Index(artifact, conf) for name, conf in self.configs.items()}
        # a stage of the ablation that the default already is (alpha-QE without a match
        # graph, say) is ranked once: {name: the earlier name with the same settings}
        first = {}
        self.same = {name: first.setdefault(json.dumps(index.conf, sort_keys=True), name)
                     for name, index in self.indexes.items()}  # fmt: skip

    def process(self, element):
        query, features = element
        image = query.get("uri")  # view synthesis extracts views of it, where a query needs them
        if features is None:  # a query image outside the database (revisitop): crop, extract
            image = read_image(query["uri"])
            if query.get("bbx"):
                x1, y1, x2, y2 = (int(round(v)) for v in query["bbx"])
                image = np.ascontiguousarray(image[max(0, y1) : y2, max(0, x1) : x2])
            features = next(iter(self.indexes.values())).query_features(image)
        row = {"query": query["id"], "label": query.get("label")}
        # the configurations of one local method differ only in the use_* switches: one k-NN
        # search (or one ASMK aggregation) serves them all
        prepared, prepare_seconds = {}, {}
        for index in self.indexes.values():
            if index.method not in prepared and len(features):
                start = time.perf_counter()
                if index.method == "both" and {"knn", "asmk"} <= set(prepared):  # what they prepared
                    prepared["both"] = {**prepared["knn"], **prepared["asmk"]}
                    prepare_seconds["both"] = prepare_seconds["knn"] + prepare_seconds["asmk"]
                    continue
                prepared[index.method] = index.prepare(features)
                prepare_seconds[index.method] = time.perf_counter() - start
        for name, index in self.indexes.items():
            if self.same[name] != name:
                row.update({key.replace(self.same[name], name, 1): value for key, value in row.items()
                            if key.startswith(f"{self.same[name]}|")})  # fmt: skip
                continue
            start, timings = time.perf_counter(), {}
            results = index.search(features, top_k=None, exclude=query["exclude"], with_matches=False,
                                   timings=timings, prepared=prepared.get(index.method), image=image)  # fmt: skip
            uses_local = index.conf["use_local"] or index.conf["use_verification"]
            seconds = time.perf_counter() - start + prepare_seconds.get(index.method, 0.0) * uses_local
            row[f"{name}|extractions"] = 1 + timings.get("synthesis_views", 0)
            row[f"{name}|synthesized"] = timings.get("synthesis_views", 0) > 0
            ranking = [r.image_id for r in results]
            for protocol, positives in query["positives"].items():
                m = metrics.query_metrics(ranking, positives, query["junk"][protocol], KAPPAS)
                row[f"{name}|{protocol}"] = m
            row[f"{name}|seconds"] = seconds
            knn = timings.get("local_s", 0.0) + prepare_seconds.get(index.method, 0.0) * uses_local
            row[f"{name}|stages"] = {"knn": knn, "verify": timings.get("verify_s", 0.0)}
            row[f"{name}|top"] = [(r.image_id, r.inliers, round(r.score, 4)) for r in results[: self.keep]]
            row[f"{name}|pr"] = precision_recall(ranking, query["positives"], query["junk"])
        yield row


RECALL_LEVELS = np.linspace(0, 1, 21)


def precision_recall(ranking, positives, junk, levels=RECALL_LEVELS):
    """Interpolated precision at recall levels, per protocol (for the report's plot)."""
    out = {}
    for protocol, pos in positives.items():
        pos, skip = set(pos), set(junk[protocol])
        if not pos:
            continue
        hits = np.array([item in pos for item in ranking if item not in skip], float)
        found = np.cumsum(hits)
        precision = found / np.arange(1, len(hits) + 1)
        recall = found / len(pos)
        out[protocol] = [float(precision[recall >= r].max()) if (recall >= r).any() else 0.0 for r in levels]
    return out


def query_elements(queries, features_uri, in_database):
    """(query, features or None) pairs: database queries take their stored features."""
    if not in_database:
        return [(q, None) for q in queries]
    wanted = {q["id"]: q for q in queries}
    return [(wanted[image_id], features) for image_id, features in iter_features(features_uri, set(wanted))]


# -- the batch -------------------------------------------------------------------------------
def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def write_manifest(rows, path):
    """The image list as an extract manifest."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "uri", "label"])
        writer.writerows([(i, u, label or "") for i, u, label in rows])


def summarise(rows, configs, protocols):
    """{config: {protocol: mean metrics}} over the queries that have positives."""
    out = {}
    for name in configs:
        out[name] = {}
        for protocol in protocols:
            per = [r[f"{name}|{protocol}"] for r in rows]
            out[name][protocol] = metrics.mean_metrics(per, KAPPAS)
        out[name]["seconds_per_query"] = float(np.mean([r[f"{name}|seconds"] for r in rows]))
        out[name]["extractions_per_query"] = float(np.mean([r.get(f"{name}|extractions", 1) for r in rows]))
        for stage in ("knn", "verify"):  # the local search (voting) and the verification, apart
            out[name][f"{stage}_seconds_per_query"] = float(np.mean([r.get(f"{name}|stages", {}).get(stage, 0.0)
                                                                     for r in rows]))  # fmt: skip
        out[name]["synthesized"] = float(np.mean([r.get(f"{name}|synthesized", False) for r in rows]))
    return out


def run(images, workdir, groups=None, gnd=None, conf=None, model=None, beam_options=None, fresh=False,
        features=None):  # fmt: skip
    """Evaluate retrieval on a collection: extract, fit, build, every query, metrics and a
    report under `workdir`. Ground truth: `groups` (groups.csv, leave-one-out) or `gnd`
    (revisitop .pkl). `features`: a features table to evaluate as it is, instead of extracting
    into `workdir` (e.g. a table `curve` derived). Returns the summary dict (also logged as
    the last line, JSON)."""
    if (groups is None) == (gnd is None):
        raise UserError("give the ground truth as groups (groups.csv) or gnd (revisitop .pkl), one of them")
    conf = resolved(conf)
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    in_database = groups is not None
    manifest, queries = groups_protocol(groups, images) if in_database else gnd_protocol(gnd, images)
    protocols = list(queries[0]["positives"]) if queries else []
    timings = {}
    start = time.time()
    if features is None:
        features = extract_step(manifest, workdir, conf, model, beam_options, fresh)
    timings["extract_s"] = time.time() - start
    index = index_steps(features, workdir, conf, beam_options, fresh, timings)
    stages = {**presets, **(expansion_presets if conf["augment"] else {})} if conf["ablation"] else {}
    stages[FINAL] = {}
    query_conf = {**query_defaults, **conf["query"]}
    configs = ranking_configs(conf["method"], stages, query_conf)
    start = time.time()
    rows = query_step(queries, features, index, configs, protocols, in_database, workdir, beam_options)
    timings["queries_s"] = time.time() - start
    scores = summarise(rows, configs, protocols)
    report(workdir, rows, scores, configs, protocols, timings, len(manifest))
    report_html(workdir, rows, scores, configs, protocols, queries, {i: u for i, u, _ in manifest})
    main_protocol = "medium" if "medium" in protocols else protocols[0]
    final = scores[FINAL][main_protocol]
    summary = {key: round(final[key], 4) for key in ("mAP", "mP@5", "R@1")}
    summary["queries"] = final["queries"]
    if conf["method"] == "both":
        summary["ASMK mAP"] = round(scores[f"ASMK {FINAL}"][main_protocol]["mAP"], 4)
        summary["k-NN + ASMK mAP"] = round(scores[f"k-NN + ASMK {FINAL}"][main_protocol]["mAP"], 4)
    made_from = made_of(features, conf)
    record = {"summary": summary, "protocol": main_protocol, "scores": scores, "timings": timings,
              "index": index_size(index), "query": query_conf, "made_from": made_from}  # fmt: skip
    with open(os.path.join(workdir, "eval", "metrics.json"), "w") as f:
        json.dump(record, f, indent=1)
    log.info(f"report: {os.path.join(workdir, 'eval', 'report.html')} (and report.md)", extra=console.SUMMARY)
    log.info(json.dumps(summary), extra=console.SUMMARY)  # the last line, which scripts read
    return summary


def extract_step(manifest, workdir, conf, model, beam_options, fresh):
    """workdir/features, extracted incrementally over the image list: only what is new or
    changed since the last evaluation; another model or other settings start it again."""
    # the workdir's table follows the image list: images left out of it are deleted, however many
    extract_conf = resolve_conf({"max_change": None, **conf["extract"]}, extract.default_conf, "extract",
                                parts=extract.EXTRACTOR)  # fmt: skip
    _, _, fingerprint = load_model(model)
    features = os.path.join(workdir, "features")
    done = read_json(os.path.join(features, "_SUMMARY.json")) or {}
    stored_settings = recorded_settings({**extractor_defaults, **(extract_conf["extractor"] or {})})
    same = (done.get("model_fingerprint"), complete_settings(done.get("extractor"))) == (fingerprint, stored_settings)
    if fresh or not same or tables.is_legacy(features):
        storage.remove(features)  # another model, other settings or an old format: start the table again
    write_manifest(manifest, os.path.join(workdir, "manifest.csv"))
    extract.run(os.path.join(workdir, "manifest.csv"), features, extract_conf, model, beam_options)
    return features


def index_steps(features, workdir, conf, beam_options, fresh, timings):
    """workdir/codebooks and workdir/index (and the match graph with `augment`), each made
    again only when its inputs or settings differ from what made it; returns the index."""
    fit_conf = resolve_conf(conf["fit"], cb.default_conf, "fit", cb.presets)
    # the table version fit and build last finished with (steps.json): an interrupted run redoes them
    state = {"table_version": tables.snapshot(features).version, "table": features}
    steps_file = os.path.join(workdir, "steps.json")
    finished = (read_json(steps_file) or {}) if not fresh else {}
    start = time.time()
    codebooks = os.path.join(workdir, "codebooks")
    done = (read_json(os.path.join(codebooks, "codebooks.json")) or {}).get("conf", {})
    # resolved by fit from the corpus size; k-NN voting does not use ASMK's words, so codebooks
    # fitted with them serve --method knn as they are (the same PCA and PQ from the same seed)
    unchecked = {k for k in ("nlist", "asmk_words") if fit_conf[k] in (None, "auto")}
    unchecked |= {"asmk_words"} if conf["method"] == "knn" else set()
    redo = finished.get("fit") != state or any(done.get(k) != v for k, v in fit_conf.items() if k not in unchecked)
    redo = redo or (fit_conf["asmk_words"] == "auto" and not done.get("asmk_words"))  # words wanted, none fitted
    if redo:
        fit.run(features, codebooks, fit_conf, beam_options)
        write_json(steps_file, {"fit": state})
    timings["fit_s"] = time.time() - start
    start = time.time()
    index = os.path.join(workdir, "index")
    built = current_manifest(index) if current_entry(index) is not None else None
    if redo or built is None or built.get("method", "knn") != conf["method"] or finished.get("build") != state:
        build.run(features, index, codebooks=codebooks, beam_options=beam_options, method=conf["method"])
        write_json(steps_file, {"fit": state, "build": state})
    timings["build_s"] = time.time() - start
    if conf["augment"] and (redo or not current_manifest(index).get("augmented")):
        match.run(index, os.path.join(workdir, "match"), conf={"sheet": False}, beam_options=beam_options, augment=True)
    return index


def query_step(queries, features, index, configs, protocols, in_database, workdir, beam_options):
    """Every query ranked under every configuration (a Beam batch): the per-query rows, a
    query that could not be ranked scoring 0."""
    elements = query_elements(queries, features, in_database)
    missing = len(queries) - len(elements)
    if missing:
        log.warning("%d queries have no features (see the failed records of %s) and score 0", missing, features)
    flags, _ = cli.beam_flags(beam_options)
    folder = os.path.join(workdir, "eval", "_progress")
    watched = progress.watching(folder, len(elements), "evaluate", "queries")
    with watched, beam.Pipeline(options=PipelineOptions(flags)) as p:
        results = (
            p
            | "Queries" >> beam.Create(elements)
            | "Redistribute" >> beam.Reshuffle()
            | "Progress" >> beam.ParDo(extract.CountProgress(folder))
            | "Search" >> beam.ParDo(RunQueries(index, configs))
        )
        results | "Collect" >> beam.combiners.ToList() | "Write" >> beam.Map(write_rows, os.path.join(workdir, "eval"))
    rows = read_json(os.path.join(workdir, "eval", "rows.json"))
    answered = {r["query"] for r in rows}
    return rows + [failed_row(q, configs, protocols) for q in queries if q["id"] not in answered]  # AP 0


def index_size(index):
    """Images, descriptors and bytes per image of the current version of an index: the parts
    that grow with the collection (local lists and geometry, global descriptors), not the
    codebooks."""
    manifest = current_manifest(index)
    images = max(manifest["counts"]["images"], 1)
    local = sum(manifest["bytes"].values())
    globals_ = manifest["files"].get("global.faiss", {}).get("bytes", 0)
    return {"images": manifest["counts"]["images"], "descriptors": manifest["counts"]["descriptors"],
            "bytes_per_image": (local + globals_) / images, "local_bytes_per_image": local / images}  # fmt: skip


def curve(images, workdir, max_features=(1000, 500, 300), seeds=(0, 1, 2), groups=None, gnd=None, conf=None,
          model=None, beam_options=None, fresh=False, features=None):  # fmt: skip
    """Quality, size and speed of the ranking at several numbers of features per image, each
    over several codebook seeds. The images are extracted once, at the largest number, into
    workdir/features; each smaller number is a table derived from it (workdir/n{N}/features)
    by keeping every image's best N features, which is what extraction with that
    max_features gives (features come sorted by score). Each (N, seed) is then evaluated in
    workdir/n{N}/seed{S}. `features`: a table to start from instead of extracting (its
    images hold at least the largest number of features, best first). Writes
    workdir/eval/curve.json and curve.md; returns the curve's rows, one per N (mean and
    standard deviation of mAP over the seeds, bytes per image, seconds per query)."""
    counts = sorted({int(n) for n in max_features}, reverse=True)
    if not counts or counts[-1] < 1 or not seeds:
        raise UserError(f"a curve needs numbers of features of at least 1 and seeds, got {max_features} and {seeds}")
    conf = resolve_conf(conf, default_conf, "evaluate")
    extract_conf = {**conf["extract"], "extractor": {**conf["extract"].get("extractor", {}), "max_features": counts[0]}}
    manifest, _ = groups_protocol(groups, images) if gnd is None else gnd_protocol(gnd, images)
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    source = features or extract_step(manifest, workdir, {**conf, "extract": extract_conf}, model, beam_options, fresh)
    extracted_with = tables.snapshot(source).properties["extractor"].get("max_features")
    if extracted_with is not None and counts[0] > extracted_with:
        raise UserError(f"{source} was extracted with {extracted_with} features per image: it cannot give {counts[0]}")
    rows = []
    for n in counts:
        table = source if n == extracted_with else truncated_table(source, os.path.join(workdir, f"n{n}"), n)
        points = []
        for seed in seeds:
            point = os.path.join(workdir, f"n{n}", f"seed{seed}")
            point_conf = {**conf, "extract": extract_conf, "fit": {**conf["fit"], "seed": seed}}
            done = read_json(os.path.join(point, "eval", "metrics.json")) or {}
            if fresh or made_of(table, resolved(point_conf)) != done.get("made_from"):  # else measured already
                run(images, point, groups, gnd, point_conf, model, beam_options, fresh, features=table)
            points.append(read_json(os.path.join(point, "eval", "metrics.json")))
        rows.append(curve_row(n, seeds, points))
    write_json(os.path.join(workdir, "eval", "curve.json"), rows)
    with open(os.path.join(workdir, "eval", "curve.md"), "w") as f:
        f.write(curve_markdown(rows))
    log.info(f"curve: {os.path.join(workdir, 'eval', 'curve.md')}", extra=console.SUMMARY)
    return rows


def resolved(conf):
    """evaluate's settings: `conf` over default_conf, with ASMK's visual words fitted ("auto")
    where the method needs them; what `run` measures with and `curve` compares."""
    conf = resolve_conf(conf, default_conf, "evaluate")
    if conf["method"] not in METHODS:
        raise UserError(f"method {conf['method']!r}: use one of {METHODS}")
    if conf["method"] != "knn" and not conf["fit"].get("asmk_words"):
        conf["fit"] = {**conf["fit"], "asmk_words": "auto"}
    return conf


def made_of(features, conf):
    """What a point's metrics were measured from: the table, its version and the settings after
    extraction (the table stands for those), as JSON reads it back."""
    made = {"table": features, "table_version": tables.snapshot(features).version,
            "conf": {k: v for k, v in conf.items() if k != "extract"}}  # fmt: skip
    return json.loads(json.dumps(made))


def truncated_table(source, folder, n):
    """folder/features: `source` with each image's best `n` features, derived again whenever
    `source` has a newer version than the one it was derived from."""
    target, marker = os.path.join(folder, "features"), os.path.join(folder, "derived.json")
    snap = tables.snapshot(source)
    made = {"source": source, "source_version": snap.version, "max_features": n}
    if read_json(marker) != made:
        storage.remove(target)
        settings = {**snap.properties["extractor"], "max_features": n}
        tables.derive(source, target, lambda _, features: features.take(slice(n)), settings)
        os.makedirs(folder, exist_ok=True)
        write_json(marker, made)
    return target


def curve_row(n, seeds, points):
    """One row of the curve: the default ranking at `n` features over the seeds' metrics.json."""
    protocol = points[0]["protocol"]
    final = [p["scores"][FINAL] for p in points]
    maps = [f[protocol]["mAP"] for f in final]
    mean = lambda key: float(np.mean(key))  # noqa: E731
    return {
        "max_features": n,
        "seeds": list(seeds),
        "mAP_per_seed": [round(m, 4) for m in maps],
        "mAP": round(mean(maps), 4),
        "mAP_std": round(float(np.std(maps)), 4),
        "mP@5": round(mean([f[protocol]["mP@5"] for f in final]), 4),
        "R@1": round(mean([f[protocol]["R@1"] for f in final]), 4),
        "bytes_per_image": round(points[0]["index"]["bytes_per_image"]),
        "features_per_image": round(points[0]["index"]["descriptors"] / max(points[0]["index"]["images"], 1), 1),
        "seconds_per_query": round(mean([f["seconds_per_query"] for f in final]), 4),
        "knn_seconds_per_query": round(mean([f["knn_seconds_per_query"] for f in final]), 4),
        "verify_seconds_per_query": round(mean([f["verify_seconds_per_query"] for f in final]), 4),
    }


def curve_markdown(rows):
    lines = [
        "# Features per image: quality, size and speed of the default ranking",
        "",
        f"mAP: mean ± standard deviation over codebook seeds {rows[0]['seeds']}; bytes per image: local lists, "
        "geometry and global descriptor; s/query: the ranking with the query's features from the table "
        "(k-NN voting and verification apart, the query's extraction not counted).",
        "",
        "| features/image | mAP | per seed | mP@5 | R@1 | bytes/image | s/query | k-NN s/query | verify s/query |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['max_features']} | {r['mAP']:.4f} ± {r['mAP_std']:.4f} | {' / '.join(map(str, r['mAP_per_seed']))}"
            f" | {r['mP@5']:.3f} | {r['R@1']:.3f} | {r['bytes_per_image']:,} | {r['seconds_per_query']:.3f}"
            f" | {r['knn_seconds_per_query']:.3f} | {r['verify_seconds_per_query']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def ranking_configs(method, stages, query_conf):
    """{row name: query conf}: the `stages` of one local method, or with --method both, k-NN
    voting's, ASMK's ("ASMK ...") and both fused ("k-NN + ASMK ..."); the global-only ranking,
    the expansion and synthesis stages once, with k-NN voting."""
    if method != "both":
        return {name: {**query_conf, "local_method": method, **stage} for name, stage in stages.items()}
    configs = {name: {**query_conf, "local_method": "knn", **stage} for name, stage in stages.items()}
    for method, prefix in (("asmk", "ASMK "), ("both", "k-NN + ASMK ")):
        for name, stage in stages.items():
            if name == FINAL or name in ("local voting only", "fused", "fused + verification"):
                name = prefix + name.replace("local voting", "local")
                configs[name] = {**query_conf, "local_method": method, **stage}
    return configs


def failed_row(query, configs, protocols):
    row = {"query": query["id"], "label": None}
    for name in configs:
        for protocol in protocols:
            row[f"{name}|{protocol}"] = (
                metrics.query_metrics([], query["positives"][protocol]) if query["positives"][protocol] else None
            )
        row[f"{name}|seconds"], row[f"{name}|top"], row[f"{name}|pr"] = 0.0, [], {}
    return row


def write_rows(rows, folder):
    with open(os.path.join(folder, "rows.json"), "w") as f:
        json.dump(rows, f)


def report(work, rows, scores, configs, protocols, timings, database_size):
    """metrics are in `scores`; this writes queries.parquet, pr.png and report.md."""
    folder = os.path.join(work, "eval")
    final = FINAL
    main_protocol = "medium" if "medium" in protocols else protocols[0]
    table = pa.table(
        {
            "query": [r["query"] for r in rows],
            **{
                f"{c}|{p}|{k}".replace(" ", "_"): [(r[f"{c}|{p}"] or {}).get(k) for r in rows]
                for c in configs
                for p in protocols
                for k in ("ap", "p@1", "p@5", "p@10", "r@1")
            },
            "top_image_ids": [[t[0] for t in r[f"{final}|top"]] for r in rows],
            "top_inliers": [[t[1] for t in r[f"{final}|top"]] for r in rows],
            "seconds": [r[f"{final}|seconds"] for r in rows],
        }
    )
    pq.write_table(table, os.path.join(folder, "queries.parquet"))
    plot_pr(rows, configs, main_protocol, os.path.join(folder, "pr.png"))
    lines = [
        "# delf-index evaluation",
        "",
        f"{len(rows)} queries against {database_size} database images; protocol `{main_protocol}`"
        + (f" (also {', '.join(p for p in protocols if p != main_protocol)})" if len(protocols) > 1 else "")
        + "; revisitop AP over the full ranking.",
        "",
        "| ranking | "
        + " | ".join(f"mAP {p}" for p in protocols)
        + " | mP@5 | R@1 | s/query | extractions/query | synthesized |",
        "| --- | " + " | ".join("---" for _ in protocols) + " | --- | --- | --- | --- | --- |",
    ]
    for name in configs:
        s = scores[name]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{s[p]['mAP']:.3f}" for p in protocols)
            + f" | {s[main_protocol]['mP@5']:.3f} | {s[main_protocol]['R@1']:.3f} | {s['seconds_per_query']:.3f}"
            + f" | {s['extractions_per_query']:.2f} | {s['synthesized']:.1%} |"
        )
    lines += ["", "![precision-recall](pr.png)", "", f"## Worst queries ({final}, {main_protocol})", ""]
    lines += ["| query | AP | top results (inliers) |", "| --- | --- | --- |"]
    scored = [r for r in rows if r[f"{final}|{main_protocol}"]]
    for r in sorted(scored, key=lambda r: r[f"{final}|{main_protocol}"]["ap"])[:10]:
        top = ", ".join(f"{i} ({n})" for i, n, _ in r[f"{final}|top"][:3])
        lines.append(f"| {r['query']} | {r[f'{final}|{main_protocol}']['ap']:.3f} | {top} |")
    lines += ["", "Step times (seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines))


def report_html(work, rows, scores, configs, protocols, queries, uri_of, worst=10, top=5):
    """eval/report.html: the ablation table, the precision-recall plot, and the worst queries
    as thumbnails with their top results, framed green (a positive) or red, inliers under
    each."""
    folder = os.path.join(work, "eval")
    protocol = "medium" if "medium" in protocols else protocols[0]
    header = ["ranking", *(f"mAP {p}" for p in protocols), "mP@5", "R@1", "s/query", "extractions/query",
              "synthesized"]  # fmt: skip
    table = [
        [name, *(f"{scores[name][p]['mAP']:.3f}" for p in protocols), f"{scores[name][protocol]['mP@5']:.3f}",
         f"{scores[name][protocol]['R@1']:.3f}", f"{scores[name]['seconds_per_query']:.3f}",
         f"{scores[name]['extractions_per_query']:.2f}", f"{scores[name]['synthesized']:.1%}"]
        for name in configs
    ]  # fmt: skip
    by_id = {q["id"]: q for q in queries}
    scored = sorted((r for r in rows if r[f"{FINAL}|{protocol}"]), key=lambda r: r[f"{FINAL}|{protocol}"]["ap"])
    shown = scored[:worst]
    query_uri = {r["query"]: by_id[r["query"]].get("uri") or uri_of.get(r["query"]) for r in shown}
    uris = list(query_uri.values()) + [uri_of[t[0]] for r in shown for t in r[f"{FINAL}|top"][:top] if t[0] in uri_of]
    thumbs = visualize.thumbnails(folder, [u for u in uris if u])
    parts = []
    for r in shown:
        positives = set(by_id[r["query"]]["positives"][protocol])
        tiles = [visualize.figure(thumbs.get(query_uri[r["query"]], ""), f"query {r['query']}", "query")]
        for image_id, inliers, _ in r[f"{FINAL}|top"][:top]:
            caption = f"{image_id}: {inliers} inliers" if inliers else f"{image_id}: not verified"
            tiles.append(
                visualize.figure(
                    thumbs.get(uri_of.get(image_id), ""), caption, "good" if image_id in positives else "bad"
                )
            )
        ap = r[f"{FINAL}|{protocol}"]["ap"]
        parts.append(f"<h3>{html.escape(r['query'])}: AP {ap:.3f}</h3><div class='row'>{''.join(tiles)}</div>")
    body = (
        f"<p>{len(rows)} queries against {len(uri_of)} images; protocol <code>{protocol}</code>; revisitop AP over "
        "the full ranking.</p>"
        + visualize.html_table(header, table, numeric=range(1, len(header)))
        + "<img src='pr.png' alt='precision-recall curves' style='max-width:600px'>"
        + f"<h2>The {len(shown)} worst queries ({FINAL})</h2><p>Green: a positive of the query; red: not.</p>"
        + "".join(parts)
    )
    return visualize.write_page(os.path.join(folder, "report.html"), "delf-index evaluation", body)


def plot_pr(rows, configs, protocol, path):
    # a Figure without pyplot: no global backend or state, safe in any process
    fig = Figure(figsize=(5, 4), dpi=120)
    ax = fig.subplots()
    for name in configs:
        curves = [r[f"{name}|pr"][protocol] for r in rows if protocol in r[f"{name}|pr"]]
        if curves:
            ax.plot(RECALL_LEVELS, np.mean(curves, axis=0), label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    parser = cli.Parser("evaluate", __doc__)
    parser.add_argument("--images", required=True, help="folder (or fsspec URI) of the images")
    truth = parser.add_mutually_exclusive_group(required=True)
    truth.add_argument("--groups", help="groups.csv (image,group): leave-one-out protocol")
    truth.add_argument("--gnd", help="revisitop ground truth .pkl (Easy / Medium / Hard)")
    parser.add_argument("--workdir", required=True, help="features, codebooks, index and eval/ go here")
    parser.add_argument("--model", help="int8 or float32 (shipped; default: int8 on CPUs), or an .onnx file")
    parser.add_argument("--no-ablation", action="store_true", help="score only the full ranking")
    parser.add_argument("--augment", action="store_true", help="match the index against itself: graph expansion, DBA")
    parser.add_argument("--fresh", action="store_true", help="recompute every step, reuse nothing")
    parser.add_argument(
        "--seed", type=int, nargs="+", help="seed of the codebook training (fit; default 0); several: mean and spread"
    )
    parser.add_argument(
        "--max-features",
        type=int,
        nargs="+",
        help="features kept per image (default 1000); several: a curve, extracted once (eval/curve.md)",
    )
    parser.add_argument("--features", help="evaluate this features table as it is, instead of extracting the images")
    parser.add_argument("--selection", choices=SELECTIONS, help="which features extraction keeps (default: score)")
    parser.add_argument(
        "--method", choices=METHODS, default="knn", help="local ranking: knn, asmk, or both side by side"
    )
    cli.add_ranking_arguments(parser)
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    seeds, counts = args.seed or [], args.max_features or []
    extractor = {"max_features": counts[0]} if len(counts) == 1 else {}
    extractor.update({"selection": args.selection} if args.selection else {})
    conf = {
        "extract": {"extractor": extractor},
        "fit": {"seed": seeds[0]} if len(seeds) == 1 else {},
        "query": cli.ranking_conf_from_args(args),
        "ablation": not args.no_ablation,
        "augment": args.augment,
        "method": args.method,
    }
    if len(seeds) > 1 or len(counts) > 1 or (args.features and counts):
        counts = counts or [extractor_defaults["max_features"]]
        curve(args.images, args.workdir, counts, seeds or [0], args.groups, args.gnd, conf, args.model,
              beam_options, args.fresh, args.features)  # fmt: skip
        return
    run(args.images, args.workdir, args.groups, args.gnd, conf, args.model, beam_options, args.fresh, args.features)
