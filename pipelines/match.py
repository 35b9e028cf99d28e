"""`delf-index match`: a collection against itself. The verified match graph of an index,
its clusters, and what the graph says about the images' labels (Beam).

    delf-index match --index gs://bucket/index --output gs://bucket/match
    delf-index match --index /data/index --output /data/match --labels noisy_labels.csv --min-inliers 15

From Python:

    from delf_index.pipelines import match
    summary = match.run("gs://bucket/index", "gs://bucket/match", conf={"top": 50})

Every image of the index is searched against the index, itself excluded, with its features
from the features table the index was built from, at the version it was built from (or the
current version of `features`): no extraction. The index version is pinned while the job
runs (indexing/versions.py, `pin`). Steps:
Queries -> Neighbours (the index loaded once per worker process) -> Pairs (each unordered
pair once, both directions' inliers and scores) -> Clusters (connected components over the
pairs with at least `min_inliers` inliers) and, when images have labels, the label report (indexing/graph.py) ->
sharded Parquet tables (schemas/search.py), _SUMMARY.json, and a contact sheet
(sheet/index.html) of the largest clusters and the most suspicious labels.
"""

import csv
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import expansion, graph
from delf_index.indexing.manifests import file_entries, read_file
from delf_index.indexing.retrieval import Index
from delf_index.indexing.retrieval import default_conf as query_defaults
from delf_index.indexing.versions import (
    commit_version,
    current_entry,
    current_manifest,
    current_version,
    new_version_name,
    pin_current,
    place_version,
    version_work_folder,
)
from delf_index.pipelines import cli, visualize
from delf_index.pipelines.build import DEFAULT_KEEP
from delf_index.pipelines.extract import CountProgress
from delf_index.pipelines.search import ReadQueries
from delf_index.pipelines.sharded_parquet import WriteShardedParquet, finalize
from delf_index.runtime import console, failpoints, lease, progress, storage, tables
from delf_index.runtime.conf import resolve_conf
from delf_index.schemas import search as schema
from delf_index.schemas.artifact import STAGING
from delf_index.version import __version__

log = logging.getLogger(__name__)

default_conf = {
    "top": 50,  # candidates per image: the best of the ranking, verified within the query's shortlist
    "query": {},  # overrides of indexing.retrieval.default_conf; its min_inliers (12) makes a pair
    # inliers that make an edge of the clusters and the label report: connected components chain
    # through any weak edge, so they need more proof than a ranking (measured on landmarks-dev:
    # adjusted Rand index 0.41 at 12, 0.86 at 20, 0.98 at 30; benchmarks/README.md)
    "min_inliers": 30,
    "keep": DEFAULT_KEEP,  # index versions kept when --augment publishes one (as build --keep)
    "sheet": True,  # write sheet/: PNGs and an HTML page of the largest clusters and the suspects
    "sheet_rows": 12,  # clusters and suspects shown
    "rows_per_shard": 100_000,  # rows per Parquet file
}
QUERY = {"query": ("query", query_defaults)}  # the nested conf (runtime.conf.resolve_conf)


def source_tables(index, manifest, features=None):
    """(data file uri, stale image_ids) of the live records of the features table version the
    index was built from (or of the current version of `features`, which must be that table
    at that version or a later one: artifact.check_source)."""
    if features is not None:
        snap, files = tables.live_tables(features)
        if not failpoints.broken("append-table-check"):
            art.check_source(index, manifest, snap)
        return [(uri, stale) for uri, _, stale in files]
    source = manifest.get("features")
    if not source:
        raise UserError("the index does not name the features table it was built from: pass --features")
    return [(uri, stale) for uri, _, stale in tables.live_tables(source["uri"], source["table_version"])[1]]


class VerifiedPairs(beam.PTransform):
    """(data file uri, image_ids to skip) of feature tables -> pairs-table rows (`pair_row`):
    each image read from the tables searched against the index at `index_uri`, its results
    verified, each unordered pair once. With `progress`, images are counted there."""

    def __init__(self, index_uri, conf, progress=None):
        super().__init__()
        self.index_uri, self.conf, self.progress = index_uri, conf, progress

    def expand(self, tables):
        queries = tables | "ReadQueries" >> beam.ParDo(ReadQueries()) | "SpreadQueries" >> beam.Reshuffle()
        if self.progress is not None:
            queries = queries | "Progress" >> beam.ParDo(CountProgress(self.progress))
        return (
            queries
            | "Neighbours" >> beam.ParDo(Neighbours(self.index_uri, self.conf, shared.Shared()))
            | "GroupPairs" >> beam.GroupByKey()
            | "Pairs" >> beam.FlatMap(pair_row)
        )


class Neighbours(beam.DoFn):
    """(query_id, uri, Features) -> ((a, b), (a_is_query, inliers, score)) for each of its
    results, a < b; images the index does not serve (dead rows, or not indexed) are skipped."""

    def __init__(self, index_uri, conf, handle):
        self.index_uri, self.conf, self.handle = index_uri, conf, handle
        self.searched = Metrics.counter("delf_index", "images_matched")

    def setup(self):
        self.index = self.handle.acquire(lambda: Index.load(self.index_uri, conf=self.conf["query"]))

    def process(self, element):
        query_id, _, features = element
        if query_id not in self.index.artifact.row_of:
            return
        results = self.index.search(features, top_k=self.conf["top"], exclude=[query_id], with_matches=False)
        self.searched.inc()
        for r in results:
            a, b = sorted((query_id, r.image_id))
            yield (a, b), (query_id == a, r.inliers, r.score)


def pair_row(element):
    """(pair, directional results) -> one pairs-table row, when verified in a direction."""
    (a, b), found = element
    row = {"image_a": a, "image_b": b, "inliers_ab": 0, "inliers_ba": 0, "score_ab": None, "score_ba": None}
    for a_is_query, inliers, score in found:
        side = "ab" if a_is_query else "ba"
        row[f"inliers_{side}"], row[f"score_{side}"] = inliers, score
    row["inliers"] = max(row["inliers_ab"], row["inliers_ba"])
    if row["inliers"] > 0:  # the index counts inliers only from min_inliers on
        yield row


def edges(pairs, min_inliers):
    return [(p["image_a"], p["image_b"]) for p in pairs if p["inliers"] >= min_inliers]


def cluster_rows(pairs, image_ids, labels, min_inliers):
    numbers, sizes = graph.clusters(image_ids, edges(pairs, min_inliers))
    return [
        {"image_id": i, "label": labels.get(i), "cluster": int(c), "cluster_size": int(s)}
        for i, c, s in zip(image_ids, numbers, sizes)
    ]


def read_labels(uri):
    """{image_id: label} of a CSV with image_id (or id) and label columns."""
    rows = list(csv.DictReader(storage.read_bytes(uri).decode().splitlines()))
    if not rows or not ({"image_id", "id"} & set(rows[0])) or "label" not in rows[0]:
        raise UserError(f"{uri} needs columns image_id (or id) and label")
    key = "image_id" if "image_id" in rows[0] else "id"
    return {r[key].strip(): (r["label"] or None) for r in rows if (r[key] or "").strip()}


def run(index, output, features=None, conf=None, labels=None, beam_options=None, test_pipeline=None, augment=False):
    """Match every image of `index` against it; tables and the contact sheet under `output`.
    `labels`: {image_id: label} or a CSV that replaces the index's labels (e.g. a label set to
    check). `augment`: also publish a new version of the index with the verified neighbour
    graph and the neighbour-augmented global descriptors (query expansion, DBA). Returns the
    summary (also in `output`/_SUMMARY.json)."""
    conf = resolve_conf(conf, default_conf, "match", parts=QUERY)
    flags, _ = cli.beam_flags(beam_options)
    output = output.rstrip("/")
    start = time.time()
    with pin_current(index, "match") as pinned:  # every worker reads this version, whatever builds meanwhile
        summary, uri_of, has_labels = match_version(index, pinned, output, features, conf, labels, flags, test_pipeline)
    if conf["sheet"]:
        summary["sheet"] = write_sheet(output, uri_of, conf["sheet_rows"], has_labels)
    if augment:
        pairs = storage.read_parquet_rows(posixpath.join(output, "pairs"))
        summary["augmented_version"] = augment_index(
            index, pairs, summary["index_version"], conf["keep"], matched_with(conf)
        )
    summary["seconds"] = round(time.time() - start, 1)
    log.info(
        f"match: {summary['images']} images, {summary['rows']['pairs']} verified pairs, "
        f"{summary['clusters']} clusters ({summary['largest_cluster']} images in the largest) -> {output} "
        f"({summary['seconds']}s)",
        extra=console.SUMMARY,
    )
    return summary


def labels_of(index, image_ids, index_labels, labels=None):
    """{image_id: label or None} of the index's images: those the index holds, or `labels` (a
    dict, or the URI of a CSV of them: read_labels) instead, for its images only."""
    if isinstance(labels, str):
        labels = read_labels(labels)
    if labels is None:
        return dict(zip(image_ids, index_labels))
    unknown = len(set(labels) - set(image_ids))
    if unknown:
        log.warning("%d labelled image_ids are not in %s: ignored", unknown, index)
    return {image_id: labels.get(image_id) for image_id in image_ids}


def match_version(index, pinned, output, features, conf, labels, flags, test_pipeline):
    """The Beam job of `run` on one version of an index: (summary, {image_id: uri}, whether
    the images have labels)."""
    manifest = current_manifest(pinned)
    image_ids, uris, index_labels = art.read_images(pinned)
    labels = labels_of(index, image_ids, index_labels, labels)
    sources = source_tables(index, manifest, features)
    metadata = {
        t: schema.table_metadata(t, manifest["version"], manifest["model_fingerprint"], conf)
        for t in ("pairs", "clusters", "label_images", "labels")
    }
    schemas = {
        "pairs": schema.PAIRS_SCHEMA,
        "clusters": schema.CLUSTERS_SCHEMA,
        "label_images": schema.LABEL_IMAGES_SCHEMA,
        "labels": schema.LABELS_SCHEMA,
    }
    schemas = {name: s.with_metadata(metadata[name]) for name, s in schemas.items()}
    keys = {
        "pairs": ("image_a", ("image_a", "image_b")),
        "clusters": ("image_id", ("image_id",)),
        "label_images": ("image_id", ("image_id",)),
        "labels": ("label", ("label",)),
    }
    has_labels = any(v is not None for v in labels.values())
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
    folder = posixpath.join(output, "_progress")
    with progress.watching(folder, len(image_ids), "match", "images"), pipeline as p:
        pairs = (
            p
            | "Tables" >> beam.Create(sources)
            | "SpreadTables" >> beam.Reshuffle()
            | "VerifiedPairs" >> VerifiedPairs(pinned, conf, folder)
        )
        every_pair = pairs | "AllPairs" >> beam.combiners.ToList()
        tables_out = {
            "pairs": pairs,
            "clusters": every_pair | "Clusters" >> beam.FlatMap(cluster_rows, image_ids, labels, conf["min_inliers"]),
        }
        if has_labels:
            report = every_pair | "LabelReport" >> beam.Map(
                lambda rows, n: graph.label_report(labels, edges(rows, n)), conf["min_inliers"]
            )
            tables_out["label_images"] = report | "PerImage" >> beam.FlatMap(lambda r: r[0])
            tables_out["labels"] = report | "PerLabel" >> beam.FlatMap(lambda r: r[1])
        written = {
            name: rows
            | f"Write{name.title().replace('_', '')}"
            >> WriteShardedParquet(
                posixpath.join(output, name), name, schemas[name], "", conf["rows_per_shard"], False, *keys[name]
            )
            for name, rows in tables_out.items()
        }
        (
            p
            | "Done" >> beam.Create([None])
            | "Finalize"
            >> beam.Map(
                _finalize,
                output=output,
                schemas=schemas,
                summary={
                    "index": index,
                    "index_version": manifest["version"],
                    "conf": conf,
                    "images": len(image_ids),
                    "delf_index_version": __version__,
                },  # fmt: skip
                **{f"written_{name}": beam.pvalue.AsList(w.written) for name, w in written.items()},
            )
        )
    summary = json.loads(storage.read_bytes(posixpath.join(output, "_SUMMARY.json")))
    return summary, dict(zip(image_ids, uris)), has_labels


def _finalize(_, output, schemas, summary, **written):
    written = {name[len("written_") :]: w for name, w in written.items()}
    files, rows = {}, {}
    for name, schema_ in schemas.items():
        if name in written:
            files[name] = finalize(posixpath.join(output, name), name, schema_, written[name], "")
            rows[name] = sum(w["rows"] for w in written[name])
    clusters = storage.read_parquet_rows(posixpath.join(output, "clusters"))
    summary = dict(
        summary,
        rows=rows,
        files=files,
        clusters=len({r["cluster"] for r in clusters}),
        largest_cluster=max((r["cluster_size"] for r in clusters), default=0),
        clustered_images=sum(r["cluster_size"] > 1 for r in clusters),
    )
    storage.write_bytes(posixpath.join(output, "_SUMMARY.json"), json.dumps(summary, indent=1, sort_keys=True).encode())


def write_sheet(output, uri_of, rows, has_labels):
    """The contact sheet: the largest clusters and, with labels, the most suspicious images
    with the neighbours that outvote their label."""
    clusters = storage.read_parquet_rows(posixpath.join(output, "clusters"))
    members = {}
    for r in sorted(clusters, key=lambda r: r["image_id"]):
        members.setdefault(r["cluster"], []).append(r["image_id"])
    biggest = [c for c in sorted(members) if len(members[c]) > 1][:rows]
    sections = [
        (
            "Largest clusters",
            "clusters.png",
            [(f"cluster {c}: {len(members[c])} images", [uri_of[i] for i in members[c][:10]]) for c in biggest],
        )
    ]
    if has_labels:
        reported = storage.read_parquet_rows(posixpath.join(output, "label_images"))
        suspects = sorted((r for r in reported if r["suspicion"] > 0), key=lambda r: r["suspect_rank"])[:rows]
        pairs = storage.read_parquet_rows(posixpath.join(output, "pairs")) if suspects else []
        shown = []
        for s in suspects:
            mates = [
                p["image_b"] if p["image_a"] == s["image_id"] else p["image_a"]
                for p in pairs
                if s["image_id"] in (p["image_a"], p["image_b"])
            ]
            caption = (
                f"#{s['suspect_rank']} {s['image_id']}: label {s['label']}, its {s['neighbours']} verified "
                f"neighbours say {s['voted_label']} ({s['voted_share']:.0%})"
            )
            shown.append((caption, [uri_of[s["image_id"]]] + [uri_of[m] for m in mates[:7] if m in uri_of]))
        sections.append(("Labels the verified neighbours contradict", "suspects.png", shown))
    target = posixpath.join(output, "sheet")
    if storage.is_local(target):
        visualize.write_sheets(storage.local_path(target), sections)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            visualize.write_sheets(tmp, sections)
            storage.upload_folder(tmp, target, os.listdir(tmp))
    return posixpath.join(target, "index.html")


def matched_with(conf):
    """What a graph's pairs depend on, recorded in the manifest so that `update` searches its
    new images as the match did: candidates per image and the query options."""
    return {"top": conf["top"], "query": conf["query"]}


def augment_index(index, pairs, matched_version, keep=DEFAULT_KEEP, matched=None):
    """Publish a new version of `index`: the current one's files (hard links where the
    filesystem allows) plus the verified neighbour graph of `pairs` and the DBA global
    descriptors (indexing/expansion.py). Refuses when the index changed since it was matched.
    `matched`: the match settings (`matched_with`), recorded for `update`'s refreshes."""
    with lease.writing(index, "match --augment") as held:
        base = current_entry(index)
        if base["version"] != matched_version:
            raise UserError(f"{index} is at version {base['version']}, matched {matched_version}: match again")
        artifact = art.Artifact.load(index, verify=False)
        row = artifact.row_of
        triples = [
            (row[p["image_a"]], row[p["image_b"]], p["inliers"])
            for p in pairs
            if p["image_a"] in row and p["image_b"] in row
        ]
        neighbours = expansion.neighbour_graph(artifact.num_rows, triples)
        augmented = expansion.augmented_globals(artifact.global_index.reconstruct_n(0, artifact.num_rows), neighbours)
        version = new_version_name(base)
        work = version_work_folder(index, version)
        for name in artifact.manifest["files"]:
            if name not in (expansion.GRAPH_FILE, expansion.DBA_FILE):
                try:
                    os.link(os.path.join(artifact.folder, name), os.path.join(work, name))
                except OSError:  # another filesystem
                    shutil.copyfile(os.path.join(artifact.folder, name), os.path.join(work, name))
        expansion.write_graph(work, neighbours)
        expansion.write_dba(work, augmented)
        names = sorted(os.listdir(work))
        manifest = {
            **artifact.manifest,
            "version": version,
            "augmented": {
                "from_version": matched_version,
                "matched_version": matched_version,
                "pairs": len(triples),
                "conf": expansion.default_conf,
                "match": matched or matched_with(default_conf),
            },
            "files": file_entries(work, names),
        }
        with open(os.path.join(work, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        place_version(work, index, version)
        held.check()
        commit_version(index, version, base, keep, info={"operation": "augment", **manifest.get("features", {})})
    log.info("augmented %s: version %s with %d verified pairs", index, version, len(triples))
    return version


# -- update's refresh of the graph --------------------------------------------------------------
def refresh_graph(index, version_uri, beam_options=None, test_pipeline=None):
    """Give the placed, not yet published version `version_uri` of `index` (an append or a
    rebuild, by `update`) the match graph and DBA descriptors of the current version, brought
    up to date: its edges between images that stay (same image_id and run), the verified
    pairs of the images it did not hold (searched against `version_uri` as `match` searched,
    with their features from the table: no extraction), DBA computed again only for the rows
    whose DBA neighbours changed. Rewrites the version's manifest. Returns its "augmented"
    entry, or None when the current version holds no graph (nothing to refresh)."""
    start = time.time()
    base = current_manifest(index)
    recorded = base.get("augmented")
    if not recorded:
        return None
    # only the files the refresh needs: the launcher of a large index fetches no lists or codes
    current = current_version(index)
    manifest = json.loads(storage.read_bytes(posixpath.join(version_uri, "manifest.json")))
    old_keys, new_keys = row_keys(current, base), row_keys(version_uri, manifest)
    new_of_old, old_of_new = expansion.carried_rows(old_keys, new_keys)
    row_of = {key[0]: row for row, key in enumerate(new_keys) if key is not None}
    searched = [new_keys[row][0] for row in np.flatnonzero(old_of_new < 0) if new_keys[row] is not None]
    if "match" not in recorded:  # a graph of an earlier delf-index: match's defaults made it
        log.warning("the graph of %s does not record its match settings: refreshing with the defaults", index)
    conf = resolve_conf(recorded.get("match") or matched_with(default_conf), default_conf, "match", parts=QUERY)
    staging = posixpath.join(index.rstrip("/"), STAGING, f"{manifest['version']}-graph")
    pairs = search_images(version_uri, manifest, searched, conf, staging, beam_options, test_pipeline)
    triples = [(row_of[p["image_a"]], row_of[p["image_b"]], p["inliers"]) for p in pairs]
    old_graph = expansion.graph_from(io.BytesIO(read_file(current, base, expansion.GRAPH_FILE)))
    refreshed, counts = expansion.refreshed_graph(old_graph, new_of_old, len(new_keys), triples)
    globals_ = expansion.read_vectors(read_file(version_uri, manifest, "global.faiss"))
    old_dba = expansion.read_vectors(read_file(current, base, expansion.DBA_FILE))
    dba, recomputed = expansion.refreshed_dba(globals_, refreshed, old_dba, old_graph, new_of_old, old_of_new,
                                              recorded["conf"])  # fmt: skip
    entry = {
        **recorded,
        "from_version": base["version"],
        "matched_version": recorded.get("matched_version", recorded["from_version"]),
        "pairs": int(len(refreshed[1]) // 2),
        "refreshed": {"searched": len(searched), **counts, "dba_computed": len(recomputed),
                      "seconds": round(time.time() - start, 1)},
    }  # fmt: skip
    write_augmentation(version_uri, manifest, refreshed, dba, entry)
    log.info("refreshed the match graph of %s for %s: %s", base["version"], manifest["version"], entry["refreshed"])
    return entry


def row_keys(version, manifest):
    """(image_id, run) of each row of an index version, None for a dead one: a row's
    features. Reads only its image table and dead rows."""
    image_ids, runs, dead = art.indexed_images(version, manifest)
    dead = set(dead.tolist())
    return [None if row in dead else (i, r or "") for row, (i, r) in enumerate(zip(image_ids, runs))]


def query_files(manifest, image_ids):
    """(data file uri, image_ids to skip) of the files of the table a version was built from
    that hold the live features of `image_ids`, the skip leaving every other record out."""
    source = manifest["features"]
    snap = tables.snapshot(source["uri"], source["table_version"])
    records = snap.read(["image_id", "status", "run"])
    live = tables.live_records(records)
    wanted = live.filter(pc.is_in(live.column("image_id"), pa.array(sorted(image_ids), pa.string())))
    return [(uri, skip) for uri, _, skip in tables.file_skips(snap, records, wanted)]


def search_images(version_uri, manifest, image_ids, conf, staging, beam_options=None, test_pipeline=None):
    """The pairs-table rows (`pair_row`) of `image_ids` searched against the index version
    `version_uri`: match's query path (Beam; Neighbours) for these images only. The rows come
    back through one JSON object under `staging`, removed afterwards."""
    if not image_ids:
        return []
    flags, _ = cli.beam_flags(beam_options)
    found = posixpath.join(staging, "pairs.json")
    try:
        with test_pipeline or beam.Pipeline(options=PipelineOptions(flags)) as p:
            (
                p
                | "Tables" >> beam.Create(query_files(manifest, image_ids))
                | "VerifiedPairs" >> VerifiedPairs(version_uri, conf)
                | "AllPairs" >> beam.combiners.ToList()
                | "Write" >> beam.Map(lambda rows: storage.write_bytes(found, json.dumps(rows).encode()))
            )
        return json.loads(storage.read_bytes(found))
    finally:  # a failed search leaves nothing behind either
        storage.remove(staging)


def write_augmentation(version_uri, manifest, graph_, dba, entry):
    """Add the graph and DBA files to a placed version that is not published yet, and its
    manifest the "augmented" `entry` and their checksums (the manifest last: `commit_version`
    then records its digest)."""
    with tempfile.TemporaryDirectory() as tmp:
        expansion.write_graph(tmp, graph_)
        expansion.write_dba(tmp, dba)
        names = [expansion.GRAPH_FILE, expansion.DBA_FILE]
        files = {**manifest["files"], **file_entries(tmp, names)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({**manifest, "augmented": entry, "files": files}, f, indent=1, sort_keys=True)
        storage.upload_folder(tmp, version_uri, names + ["manifest.json"])


def main(argv=None):
    parser = cli.Parser("match", __doc__)
    parser.add_argument("--index", required=True, help="the index to match against itself")
    parser.add_argument("--output", required=True, help="tables and sheet/ go here")
    parser.add_argument("--features", help="the images' features table (default: the one the index was built from)")
    parser.add_argument("--labels", help="CSV of image_id,label replacing the index's labels")
    parser.add_argument("--top", type=int, default=default_conf["top"], help="candidates per image")
    parser.add_argument(
        "--min-inliers",
        type=int,
        help=f"inliers that make an edge of clusters and labels ({default_conf['min_inliers']})",
    )
    parser.add_argument("--no-sheet", action="store_true", help="write no contact sheet")
    parser.add_argument(
        "--augment", action="store_true", help="publish a version of the index with the graph and DBA (query expansion)"
    )
    parser.add_argument(
        "--keep", type=int, help=f"with --augment: index versions to keep ({DEFAULT_KEEP}); 0 keeps all"
    )
    cli.add_ranking_arguments(parser, flags={"min_inliers": "--pair-inliers"})  # the verified match that makes a pair
    cli.add_cache_argument(parser)
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    conf = {"top": args.top, "query": cli.ranking_conf_from_args(args), "sheet": not args.no_sheet}
    if args.min_inliers is not None:
        conf["min_inliers"] = args.min_inliers
    if args.keep is not None:
        conf["keep"] = args.keep
    run(args.index, args.output, args.features, conf, args.labels, beam_options, augment=args.augment)
