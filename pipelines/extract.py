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
from delf_index.runtime.extractor import Extractor, load_model
from delf_index.runtime.extractor import default_conf as extractor_defaults
from delf_index.runtime.images import DEFAULT_MAX_PIXELS, ImageError, decode_for_extraction
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


class ListInputs(beam.DoFn):
    """--input -> (image_id, uri, label) items, or tar shard URIs."""

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


class ReadAndDecode(beam.DoFn):
    """Item (or tar shard) -> ((image_id, uri, label), (RGB array, original (width, height))),
    or error rows. Decoded and shrunk as every query is (runtime/images.py)."""

    def __init__(self, kind, max_side, max_pixels):
        self.kind, self.max_side, self.max_pixels = kind, max_side, max_pixels
        self.read = counter("images_read")

    def process(self, item):
        if self.kind == "tar":
            shard = item
            try:
                for name, data in inputs.iter_tar(shard):
                    yield from self._decode(name, f"{shard}#{name}", None, data)
            except inputs.TruncatedShard as e:
                yield beam.pvalue.TaggedOutput("errors", table_schema.error_row(f"{shard}#rest", shard, "read", e))
            return
        image_id, uri, label = item
        if not image_id or not uri:
            yield beam.pvalue.TaggedOutput(
                "errors", table_schema.error_row(str(image_id), str(uri), "list", "manifest row without id or uri")
            )
            return
        try:
            data = storage.read_bytes(uri)
        except Exception as e:  # missing object, permissions, network after retries
            self.read.inc()
            yield beam.pvalue.TaggedOutput(
                "errors", table_schema.error_row(image_id, uri, "read", f"{type(e).__name__}: {e}")
            )
            return
        yield from self._decode(image_id, uri, label, data)

    def _decode(self, image_id, uri, label, data):
        self.read.inc()
        try:
            prepared = decode_for_extraction(data, self.max_side, self.max_pixels)
        except ImageError as e:
            yield beam.pvalue.TaggedOutput("errors", table_schema.error_row(image_id, uri, e.stage, e))
            return
        yield (image_id, uri, label), prepared


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
    """(key, PredictionResult) -> features-table row."""

    def __init__(self, descriptor_dtype):
        self.descriptor_dtype = descriptor_dtype
        self.extracted = counter("images_extracted")
        self.features = counter("features_extracted")

    def setup(self):
        self.count, self.start, self.last_log = 0, time.time(), 0.0

    def process(self, element):
        (image_id, uri, label), result = element
        features = result.inference
        self.extracted.inc()
        self.features.inc(len(features))
        self.count += 1
        now = time.time()
        if now - self.last_log > 30:
            self.last_log = now
            rate = self.count / max(now - self.start, 1e-9)
            log.info("worker %d: %d images extracted (%.2f images/s)", os.getpid(), self.count, rate)
        yield table_schema.feature_row(image_id, uri, label, features, self.descriptor_dtype)


def failed_batches_to_errors(failed):
    """RunInference's dead letters, (batch, exception), to one error row per image."""
    batch, exception = failed
    for (image_id, uri, _), _ in batch:
        yield table_schema.error_row(image_id, uri, "extract", f"{type(exception).__name__}: {exception}")


def build(p, input, conf, model=None, threads=None):
    """Add the extraction steps to pipeline `p` (conf: `resolve_conf`'s); returns the features
    and errors PCollections."""
    kind = inputs.input_kind(input)
    handler = KeyedModelHandler(DelfModelHandler(model, conf["extractor"], threads, batch_size=conf["batch_size"]))
    decoded = (
        p
        | "Input" >> beam.Create([input])
        | "ListInputs" >> beam.ParDo(ListInputs())
        | "Redistribute" >> beam.Reshuffle()
        | "ReadAndDecode"
        >> beam.ParDo(ReadAndDecode(kind, conf["extractor"]["max_image_size"], conf["max_pixels"])).with_outputs(
            "errors", main="images"
        )
    )
    extracted, dead_letters = decoded.images | "Extract" >> RunInference(handler).with_exception_handling()
    rows = extracted | "ToRows" >> beam.ParDo(ToRows(conf["descriptor_dtype"]))
    extract_errors = dead_letters.failed_inferences | "FailedToErrors" >> beam.FlatMap(failed_batches_to_errors)
    errors = (decoded.errors, extract_errors) | "AllErrors" >> beam.Flatten()
    return rows, errors


def table_schemas(conf, model_metadata, fingerprint):
    features_meta = table_schema.table_metadata("features", fingerprint, model_metadata, conf["extractor"])
    errors_meta = table_schema.table_metadata("errors", fingerprint, model_metadata, conf["extractor"])
    features = table_schema.features_schema(
        model_metadata["descriptor_dim"], model_metadata["global_dim"], conf["descriptor_dtype"], features_meta
    )
    return features, table_schema.ERRORS_SCHEMA.with_metadata(errors_meta)


def run(input, output, conf=None, model=None, beam_options=None, test_pipeline=None):
    """Extract the features of every image of `input` (glob, directory, tar shards or
    manifest, any fsspec URI) into tables under `output`; returns the summary (also in
    `output`/_SUMMARY.json). `model`: an exported .onnx (default: the shipped one)."""
    conf = resolve_conf(conf)
    _, model_metadata, fingerprint = load_model(model)
    flags, threads = cli.beam_flags(beam_options)
    features_schema, errors_schema = table_schemas(conf, model_metadata, fingerprint)
    output = output.rstrip("/")
    start = time.time()
    summary = {
        "input": input,
        "output": output,
        "model_fingerprint": fingerprint,
        "schema_version": table_schema.SCHEMA_VERSION,
        "extractor": conf["extractor"],
        "descriptor_dtype": conf["descriptor_dtype"],
    }
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
    with pipeline as p:
        rows, errors = build(p, input, conf, model, threads if test_pipeline is None else None)
        features_out = rows | "WriteFeatures" >> WriteShardedParquet(
            output, "features", features_schema, conf["rows_per_shard"]
        )
        all_errors = (errors, features_out.duplicates) | "WithDuplicates" >> beam.Flatten()
        errors_out = all_errors | "WriteErrors" >> WriteShardedParquet(
            output, "errors", errors_schema, conf["rows_per_shard"]
        )
        (
            p
            | "Done" >> beam.Create([None])
            | "Finalize"
            >> beam.Map(
                _finalize,
                output=output,
                summary=summary,
                schemas=(features_schema, errors_schema),
                written_features=beam.pvalue.AsList(features_out.written),
                written_errors=beam.pvalue.AsList(errors_out.written),
            )
        )
    with storage.open_file(posixpath.join(output, "_SUMMARY.json"), "r") as f:
        summary = json.load(f)
    summary["seconds"] = round(time.time() - start, 1)
    log.info("counters: %s", read_counters(getattr(p, "result", None)))
    print(
        f"extract: {summary['images']} images: {summary['extracted']} extracted, {summary['failed']} failed; "
        f"{summary['features']} features written to {output}/features ({summary['seconds']}s)"
    )
    return summary


def _finalize(_, output, summary, schemas, written_features, written_errors):
    features_files = finalize(output, "features", schemas[0], written_features)
    errors_files = finalize(output, "errors", schemas[1], written_errors)
    extracted = sum(w["rows"] for w in written_features)
    failed = sum(w["rows"] for w in written_errors)
    summary = dict(
        summary,
        images=extracted + failed,
        extracted=extracted,
        failed=failed,
        features=sum(w["features"] for w in written_features),
        features_files=features_files,
        errors_files=errors_files,
    )
    with storage.open_file(posixpath.join(output, "_SUMMARY.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    log.info("finalized %s: %d feature files, %d error files", output, len(features_files), len(errors_files))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob, directory, tar shards or manifest (any fsspec URI)")
    parser.add_argument("--output", required=True, help="output folder (any fsspec URI)")
    parser.add_argument("--preset", choices=sorted(presets), default="default", help="named configuration")
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
    run(args.input, args.output, conf, model=args.model, beam_options=beam_options)
