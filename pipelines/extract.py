"""`delf-index extract`: images in object storage -> Parquet feature and error tables (Beam).

    delf-index extract --input 'gs://bucket/photos/**/*.jpg' --output gs://bucket/features
    delf-index extract --input 's3://bucket/gldv2/images_*.tar' --output s3://bucket/feat
    delf-index extract --input train.csv --output /data/features --workers 8

From Python (the same job; `conf` overrides `default_conf`, or name a preset):

    from delf_index.pipelines import extract
    summary = extract.run("gs://bucket/photos/*.jpg", "gs://bucket/features",
                          conf={"extractor": {"max_features": 500}}, beam_options={"workers": 4})

Steps: ListInputs -> Redistribute -> ReadAndDecode -> Extract (RunInference, one onnxruntime
session per worker process) -> ToRows -> WriteFeatures / WriteErrors (sharded Parquet) ->
Finalize (_SUMMARY.json). Every input image ends up in exactly one of the two tables.
Any other argument goes to Beam (``--runner DataflowRunner --project ... --region ...``);
without one, the job runs locally on Beam's FnApiRunner with ``--workers`` processes.
"""

import argparse
import datetime
import json
import logging
import os
import posixpath
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
from apache_beam.options.pipeline_options import PipelineOptions

from delf_index.errors import UserError
from delf_index.pipelines import cli, inputs
from delf_index.pipelines.sharded_parquet import WriteShardedParquet, finalize
from delf_index.runtime import storage
from delf_index.runtime.extractor import Extractor, load_model, recorded_settings
from delf_index.runtime.extractor import default_conf as extractor_defaults
from delf_index.runtime.images import DEFAULT_MAX_PIXELS, ImageError, decode_for_extraction
from delf_index.runtime.tables import iter_batches, list_tables, open_table, output_root, superseded, table_info
from delf_index.schemas import features as table_schema

log = logging.getLogger(__name__)

default_conf = {
    "extractor": {},  # overrides of the extractor's default_conf (runtime/extractor.py)
    "descriptor_dtype": "float16",  # how local descriptors are stored (float16 or float32)
    "rows_per_shard": 1000,  # images per Parquet file (about 200 MB with the default model)
    "batch_size": 4,  # images per RunInference batch
    "max_pixels": DEFAULT_MAX_PIXELS,  # refuse larger images from their header (bombs)
}

presets = {
    "default": {},  # the official DELF procedure on images shrunk to 1024 px (as DELG's configs)
    "delf-v1": {"extractor": {"max_image_size": None}},  # DELF v1: no size limit
}


def resolve_conf(conf=None):
    """`default_conf` updated by `conf` (a dict or a preset's name); the extractor part is
    complete (the extractor's defaults filled in), so that tables record every setting."""
    if isinstance(conf, str):
        if conf not in presets:
            raise UserError(f"unknown extract preset {conf!r}; presets: {sorted(presets)}")
        conf = presets[conf]
    conf = dict(conf or {})
    unknown = set(conf) - set(default_conf)
    if unknown:
        raise UserError(f"unknown extract options {sorted(unknown)}; known: {sorted(default_conf)}")
    extractor = conf.pop("extractor", {}) or {}
    unknown = set(extractor) - set(extractor_defaults)
    if unknown:
        raise UserError(f"unknown extractor options {sorted(unknown)}; known: {sorted(extractor_defaults)}")
    if conf.get("descriptor_dtype", "float16") not in table_schema.DESCRIPTOR_DTYPES:
        raise UserError(f"descriptor_dtype must be one of {sorted(table_schema.DESCRIPTOR_DTYPES)}")
    return {**default_conf, **conf, "extractor": {**extractor_defaults, **extractor}}


def counter(name):
    """A Beam counter in delf-index's namespace (docs/pipelines.md lists them)."""
    return Metrics.counter("delf_index", name)


def read_counters(result):
    """{name: value} of a finished pipeline's delf_index counters ({} where the runner reports none)."""
    if result is None:
        return {}
    try:
        found = result.metrics().query(MetricsFilter().with_namespace("delf_index"))["counters"]
    except Exception:  # some runners do not report metrics
        return {}
    totals = {}
    for c in found:
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    return totals


DECISIONS = ("new", "changed", "removed", "retried", "recomputed", "unchanged")  # what a run did with each listed item


def new_run_id():
    """A run id that sorts in time order: UTC to the microsecond."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


class ListInputs(beam.DoFn):
    """--input -> image items (image_id, uri, label, size, version), or tar shard items
    (uri, size, version)."""

    def process(self, spec):
        kind = inputs.input_kind(spec)
        if kind == "manifest":
            items = inputs.read_manifest(spec)
        elif kind == "tar":
            items = inputs.list_shards(spec)
        else:
            items = inputs.list_images(spec)
        if not items:
            raise UserError(f"--input {spec} matched nothing")
        log.info("input %s: %d %s", spec, len(items), "tar shards" if kind == "tar" else "images")
        yield from items


def with_stat(item):
    """A manifest item with the size and version of its object (unless the manifest said)."""
    image_id, uri, label, size, version = item
    if size is None and uri:
        size, version = inputs.stat(uri)
    return image_id, uri, label, size, version


class ReadState(beam.DoFn):
    """(table uri, stale image_ids) of an earlier run -> (key, state) of its live rows."""

    def __init__(self, kind):
        self.kind = kind

    def process(self, element):
        uri, stale = element
        ok = "/errors/" not in uri
        columns = ["image_id", "uri", "run", "source_size", "source_version"]
        present = [c for c in columns if c in open_table(uri).schema_arrow.names]  # version 1: no run, no source
        for table in iter_batches(uri, present, rows=10_000, skip=stale):
            get = {c: table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in columns}
            for image_id, uri_, run, size, version in zip(*(get[c] for c in columns)):
                key = (uri_ or "").split("#")[0] if self.kind == "tar" else image_id
                yield key, {"image_id": image_id, "run": run or "", "size": size, "version": version, "ok": ok}


def decide(now, before, run, full=False, retry_errors=False):
    """What a run does with one key (an image, or a tar shard): the items to extract, the
    superseded rows it would write for earlier runs' rows, each as (row, whether the earlier
    row holds features: see kept_superseded), and its counts.

    `now`: the key's items in this run's listing; `before`: the states of its live rows of
    earlier runs. New and changed items (size or version differ) are extracted, unchanged
    ones skipped unless `full`, or `retry_errors` and an earlier attempt failed; rows of
    items gone from the listing are superseded as removed."""
    if not now:
        return (
            [],
            [(table_schema.superseded_row(b["image_id"], b["run"], run, "removed"), b["ok"]) for b in before],
            {"removed": len({b["image_id"] for b in before})},
        )
    counts = {"listed": len(now)}
    if not before:
        return list(now), [], {**counts, "new": len(now)}
    # (size, version) of every item now against those of the rows before: a duplicate
    # image_id's error row carries its own file's, so a listing with duplicates is unchanged
    sources = {(item[-2], item[-1]) for item in now}
    changed = any(size is None for size, _ in sources) or sources != {(b["size"], b["version"]) for b in before}
    # failed: an error row newer than every features row (a duplicate's error row, written by
    # the run that extracted its image, is not; nor is a run's that kept the older features)
    latest_features = max((b["run"] for b in before if b["ok"]), default="")
    failed = any(not b["ok"] and b["run"] > latest_features for b in before)
    reason = "recomputed" if full else "changed" if changed else "retried" if retry_errors and failed else None
    if reason is None:
        return [], [], {**counts, "unchanged": len(now)}
    superseded = [(table_schema.superseded_row(b["image_id"], b["run"], run, reason), b["ok"]) for b in before]
    return list(now), superseded, {**counts, reason: len(now)}


def kept_superseded(element):
    """(key, {"superseded": [(row, holds features)], "failed": [...], "extracted": image_ids})
    -> the superseded rows to write, per key of `decide` (an image, or a tar shard). An image
    this run tried and did not extract, where something failed, keeps its earlier features:
    superseding them would leave it with none (a wrong --images root, a store outage, a
    truncated shard), so they stay live next to the new error row until a run extracts the
    image; the next run retries it (its newest row is an error). Earlier error rows, rows of
    images extracted now, and rows of removed images are always superseded."""
    _, grouped = element
    failed = any(True for _ in grouped["failed"])
    extracted = set(grouped["extracted"])
    for row, holds_features in grouped["superseded"]:
        keep = failed and holds_features and row["reason"] != "removed" and row["image_id"] not in extracted
        if not keep:
            yield row


class Decide(beam.DoFn):
    """(key, {"now": items, "before": states}) -> items to extract; superseded rows and counts
    as tagged outputs (see `decide`)."""

    def __init__(self, run, full, retry_errors):
        self.run, self.full, self.retry_errors = run, full, retry_errors

    def process(self, element):
        key, grouped = element
        todo, superseded, counts = decide(
            list(grouped["now"]), list(grouped["before"]), self.run, self.full, self.retry_errors
        )
        yield from todo
        for pair in superseded:
            yield beam.pvalue.TaggedOutput("superseded", (key, pair))
        yield beam.pvalue.TaggedOutput("counts", counts)


def add_counts(dicts):
    total = {}
    for d in dicts:
        for key, value in d.items():
            total[key] = total.get(key, 0) + value
    return total


class ReadAndDecode(beam.DoFn):
    """Item (or tar shard) -> ((image_id, uri, label, source), (RGB array, original (width,
    height))), or error rows; `source` is the (size, version) of the object read. Decoded and
    shrunk as every query is (runtime/images.py)."""

    def __init__(self, kind, max_side, max_pixels):
        self.kind, self.max_side, self.max_pixels = kind, max_side, max_pixels
        self.read = counter("images_read")

    def process(self, item):
        if self.kind == "tar":
            shard, *source = item
            try:
                for name, data in inputs.iter_tar(shard):
                    yield from self._decode(name, f"{shard}#{name}", None, tuple(source), data)
            except inputs.TruncatedShard as e:
                row = table_schema.error_row(f"{shard}#rest", shard, "read", e, tuple(source))
                yield beam.pvalue.TaggedOutput("errors", row)
            return
        image_id, uri, label, *source = item
        source = tuple(source)
        if not image_id or not uri:
            yield beam.pvalue.TaggedOutput(
                "errors",
                table_schema.error_row(str(image_id), str(uri), "list", "manifest row without id or uri", source),
            )
            return
        try:
            data = storage.read_bytes(uri)
        except Exception as e:  # missing object, permissions, network after retries
            self.read.inc()
            yield beam.pvalue.TaggedOutput(
                "errors", table_schema.error_row(image_id, uri, "read", f"{type(e).__name__}: {e}", source)
            )
            return
        yield from self._decode(image_id, uri, label, source, data)

    def _decode(self, image_id, uri, label, source, data):
        self.read.inc()
        try:
            prepared = decode_for_extraction(data, self.max_side, self.max_pixels)
        except ImageError as e:
            yield beam.pvalue.TaggedOutput("errors", table_schema.error_row(image_id, uri, e.stage, e, source))
            return
        yield (image_id, uri, label, source), prepared


def extract_batch(extractor, batch, inference_args=None):
    """RunInference's inference_fn: the whole DELF procedure on a batch of (image, original
    size) of any sizes; features in original-image pixels."""
    return extractor.extract_batch([image for image, _ in batch], original_sizes=[size for _, size in batch])


class DelfModelHandler(OnnxModelHandlerNumpy):
    """Beam's ONNX handler, with the model read through fsspec and wrapped in an Extractor.

    RunInference keeps one loaded model per worker process and shares it across the
    process's threads; onnxruntime sessions are safe to call concurrently.
    """

    def __init__(self, model_uri, conf, threads=None, providers=None, batch_size=4):
        super().__init__(
            model_uri, providers=providers, inference_fn=extract_batch, min_batch_size=1, max_batch_size=batch_size
        )
        self._conf, self._threads = conf, threads

    def load_model(self):
        return Extractor(self._model_uri, self._conf, providers=self._providers, threads=self._threads)

    def get_num_bytes(self, batch):
        return sum(image.nbytes for image, _ in batch)

    def get_metrics_namespace(self):
        return "delf_index"


class ToRows(beam.DoFn):
    """(key, Features) -> features-table row."""

    def __init__(self, descriptor_dtype):
        self.descriptor_dtype = descriptor_dtype
        self.extracted = counter("images_extracted")
        self.features = counter("features_extracted")

    def setup(self):
        self.count, self.start, self.last_log = 0, time.time(), 0.0

    def process(self, element):
        (image_id, uri, label, source), features = element
        self.extracted.inc()
        self.features.inc(len(features))
        self.count += 1
        now = time.time()
        if now - self.last_log > 30:
            self.last_log = now
            rate = self.count / max(now - self.start, 1e-9)
            log.info("worker %d: %d images extracted (%.2f images/s)", os.getpid(), self.count, rate)
        yield table_schema.feature_row(image_id, uri, label, features, self.descriptor_dtype, source)


def failed_batches_to_errors(failed):
    """RunInference's dead letters, (batch, exception), to one error row per image."""
    batch, exception = failed
    for (image_id, uri, _, source), _ in batch:
        yield table_schema.error_row(image_id, uri, "extract", f"{type(exception).__name__}: {exception}", source)


def list_inputs(p, input):
    """The items of `input` (see ListInputs), with the size and version of every object."""
    listed = p | "Input" >> beam.Create([input]) | "ListInputs" >> beam.ParDo(ListInputs())
    if inputs.input_kind(input) == "manifest":  # one lookup per object, spread over the workers
        listed = listed | "SpreadLookups" >> beam.Reshuffle() | "SizeAndVersion" >> beam.Map(with_stat)
    return listed


def extract_features(items, kind, conf, model=None, threads=None):
    """Items (of one input kind) -> ((image_id, uri, label, source), Features), in
    original-image pixels, and error rows of the images that could not be read, decoded or
    extracted (conf: `resolve_conf`'s)."""
    handler = KeyedModelHandler(DelfModelHandler(model, conf["extractor"], threads, batch_size=conf["batch_size"]))
    decoded = (
        items
        | "Redistribute" >> beam.Reshuffle()
        | "ReadAndDecode"
        >> beam.ParDo(ReadAndDecode(kind, conf["extractor"]["max_image_size"], conf["max_pixels"])).with_outputs(
            "errors", main="images"
        )
    )
    extracted, dead_letters = decoded.images | "Extract" >> RunInference(handler).with_exception_handling()
    features = extracted | "Features" >> beam.MapTuple(lambda key, result: (key, result.inference))
    extract_errors = dead_letters.failed_inferences | "FailedToErrors" >> beam.FlatMap(failed_batches_to_errors)
    return features, (decoded.errors, extract_errors) | "AllErrors" >> beam.Flatten()


def build(p, input, conf, model=None, threads=None, previous=(), run="", full=False, retry_errors=False):
    """Add the extraction steps to pipeline `p` (conf: `resolve_conf`'s). `previous`: the
    (table uri, stale image_ids) of earlier runs in the output, compared with the listing
    (`decide`). Returns the features, errors, superseded and counts PCollections."""
    kind = inputs.input_kind(input)
    now = list_inputs(p, input) | "KeyListing" >> beam.Map(lambda item: (item[0], item))
    before = p | "EarlierTables" >> beam.Create(list(previous)) | "ReadEarlierRows" >> beam.ParDo(ReadState(kind))
    decided = (
        {"now": now, "before": before}
        | "Join" >> beam.CoGroupByKey()
        | "Decide" >> beam.ParDo(Decide(run, full, retry_errors)).with_outputs("superseded", "counts", main="todo")
    )
    features, errors = extract_features(decided.todo, kind, conf, model, threads)
    rows = features | "ToRows" >> beam.ParDo(ToRows(conf["descriptor_dtype"]))
    counts = decided.counts | "CountDecisions" >> beam.CombineGlobally(add_counts)
    # joined by decide's key: a tar member's rows by its shard (uri "shard#member")
    key_of = (lambda row: row["uri"].split("#")[0]) if kind == "tar" else (lambda row: row["image_id"])
    failed = errors | "FailedKeys" >> beam.Map(lambda row: (key_of(row), None))
    extracted = rows | "ExtractedKeys" >> beam.Map(lambda row: (key_of(row), row["image_id"]))
    superseded = (
        {"superseded": decided.superseded, "failed": failed, "extracted": extracted}
        | "JoinFailures" >> beam.CoGroupByKey()
        | "KeepFeaturesOfFailures" >> beam.FlatMap(kept_superseded)
    )
    return rows, errors, superseded, counts


def table_schemas(conf, model_metadata, fingerprint, run):
    """The features, errors and superseded schemas of a run, with their file metadata."""

    def meta(table):
        return table_schema.table_metadata(
            table, fingerprint, model_metadata, recorded_settings(conf["extractor"]), run
        )

    features = table_schema.features_schema(
        model_metadata["descriptor_dim"], model_metadata["global_dim"], conf["descriptor_dtype"], meta("features")
    )
    return (
        features,
        table_schema.ERRORS_SCHEMA.with_metadata(meta("errors")),
        table_schema.SUPERSEDED_SCHEMA.with_metadata(meta("superseded")),
    )


def earlier_runs(output, conf, fingerprint):
    """(table uri, stale image_ids) of the features and errors tables already in `output`;
    refuses tables of another model, other settings or another descriptor type, which an
    incremental run could not add to."""
    if output_root(output) is None:
        return []
    stale = superseded(output)
    previous = []
    for name in ("features", "errors"):
        for uri in list_tables(output, name, required=False):
            _, meta = table_info(uri)
            settings = recorded_settings(conf["extractor"])
            if (meta["model_fingerprint"], meta["extractor"]) != (fingerprint, settings):
                raise UserError(
                    f"{output} holds tables of model {meta['model_fingerprint'][:12]} with other extraction "
                    f"settings ({uri}); extract into a new --output (this run: model {fingerprint[:12]})"
                )
            if name == "features":
                stored = open_table(uri).schema_arrow.field("descriptors").type.value_type.value_type
                wanted = table_schema.DESCRIPTOR_DTYPES[conf["descriptor_dtype"]][0]
                if stored != wanted:
                    raise UserError(
                        f"{output} holds {stored} descriptors ({uri}), this run writes {wanted}: "
                        "extract into a new --output, or with the same --descriptor-dtype"
                    )
            previous.append((uri, frozenset(stale.get(meta["run"], ()))))
    return previous


def run(input, output, conf=None, model=None, beam_options=None, test_pipeline=None, full=False, retry_errors=False):
    """Extract the features of the images of `input` (glob, directory, tar shards or
    manifest, any fsspec URI) into tables under `output`; returns the run's summary (also in
    `output`/_SUMMARY.json and `output`/runs/RUN.json). `model`: an exported .onnx (default:
    the shipped one).

    An output that already holds tables of the same model and settings is updated: only new
    and changed images are extracted (by image_id, size and the store's generation, ETag or
    mtime), into new files of this run; rows of changed and removed images are superseded.
    `retry_errors`: also retry images that failed before; `full`: extract everything again."""
    conf = resolve_conf(conf)
    _, model_metadata, fingerprint = load_model(model)
    flags, threads = cli.beam_flags(beam_options)
    output = output.rstrip("/")
    run_id = new_run_id()
    schemas = table_schemas(conf, model_metadata, fingerprint, run_id)
    previous = earlier_runs(output, conf, fingerprint)
    start = time.time()
    summary = {
        "run": run_id,
        "input": input,
        "output": output,
        "model_fingerprint": fingerprint,
        "schema_version": table_schema.SCHEMA_VERSION,
        "extractor": recorded_settings(conf["extractor"]),
        "descriptor_dtype": conf["descriptor_dtype"],
        "full": bool(full),
        "retry_errors": bool(retry_errors),
        "earlier_tables": len(previous),
    }
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
    with pipeline as p:
        rows, errors, replaced, counts = build(
            p, input, conf, model, threads if test_pipeline is None else None, previous, run_id, full, retry_errors
        )
        per_shard = conf["rows_per_shard"]
        features_out = rows | "WriteFeatures" >> WriteShardedParquet(output, "features", schemas[0], run_id, per_shard)
        all_errors = (errors, features_out.duplicates) | "WithDuplicates" >> beam.Flatten()
        errors_out = all_errors | "WriteErrors" >> WriteShardedParquet(output, "errors", schemas[1], run_id, per_shard)
        superseded_out = replaced | "WriteSuperseded" >> WriteShardedParquet(
            output, "superseded", schemas[2], run_id, 100 * per_shard, per_image=False
        )
        (
            p
            | "Done" >> beam.Create([None])
            | "Finalize"
            >> beam.Map(
                _finalize,
                output=output,
                summary=summary,
                schemas=schemas,
                counts=beam.pvalue.AsSingleton(counts),
                written_features=beam.pvalue.AsList(features_out.written),
                written_errors=beam.pvalue.AsList(errors_out.written),
                written_superseded=beam.pvalue.AsList(superseded_out.written),
            )
        )
    with storage.open_file(posixpath.join(output, "runs", f"{run_id}.json"), "r") as f:
        summary = json.load(f)
    summary["seconds"] = round(time.time() - start, 1)
    log.info("counters: %s", read_counters(getattr(p, "result", None)))
    decided = ", ".join(f"{summary[k]} {k}" for k in DECISIONS if summary[k]) or "nothing"
    print(
        f"extract: run {run_id}: {summary['listed']} listed ({decided}); {summary['images']} images: "
        f"{summary['extracted']} extracted, {summary['failed']} failed; {summary['features']} features written "
        f"to {output}/features ({summary['seconds']}s)"
    )
    return summary


def _finalize(_, output, summary, schemas, counts, written_features, written_errors, written_superseded):
    run_id = summary["run"]
    files = {
        name: finalize(output, name, schema, written, run_id)
        for name, schema, written in zip(
            ("features", "errors", "superseded"), schemas, (written_features, written_errors, written_superseded)
        )
    }
    extracted = sum(w["rows"] for w in written_features)
    failed = sum(w["rows"] for w in written_errors)
    summary = dict(
        summary,
        listed=counts.get("listed", 0),
        **{key: counts.get(key, 0) for key in DECISIONS},
        images=extracted + failed,
        extracted=extracted,
        failed=failed,
        features=sum(w["features"] for w in written_features),
        superseded=sum(w["rows"] for w in written_superseded),
        features_files=files["features"],
        errors_files=files["errors"],
        superseded_files=files["superseded"],
    )
    # the run's own record, then the output's latest: written last, they mark the run complete
    for name in (posixpath.join("runs", f"{run_id}.json"), "_SUMMARY.json"):
        with storage.open_file(posixpath.join(output, name), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    log.info("finalized %s: run %s, files %s", output, run_id, {k: len(v) for k, v in files.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob, directory, tar shards or manifest (any fsspec URI)")
    parser.add_argument("--output", required=True, help="output folder (any fsspec URI)")
    parser.add_argument("--preset", choices=sorted(presets), default="default", help="named configuration")
    parser.add_argument("--full", action="store_true", help="extract every image again, not only new and changed")
    parser.add_argument("--retry-errors", action="store_true", help="also retry the images that failed before")
    parser.add_argument("--descriptor-dtype", choices=sorted(table_schema.DESCRIPTOR_DTYPES))
    parser.add_argument("--rows-per-shard", type=int, help=f"images per file ({default_conf['rows_per_shard']})")
    parser.add_argument("--batch-size", type=int, help=f"images per inference batch ({default_conf['batch_size']})")
    parser.add_argument("--max-pixels", type=int, help="refuse larger images (decompression bombs; 100 Mpx)")
    cli.add_extractor_arguments(parser)
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    conf = {k: v for k, v in presets[args.preset].items()}
    for key in ("descriptor_dtype", "rows_per_shard", "batch_size", "max_pixels"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    conf["extractor"] = {**conf.get("extractor", {}), **cli.extractor_conf_from_args(args)}
    summary = run(
        args.input, args.output, conf, args.model, beam_options, full=args.full, retry_errors=args.retry_errors
    )
    if summary["images"] and not summary["extracted"]:
        raise UserError(
            f"every one of the {summary['images']} images failed; the errors table says why: "
            f"{args.output.rstrip('/')}/errors"
        )
