"""`delf-index search`: a batch of queries against an index, as a Beam job.

    delf-index search --input 'gs://bucket/uploads/2026-11-30/*.jpg' --index gs://bucket/index \
        --output gs://bucket/search/2026-11-30 --top 20
    delf-index search --input gs://bucket/features-uploads --index gs://bucket/index --output ...

From Python:

    from delf_index.pipelines import search
    summary = search.run("uploads/*.jpg", "gs://bucket/index", "/tmp/results", conf={"top": 20})

Queries are images (a glob, a folder, tar shards or a manifest, as extract takes them;
extracted with the index's model and settings) or a features table (its live records, not
extracted again). Steps: queries -> Search (the index loaded once per worker process,
shared by its threads) -> WriteResults / WriteErrors (sharded Parquet, schemas/search.py) ->
_SUMMARY.json. Every query ends up in exactly one of the two tables, and a rerun over the
same input writes the same rows to the same files. The job searches the version that was
current when it started, and pins it (indexing/versions.py, `pin`): pruning keeps it for as
long as the job runs.
"""

import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing.manifests import check_fingerprint
from delf_index.indexing.retrieval import Index, local_method
from delf_index.indexing.retrieval import default_conf as query_defaults
from delf_index.indexing.versions import current_manifest, pin_current
from delf_index.pipelines import cli, extract, visualize
from delf_index.pipelines.sharded_parquet import WriteShardedParquet, finalize
from delf_index.runtime import console, failpoints, inputs, progress, storage, tables
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.extractor import default_conf as extractor_defaults
from delf_index.runtime.extractor import load_model, model_of
from delf_index.schemas import search as search_schema
from delf_index.version import __version__

log = logging.getLogger(__name__)

default_conf = {
    "top": 10,  # results per query
    "query": {},  # overrides of indexing.retrieval.default_conf (knn, nprobe, shortlist, min_inliers, ...)
    "exclude_self": False,  # leave a query's own image_id out of its results (a collection against itself)
    "extract": {},  # image queries: overrides of extract.default_conf but the extractor's (the index's)
    "rows_per_shard": 100_000,  # result rows per Parquet file
    # view synthesis (docs/index.md): at most this share of the batch's queries is synthesized,
    # those with the most evidence that their match is in the index first; 1: every query that
    # wants views
    "synthesis_budget": 0.1,
}


class ReadQueries(beam.DoFn):
    """(data file uri, stale image_ids) -> (query_id, uri, Features) of its live records."""

    def process(self, element):
        uri, stale = element
        for table in tables.iter_batches(uri, None, skip=stale):
            uris = table.column("uri").to_pylist()
            for (image_id, features), query_uri in zip(tables.record_features(table), uris):
                yield image_id, query_uri, features


class Search(beam.DoFn):
    """(query_id, uri, Features) -> results-table rows; a query that fails goes to the errors
    table, one whose plain ranking wants view synthesis to "wanted" as (query_id, uri,
    Features, its plain rows, promise), and every query's (query_id, promise or None) to
    "budget". The index is loaded once per worker process and shared by its threads."""

    def __init__(self, index_uri, conf, handle):
        self.index_uri, self.conf, self.handle = index_uri, conf, handle
        self.searched = Metrics.counter("delf_index", "queries_searched")
        self.failed = Metrics.counter("delf_index", "queries_failed")

    def setup(self):
        self.index = self.handle.acquire(lambda: Index.load(self.index_uri, conf=self.conf["query"]))
        self.count, self.start, self.last_log = 0, time.time(), 0.0

    def process(self, element):
        query_id, uri, features = element
        timings = {}
        try:
            results = search_one(self.index, self.conf, query_id, uri, features, False, timings)
        except UserError as e:
            self.failed.inc()
            yield beam.pvalue.TaggedOutput("errors", error_row(query_id, uri, e))
            return
        self.searched.inc()
        self.count += 1
        if time.time() - self.last_log > 30:
            self.last_log = time.time()
            log.info("%d queries searched (%.1f/s)", self.count, self.count / max(self.last_log - self.start, 1e-9))
        rows = result_rows(query_id, uri, results)
        promise = timings["synthesis_promise"] if timings.get("synthesis_wanted") else None
        yield beam.pvalue.TaggedOutput("budget", (query_id, promise))
        if promise is None:
            yield from rows
        else:
            yield beam.pvalue.TaggedOutput("wanted", (query_id, uri, features, rows, promise))


class Synthesize(beam.DoFn):
    """(query_id, uri, Features, plain rows, promise) of a query that wants view synthesis ->
    its results-table rows: searched again with views when the batch's budget has room for it
    (`SynthesisBudget`'s last chosen query is not before it), else its plain rows; the views
    each synthesized query took go to "views"."""

    def __init__(self, index_uri, conf, handle):
        self.index_uri, self.conf, self.handle = index_uri, conf, handle
        self.synthesized = Metrics.counter("delf_index", "queries_synthesized")

    def setup(self):
        self.index = self.handle.acquire(lambda: Index.load(self.index_uri, conf=self.conf["query"]))

    def process(self, element, budget):
        query_id, uri, features, rows, promise = element
        if budget["last"] is None or (-promise, query_id) > budget["last"]:
            yield from rows
            return
        timings = {}
        try:
            results = search_one(self.index, self.conf, query_id, uri, features, True, timings)
        except UserError as e:  # the plain ranking stood: its rows stand
            log.warning("view synthesis of %s failed: %s", query_id, e)
            yield from rows
            return
        self.synthesized.inc()
        yield beam.pvalue.TaggedOutput("views", timings.get("synthesis_views", 0))
        yield from result_rows(query_id, uri, results)


class SynthesisBudget(beam.CombineFn):
    """(query_id, promise or None) of every query of the batch -> {"wanted": the queries that
    want views, "last": (-promise, query_id) of the last the budget takes, None if none}: the
    most promising first (ties by query_id, so that a rerun takes the same), at most `share`
    of all the queries."""

    def __init__(self, share):
        self.share = share

    def create_accumulator(self):
        return 0, []

    def add_input(self, accumulator, element):
        count, wanted = accumulator
        query_id, promise = element
        if promise is not None:
            wanted.append((-promise, query_id))
        return count + 1, wanted

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return sum(c for c, _ in accumulators), [w for _, wanted in accumulators for w in wanted]

    def extract_output(self, accumulator):
        count, wanted = accumulator
        chosen = sorted(wanted)[: math.floor(self.share * count + 1e-9)]
        return {"wanted": len(wanted), "last": chosen[-1] if chosen else None}


def search_one(index, conf, query_id, uri, features, synthesize, timings):
    """The results of one query of the batch (`Index.search` with the job's settings)."""
    exclude = [query_id] if conf["exclude_self"] else ()
    return index.search(features, top_k=conf["top"], exclude=exclude, with_matches=False, timings=timings,
                        image=uri, synthesize=synthesize)  # fmt: skip


def result_rows(query_id, uri, results):
    """The results-table rows of one query (one row of rank 0 when it had nothing to rank)."""
    if not results:
        return [{"query_id": query_id, "query_uri": uri, "rank": 0}]
    return [{"query_id": query_id, "query_uri": uri, "rank": rank, "image_id": r.image_id, "score": r.score,
             "global_score": r.global_score, "local_score": r.local_score, "inliers": r.inliers}
            for rank, r in enumerate(results, 1)]  # fmt: skip


def error_row(query_id, uri, error):
    return {"image_id": query_id, "uri": uri, "stage": "search", "error": str(error)[:2000]}


def search_batch(queries, index_uri, conf):
    """(query_id, uri, Features) -> (results-table rows, errors-table rows, the budget's
    choice, (queries synthesized, views)): `Search`, then `Synthesize` for the queries that
    want views, within the batch's `SynthesisBudget`."""
    handle = shared.Shared()  # one index per worker process for both steps
    searched = queries | "Search" >> beam.ParDo(Search(index_uri, conf, handle)).with_outputs(
        "errors", "wanted", "budget", main="results"
    )
    budget = searched.budget | "Budget" >> beam.CombineGlobally(SynthesisBudget(conf["synthesis_budget"]))
    synthesized = searched.wanted | "Synthesize" >> beam.ParDo(
        Synthesize(index_uri, conf, handle), budget=beam.pvalue.AsSingleton(budget)
    ).with_outputs("views", main="results")
    views = synthesized.views | "OneQuery" >> beam.Map(lambda count: (1, count))
    views = views | "Views" >> beam.CombineGlobally(add_up)
    results = (searched.results, synthesized.results) | "AllResults" >> beam.Flatten()
    return results, searched.errors, budget, views


def add_up(pairs):
    """(queries synthesized, views) summed: CombineGlobally's function, on (1, views) of each
    synthesized query or on partial sums."""
    return tuple(sum(column) for column in zip((0, 0), *pairs))


def queries(p, input, conf, manifest, model=None, threads=None):
    """(query_id, uri, Features) of `input`, and failure records of images that could not be
    extracted: a features table is read, images extracted with the index's settings."""
    if tables.exists(input):
        snap, files = tables.live_tables(input)
        check_fingerprint(manifest["model_fingerprint"], snap.properties["model_fingerprint"], f"queries in {input}")
        found = (
            p
            | "QueryTables" >> beam.Create([(uri, stale) for uri, _, stale in files])
            | "SpreadTables" >> beam.Reshuffle()
            | "ReadQueries" >> beam.ParDo(ReadQueries())
        )
        return found, p | "NoExtractErrors" >> beam.Create([])
    if tables.is_legacy(input):
        raise tables.missing_table(input)
    extract_conf = resolve_conf(conf["extract"], extract.default_conf, "extract")
    extract_conf["extractor"] = {**extractor_defaults, **manifest["extractor"]}  # the index's
    items, listing_errors = extract.list_inputs(p, input)
    features, errors = extract.extract_features(items, inputs.input_kind(input), extract_conf, model, threads)
    found = features | "QueryFeatures" >> beam.MapTuple(lambda key, f: (key[0], key[1], f))
    return found, (errors, listing_errors) | "QueryListErrors" >> beam.Flatten()


def check_queries(index, manifest, snap, exclude_self):
    """Refuse, before any work, a table of queries that is the index's own table at an older
    version than the index names (a stale copy), or, with `exclude_self` (the collection
    against itself), any other table than the index's own. A table of other images (the
    day's uploads) is what search is for."""
    own = snap.table_id == (manifest.get("features") or {}).get("table_id")
    if (own or exclude_self) and not failpoints.broken("append-table-check"):
        art.check_source(index, manifest, snap)


def results_page(output, version, files, queries=50, top=5):
    """`output`/results.html: the first `queries` queries (by query_id) as thumbnails with their
    top results, verified ones framed green; the page and its thumbs/ folder are written
    locally and copied to `output` when it is remote. Returns the page's URI."""
    rows = []
    for uri in files:
        with storage.open_file(uri, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    ids = sorted({r["query_id"] for r in rows})[:queries]
    image_ids, uris, _ = art.read_images(version)
    uri_of = dict(zip(image_ids, uris))
    chosen = {
        q: sorted((r for r in rows if r["query_id"] == q and r["rank"]), key=lambda r: r["rank"])[:top] for q in ids
    }
    query_uri = {q: next(r["query_uri"] for r in rows if r["query_id"] == q) for q in ids}
    with tempfile.TemporaryDirectory() as folder:
        wanted = list(query_uri.values()) + [
            uri_of[r["image_id"]] for c in chosen.values() for r in c if r["image_id"] in uri_of
        ]
        thumbs = visualize.thumbnails(folder, wanted)
        parts = []
        for q in ids:
            tiles = [visualize.figure(thumbs[query_uri[q]], f"query {q}", "query")]
            for r in chosen[q]:
                caption = f"#{r['rank']} {r['image_id']}: " + (
                    f"{r['inliers']} inliers" if r["inliers"] else "not verified"
                )
                tiles.append(
                    visualize.figure(thumbs.get(uri_of.get(r["image_id"]), ""), caption, "good" * bool(r["inliers"]))
                )
            parts.append(f"<div class='row'>{''.join(tiles)}</div>")
        more = len({r["query_id"] for r in rows}) - len(ids)
        note = f"<p>The first {len(ids)} queries by id ({more} more in results/); green: verified.</p>"
        visualize.write_page(
            os.path.join(folder, "results.html"), f"delf-index search of {version}", note + "".join(parts)
        )
        if storage.is_local(output):
            shutil.copytree(folder, storage.local_path(output), dirs_exist_ok=True)
        else:
            names = ["results.html"] + [os.path.join("thumbs", n) for n in os.listdir(os.path.join(folder, "thumbs"))]
            storage.upload_folder(folder, output, names)
    return posixpath.join(output, "results.html")


def count_queries(input):
    """The queries of `input`, counted before the job (for its progress): a table's live
    records, or the listing's items (images, or tar shards)."""
    if tables.exists(input):
        return sum(rows for _, rows, _ in tables.live_tables(input)[1])
    items, unreadable = inputs.list_input(input)
    return None if inputs.input_kind(input) == "tar" else len(items) + len(unreadable)


def run(input, index, output, conf=None, model=None, beam_options=None, test_pipeline=None):
    """Search the index at `index` with every query of `input`; results and errors tables
    under `output`. Returns the summary (also in `output`/_SUMMARY.json)."""
    conf = resolve_conf(conf, default_conf, "search", parts={"query": ("query", query_defaults)})
    if conf["top"] < 1:
        raise UserError(f"top must be at least 1, not {conf['top']}")
    if not 0 <= conf["synthesis_budget"] <= 1:
        raise UserError(f"synthesis_budget is a share of the queries, from 0 to 1, not {conf['synthesis_budget']}")
    flags, threads = cli.beam_flags(beam_options)
    output = output.rstrip("/")
    with pin_current(index, f"search --input {input}") as version:  # every worker reads this version
        manifest = current_manifest(version)
        # refused here, not in every worker: a local method the index was not built with
        has = {"knn": "index.faiss" in manifest["files"], "asmk": "asmk_offsets.npy" in manifest["files"]}
        local_method(conf["query"].get("local_method"), has)
        if tables.exists(input):
            check_queries(index, manifest, tables.snapshot(input), conf["exclude_self"])
        else:
            model = model_of(manifest["model_fingerprint"], model)  # by default the index's own
            _, _, fingerprint = load_model(model)
            check_fingerprint(manifest["model_fingerprint"], fingerprint, "queries extracted with this model")
        meta = search_schema.table_metadata("results", manifest["version"], manifest["model_fingerprint"], conf)
        results_schema = search_schema.RESULTS_SCHEMA.with_metadata(meta)
        errors_schema = search_schema.ERRORS_SCHEMA.with_metadata({**meta, "delf_index.table": "errors"})
        start = time.time()
        pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
        folder = posixpath.join(output, "_progress")
        watched = progress.watching(folder, count_queries(input), "search", "queries")
        with watched, pipeline as p:
            found, failed = queries(p, input, conf, manifest, model, threads if test_pipeline is None else None)
            counted = found | "Progress" >> beam.ParDo(extract.CountProgress(folder))
            results, search_errors, budget, views = search_batch(counted, version, conf)
            results_out = results | "WriteResults" >> WriteShardedParquet(
                posixpath.join(output, "results"), "results", results_schema, "", conf["rows_per_shard"], False,
                "query_id", ("query_id", "rank"),
            )  # fmt: skip
            errors = (failed, search_errors) | "QueryErrors" >> beam.Flatten()
            errors_out = errors | "WriteErrors" >> WriteShardedParquet(
                posixpath.join(output, "errors"), "errors", errors_schema, "", per_image=False
            )
            (
                p
                | "Done" >> beam.Create([None])
                | "Finalize"
                >> beam.Map(
                    _finalize,
                    output=output,
                    schemas=(results_schema, errors_schema),
                    summary={
                        "input": input,
                        "index": index,
                        "index_version": manifest["version"],
                        "conf": conf,
                        "delf_index_version": __version__,
                    },  # fmt: skip
                    written_results=beam.pvalue.AsList(results_out.written),
                    written_errors=beam.pvalue.AsList(errors_out.written),
                    budget=beam.pvalue.AsSingleton(budget),
                    views=beam.pvalue.AsSingleton(views),
                    extracted=not tables.exists(input),
                )
            )
        summary = json.loads(storage.read_bytes(posixpath.join(output, "_SUMMARY.json")))
        summary["page"] = results_page(output, version, summary["results_files"])
    summary["seconds"] = round(time.time() - start, 1)
    share = summary["synthesized"] / max(summary["answered"], 1)
    log.info(
        f"search: {summary['queries']} queries: {summary['answered']} answered ({summary['results']} results), "
        f"{summary['failed']} failed; {summary['synthesized']} synthesized ({share:.0%}; "
        f"{summary['synthesis_wanted']} wanted views), {summary['extractions_per_query']:.2f} extractions per query "
        f"-> {output} ({summary['seconds']}s)",
        extra=console.SUMMARY,
    )
    return summary


def _finalize(_, output, schemas, summary, written_results, written_errors, budget, views, extracted):
    files = finalize(posixpath.join(output, "results"), "results", schemas[0], written_results, "")
    errors_files = finalize(posixpath.join(output, "errors"), "errors", schemas[1], written_errors, "")
    results = sum(w["rows"] for w in written_results)
    answered = sum(w["keys"] for w in written_results)  # a query's results share one shard
    failed = sum(w["rows"] for w in written_errors)
    summary = dict(
        summary,
        queries=answered + failed,
        answered=answered,
        failed=failed,
        results=results,
        results_files=files,
        errors_files=errors_files,
        # view synthesis: the queries that wanted views, those the budget let have them, and
        # extractions per answered query (its own, when the queries were images, and its views)
        synthesis_wanted=budget["wanted"],
        synthesized=views[0],
        views=views[1],
        extractions_per_query=round((answered * extracted + views[1]) / max(answered, 1), 3),
    )
    storage.write_bytes(posixpath.join(output, "_SUMMARY.json"), json.dumps(summary, indent=1, sort_keys=True).encode())


def main(argv=None):
    parser = cli.Parser("search", __doc__)
    parser.add_argument(
        "--input", required=True, help="images (glob, folder, tar shards, manifest) or a features table"
    )
    parser.add_argument("--index", required=True, help="the index to search (any fsspec URI)")
    parser.add_argument("--output", required=True, help="results and errors tables go here")
    parser.add_argument("--top", type=int, default=default_conf["top"], help="results per query")
    parser.add_argument("--exclude-self", action="store_true", help="leave each query's own image_id out")
    parser.add_argument("--model", help="the model the index was built from (default: found by its fingerprint)")
    parser.add_argument(
        "--local-method",
        choices=("knn", "asmk", "both"),
        help="local ranking of an index built with both: either, or both fused (default: knn)",
    )
    parser.add_argument("--no-verification", action="store_true", help="rank without geometric verification")
    parser.add_argument(
        "--synthesis-budget",
        type=float,
        default=default_conf["synthesis_budget"],
        help="the share of the queries view synthesis may take, those with the most evidence first "
        f"({default_conf['synthesis_budget']}; 1: every query that wants views)",
    )
    cli.add_ranking_arguments(parser)
    cli.add_cache_argument(parser)
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    query = cli.ranking_conf_from_args(args)
    if args.local_method is not None:
        query["local_method"] = args.local_method
    if args.no_verification:
        query["use_verification"] = False
    conf = {"top": args.top, "exclude_self": args.exclude_self, "query": query,
            "synthesis_budget": args.synthesis_budget}  # fmt: skip
    run(args.input, args.index, args.output, conf, args.model, beam_options)
