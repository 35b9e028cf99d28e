"""`delf-index extract`: images in object storage -> Parquet feature and error tables (Beam).

    delf-index extract --input 'gs://bucket/photos/**/*.jpg' --output gs://bucket/features
    delf-index extract --input 's3://bucket/gldv2/images_*.tar' --output s3://bucket/feat
    delf-index extract --input train.csv --output /data/features --workers 8

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
import sys
import time

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import inputs
from pipelines.extractor import Extractor, default_conf, load_model
from pipelines.images import DEFAULT_MAX_PIXELS, ImageError, decode_image_limited
from pipelines.parquet_io import WriteShardedParquet, finalize
from schemas import features as table_schema

log = logging.getLogger(__name__)

default_options = {
    "descriptor_dtype": "float16",  # how local descriptors are stored (float16 or float32)
    "rows_per_shard": 1000,  # images per Parquet file (about 200 MB with the default model)
    "batch_size": 4,  # images per RunInference batch
    "max_pixels": DEFAULT_MAX_PIXELS,  # refuse larger images from their header (bombs)
    "threads": None,  # onnxruntime threads per worker process (default: cores / workers)
}


def counter(name):
    return Metrics.counter("delf_index", name)


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
            raise ValueError(f"--input {spec} matched nothing")
        log.info("input %s: %d %s", spec, len(items), "tar shards" if kind == "tar" else "images")
        yield from items


class ReadAndDecode(beam.DoFn):
    """Item (or tar shard) -> ((image_id, uri, label, width, height), RGB array), or error rows."""

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
            data = inputs.read_bytes(uri)
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
            image, (width, height) = decode_image_limited(data, self.max_side, self.max_pixels)
        except ImageError as e:
            yield beam.pvalue.TaggedOutput("errors", table_schema.error_row(image_id, uri, e.stage, e))
            return
        yield (image_id, uri, label, width, height), image


def extract_batch(extractor, batch, inference_args=None):
    """RunInference's inference_fn: the whole DELF procedure on a batch of images of any sizes."""
    return extractor.extract_batch(batch)


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
        return sum(image.nbytes for image in batch)

    def get_metrics_namespace(self):
        return "delf_index"


class ToRows(beam.DoFn):
    """(key, PredictionResult) -> features-table row, features in original-image pixels."""

    def __init__(self, descriptor_dtype):
        self.descriptor_dtype = descriptor_dtype
        self.extracted = counter("images_extracted")
        self.features = counter("features_extracted")

    def setup(self):
        self.count, self.start, self.last_log = 0, time.time(), 0.0

    def process(self, element):
        (image_id, uri, label, width, height), result = element
        features = result.inference
        if (features.width, features.height) != (width, height):
            features = features.rescaled(width, height)
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
    for (image_id, uri, _, _, _), _ in batch:
        yield table_schema.error_row(image_id, uri, "extract", f"{type(exception).__name__}: {exception}")


# Local runs: one worker process per two cores, each with cores / workers onnxruntime threads.
# Measured on 2 cores (benchmarks/README.md, "Pipeline overhead"): one process with two
# threads beat two single-threaded processes, whose start-up Beam pays on every run.
DEFAULT_WORKERS = max(1, (os.cpu_count() or 1) // 2)


def build(p, args, conf):
    """Add the extraction steps to pipeline `p`; returns the features and errors PCollections."""
    kind = inputs.input_kind(args.input)
    handler = KeyedModelHandler(
        DelfModelHandler(args.model_uri, conf, threads=args.threads, batch_size=args.batch_size)
    )
    decoded = (
        p
        | "Input" >> beam.Create([args.input])
        | "ListInputs" >> beam.ParDo(ListInputs())
        | "Redistribute" >> beam.Reshuffle()
        | "ReadAndDecode"
        >> beam.ParDo(ReadAndDecode(kind, conf["max_image_size"], args.max_pixels)).with_outputs(
            "errors", main="images"
        )
    )
    extracted, dead_letters = decoded.images | "Extract" >> RunInference(handler).with_exception_handling()
    rows = extracted | "ToRows" >> beam.ParDo(ToRows(args.descriptor_dtype))
    extract_errors = dead_letters.failed_inferences | "FailedToErrors" >> beam.FlatMap(failed_batches_to_errors)
    errors = (decoded.errors, extract_errors) | "AllErrors" >> beam.Flatten()
    return rows, errors


def table_schemas(args, conf, model_metadata, fingerprint):
    settings = {k: v for k, v in conf.items()}
    features_meta = table_schema.table_metadata("features", fingerprint, model_metadata, settings)
    errors_meta = table_schema.table_metadata("errors", fingerprint, model_metadata, settings)
    features = table_schema.features_schema(
        model_metadata["descriptor_dim"], model_metadata["global_dim"], args.descriptor_dtype, features_meta
    )
    return features, table_schema.ERRORS_SCHEMA.with_metadata(errors_meta)


def write_summary(output, summary):
    with fsspec.open(posixpath.join(output, "_SUMMARY.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="delf-index extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob, directory, tar shards or manifest (any fsspec URI)")
    parser.add_argument("--output", required=True, help="output folder (any fsspec URI)")
    parser.add_argument("--model", dest="model_uri", help="exported .onnx model (default: the shipped one)")
    parser.add_argument(
        "--descriptor-dtype", choices=["float16", "float32"], default=default_options["descriptor_dtype"]
    )
    parser.add_argument("--rows-per-shard", type=int, default=default_options["rows_per_shard"])
    parser.add_argument("--batch-size", type=int, default=default_options["batch_size"])
    parser.add_argument("--max-pixels", type=int, default=default_options["max_pixels"])
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="local worker processes (default: one per two cores)"
    )
    parser.add_argument("--threads", type=int, help="onnxruntime threads per worker (default: cores / workers)")
    group = parser.add_argument_group("extraction (defaults: the official DELF settings, docs/extraction.md)")
    group.add_argument("--scales", type=float, nargs="+")
    group.add_argument("--max-image-size", type=int, help="largest side before extraction; 0 = no limit (1024)")
    group.add_argument("--score-threshold", type=float)
    group.add_argument("--max-features", type=int)
    group.add_argument("--nms-iou", type=float)
    return parser.parse_known_args(argv)


def extractor_conf(args):
    conf = dict(default_conf)
    for key in ("scales", "score_threshold", "max_features", "nms_iou"):
        if getattr(args, key) is not None:
            conf[key] = tuple(getattr(args, key)) if key == "scales" else getattr(args, key)
    if args.max_image_size is not None:
        conf["max_image_size"] = args.max_image_size or None
    return conf


def local_options(args, beam_args):
    """Beam options: what the user passed, else a local multi-process FnApiRunner.

    Beam 2.77's DirectRunner would try to download the Prism runner first, even with a
    running mode named; FnApiRunner keeps local runs offline.
    """
    if any(a.startswith("--runner") for a in beam_args):
        return PipelineOptions(beam_args, save_main_session=False)
    workers = max(1, args.workers)
    mode = "multi_processing" if workers > 1 else "in_memory"
    return PipelineOptions(
        beam_args + ["--runner=FnApiRunner", f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
    )


def run(argv=None, test_pipeline=None):
    """Build and run the extraction job; returns the summary dict (also in _SUMMARY.json)."""
    args, beam_args = parse_args(argv)
    _, model_metadata, fingerprint = load_model(args.model_uri)
    conf = extractor_conf(args)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.workers)) if test_pipeline is None else None
    features_schema, errors_schema = table_schemas(args, conf, model_metadata, fingerprint)
    output = args.output.rstrip("/")
    start = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=local_options(args, beam_args))
    with pipeline as p:
        rows, errors = build(p, args, conf)
        features_out = rows | "WriteFeatures" >> WriteShardedParquet(
            output, "features", features_schema, args.rows_per_shard
        )
        all_errors = (errors, features_out.duplicates) | "WithDuplicates" >> beam.Flatten()
        errors_out = all_errors | "WriteErrors" >> WriteShardedParquet(
            output, "errors", errors_schema, args.rows_per_shard
        )
        summary = {
            "input": args.input,
            "output": output,
            "model_fingerprint": fingerprint,
            "schema_version": table_schema.SCHEMA_VERSION,
            "extractor": conf,
            "descriptor_dtype": args.descriptor_dtype,
        }
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
    result = p.result if hasattr(p, "result") else None
    with fsspec.open(posixpath.join(output, "_SUMMARY.json"), "r") as f:
        summary = json.load(f)
    summary["seconds"] = round(time.time() - start, 1)
    metrics = _counters(result)
    log.info("counters: %s", metrics)
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
    write_summary(output, summary)
    log.info("finalized %s: %d feature files, %d error files", output, len(features_files), len(errors_files))


def _counters(result):
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


def main(argv=None):
    run(argv)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
