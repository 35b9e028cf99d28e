"""`delf-index extract`: images in object storage -> records in a features table (Beam).

    delf-index extract --input 'gs://bucket/photos/**/*.jpg' --output gs://bucket/features
    delf-index extract --input 's3://bucket/gldv2/images_*.tar' --output s3://bucket/feat
    delf-index extract --input train.csv --output /data/features --workers 8

From Python (the same job; `conf` overrides `default_conf`, or name a preset):

    from delf_index.pipelines import extract
    summary = extract.run("gs://bucket/photos/*.jpg", "gs://bucket/features",
                          conf={"extractor": {"max_features": 500}}, beam_options={"workers": 4})

A run is planned here, then extracted by Beam, then committed here in one step:

1. Plan (this process, holding the table's lease): list the input, read what the table
   holds at its current version, decide per image (`decide`): new and changed images are
   extracted, unchanged ones skipped, images gone from the listing recorded as deleted,
   taken-down ones left alone. A run that would delete or replace more than `max_change` of
   the live images stops here, before any work; so does `dry_run`.
2. Extract (Beam): ReadPlan -> Redistribute -> ReadAndDecode -> Extract (RunInference, one
   onnxruntime session per worker process) -> Records -> WriteRecords (sharded Parquet in
   the table folder, invisible until committed) -> Finalize.
3. Commit (this process): the run's files as one new table version, only if the table is
   still at the version the plan read and the lease is still this run's. A run killed at
   any point before leaves the table as it was.

Every listed image ends up with one record of the run (extracted or failed) or none
(unchanged). Any other argument goes to Beam (``--runner DataflowRunner --project ...``);
without one, the job runs locally on Beam's FnApiRunner with ``--workers`` processes.
"""

import concurrent.futures
import json
import logging
import os
import posixpath
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
from apache_beam.options.pipeline_options import PipelineOptions

from delf_index.errors import UserError
from delf_index.pipelines import cli
from delf_index.pipelines.sharded_parquet import WriteShardedParquet
from delf_index.runtime import console, failpoints, inputs, lease, progress, storage, tables
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.extractor import Extractor, load_model, model_of, recorded_settings
from delf_index.runtime.extractor import default_conf as extractor_defaults
from delf_index.runtime.images import DEFAULT_MAX_PIXELS, ImageError, decode_for_extraction
from delf_index.schemas import features as table_schema
from delf_index.version import __version__

log = logging.getLogger(__name__)
DEFAULT_MAX_CHANGE = 0.1

default_conf = {
    "extractor": {},  # overrides of the extractor's default_conf (runtime/extractor.py)
    "descriptor_dtype": "float16",  # how local descriptors are stored (float16 or float32)
    "rows_per_shard": 1000,  # images per Parquet file (about 200 MB with the default model)
    "batch_size": 4,  # images per RunInference batch
    "max_pixels": DEFAULT_MAX_PIXELS,  # refuse larger images from their header (bombs)
    # refuse a run that would delete or replace more than this share of the live images (a
    # listing one folder too high, a glob of today's uploads only); None: no limit
    "max_change": DEFAULT_MAX_CHANGE,
}

EXTRACTOR = {"extractor": ("extractor", extractor_defaults)}  # the nested conf (runtime.conf.resolve_conf)

presets = {
    "default": {},  # the official DELF procedure on images shrunk to 1024 px (as DELG's configs)
    "delf-v1": {"extractor": {"max_image_size": None}},  # DELF v1: no size limit
}


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


# what a run did with each listed item, and with each image of the table it no longer lists
DECISIONS = ("new", "changed", "retried", "recomputed", "unchanged", "blocked", "deleted")


# -- 1. the plan ----------------------------------------------------------------------------------
def table_state(snap, kind):
    """{key: {"features": [state records], "failed": [...], "blocked": {image_ids}}} of what the
    table holds (key: the image_id, or a tar shard's uri), and the newest run in it."""
    if snap is None:
        return {}, ""
    records = snap.read(table_schema.STATE_COLUMNS)
    resolved = tables.resolve(records)
    live = tables.live_records(records, resolved)
    failing = resolved.filter(pc.is_valid(resolved.column("failed"))).select(["image_id", "failed"])
    failed = records.filter(pc.equal(records.column("status"), "failed")).join(
        failing.rename_columns(["image_id", "run"]), ["image_id", "run"], join_type="inner"
    )
    key_of = (lambda r: (r["uri"] or "").split("#")[0]) if kind == "tar" else (lambda r: r["image_id"])
    state = {}
    for name, part in (("features", live), ("failed", failed)):
        for record in part.select(table_schema.STATE_COLUMNS).to_pylist():
            entry = state.setdefault(key_of(record), {"features": [], "failed": [], "blocked": set()})
            entry[name].append(record)
    blocked = resolved.filter(resolved.column("blocked"))
    uris = dict(zip(records.column("image_id").to_pylist(), records.column("uri").to_pylist()))
    for image_id in blocked.column("image_id").to_pylist():
        key = (uris.get(image_id) or "").split("#")[0] if kind == "tar" else image_id
        state.setdefault(key, {"features": [], "failed": [], "blocked": set()})["blocked"].add(image_id)
    newest = pc.max(records.column("run")).as_py() if records.num_rows else ""
    return state, newest or ""


def same_source(source, record):
    """Whether an object now (size, version, hash) is the one a record was read from: by content
    hash where both have one (identical bytes uploaded again are unchanged), else by size and
    version (generation, ETag or mtime)."""
    size, version, content = source
    if content and record["source_hash"]:
        return content == record["source_hash"]
    return size is not None and (size, version) == (record["source_size"], record["source_version"])


def hash_touched(items, kind, state):
    """`items` with the content hash of their bytes filled in where the store gives none (local
    files) and the run needs it: an image whose records hold a hash and its size, but another
    version (mtime: a copy or a restore that did not keep mtimes), and a tar shard that is new
    or not as recorded (its members' records keep it). What is as recorded by size and version
    is not read; a new image gets its hash from the bytes its worker reads. Returns (items,
    the number hashed)."""

    def wanted(item):
        size, version, content = item[-3:]
        before = state.get(item[0])
        records = before["features"] + before["failed"] if before else []
        if (
            content is not None
            or size is None
            or any((size, version) == (r["source_size"], r["source_version"]) for r in records)
        ):
            return False
        return kind == "tar" or any(r["source_hash"] and r["source_size"] == size for r in records)

    chosen = [n for n, item in enumerate(items) if wanted(item)]
    uri = (lambda item: item[0]) if kind == "tar" else (lambda item: item[1])  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(inputs.STAT_THREADS) as pool:
        hashes = list(pool.map(lambda n: inputs.hash_of(uri(items[n])), chosen))
    items = list(items)
    for n, content in zip(chosen, hashes):
        items[n] = (*items[n][:-1], content)
    return items, len(chosen)


def decide(now, before, full=False, retry_errors=False):
    """(decision, whether to extract) for one key: `now` is its item's source (size, version,
    hash), `before` its table state (`table_state`) or None. Images taken down stay so; new
    ones and changed ones (another source than their live features and their newest failure)
    are extracted; unchanged ones are skipped, unless `full`, or `retry_errors` and their
    newest attempt failed."""
    if before is not None and before["blocked"] and not (before["features"] or before["failed"]):
        return "blocked", False
    if before is None or not (before["features"] or before["failed"]):
        return "new", True
    if full:
        return "recomputed", True
    for records in (before["features"], before["failed"]):
        if records and all(same_source(now, r) for r in records):
            retry = retry_errors and bool(before["failed"])
            return ("retried", True) if retry else ("unchanged", False)
    return "changed", True


def plan(items, unreadable, kind, state, full=False, retry_errors=False, keep_unlisted=False):
    """What a run does: (items to extract, records to write as they are, counts, images whose
    live features it replaces or deletes). Duplicate image_ids of a listing: the first by uri
    is extracted, the others recorded as failures when it is."""
    todo, records, counts, affected = [], [], {"listed": len(items) + len(unreadable)}, 0
    for item, reason in unreadable:  # a lookup that failed: recorded, never taken as a change or a deletion
        records.append(table_schema.failure_record(str(item[0]), str(item[1]), "read", reason))
    listed = {item[0] for item, _ in unreadable}
    by_key = {}
    for item in items:
        if kind != "tar" and not (item[0] and item[1]):
            records.append(
                table_schema.failure_record(str(item[0]), str(item[1]), "list", "manifest row without id or uri")
            )
            continue
        by_key.setdefault(item[0], []).append(item)
    for key, listed in by_key.items():
        listed.sort(key=lambda i: i[1])
        item, before = listed[0], state.get(key)
        if kind == "tar" and before is not None and not (before["features"] or before["failed"]):
            before = None  # only members taken down: the shard is read, and they are skipped
        decision, extract = decide(tuple(item[-3:]), before, full, retry_errors)
        counts[decision] = counts.get(decision, 0) + 1
        if extract:
            todo.append(item)
            affected += len(before["features"]) if decision == "changed" else 0
            for other in listed[1:]:
                message = f"duplicate image_id, also read from {item[1]}"
                records.append(table_schema.failure_record(key, other[1], "list", message, tuple(other[-3:])))
    if not keep_unlisted:
        for key, before in state.items():
            if key in by_key or key in listed:
                continue
            gone = {r["image_id"]: r["uri"] for r in before["features"] + before["failed"]}
            records += [table_schema.status_record(i, "deleted", uri) for i, uri in sorted(gone.items())]
            counts["deleted"] = counts.get("deleted", 0) + len(gone)
            affected += len(before["features"])
    return todo, records, counts, affected


def check_change(counts, affected, live, max_change, what):
    """Refuse, before any work, a run that deletes or replaces more than `max_change` of the
    `live` images: the usual sign of a wrong listing."""
    if max_change is None or not live or affected <= max_change * live:
        return
    said = ", ".join(f"{counts[k]} {k}" for k in ("new", "changed", "deleted") if counts.get(k))
    raise UserError(
        f"{what} would delete or replace {affected} of the {live} live images ({affected / live:.0%}; {said}), more "
        f"than --max-change {max_change:g}: check --input (one folder too high? only today's files? then pass "
        "--keep-unlisted), or allow it with --max-change 1"
    )


def tar_deletions(entries, changed_shards, state):
    """`deleted` records of the members a changed tar shard no longer holds: members its earlier
    records name that this run neither extracted nor failed on, unless reading the shard
    failed this run (a truncated shard keeps its members' earlier features)."""
    seen, broken = set(), set()
    for entry in entries:
        table = tables.read_columns(entry["path"], ["image_id", "uri", "status"])
        for image_id, uri, status in zip(*(table.column(c).to_pylist() for c in ("image_id", "uri", "status"))):
            seen.add(image_id)
            if status == "failed" and image_id.endswith("#rest"):
                broken.add((uri or "").split("#")[0])
    out = []
    for shard in sorted(changed_shards - broken):
        before = state[shard]
        gone = {r["image_id"]: r["uri"] for r in before["features"] + before["failed"] if r["image_id"] not in seen}
        out += [table_schema.status_record(i, "deleted", uri) for i, uri in sorted(gone.items())]
    return out


# -- 2. the Beam job --------------------------------------------------------------------------------
class ReadPlan(beam.DoFn):
    """(plan file, row group) -> the items to extract in it."""

    def process(self, element):
        uri, group = element
        with storage.open_file(uri, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(group)
        names = table.column_names
        for values in zip(*(table.column(c).to_pylist() for c in names)):
            yield tuple(values)


def write_plan(uri, todo, kind, rows_per_group=1000):
    """The items to extract as a Parquet file of row groups (what ReadPlan reads); the number
    of row groups."""
    names = (
        ("uri", "size", "version", "hash") if kind == "tar" else ("image_id", "uri", "label", "size", "version", "hash")
    )
    types = {"size": pa.int64()}
    table = pa.table({n: pa.array([item[i] for item in todo], types.get(n, pa.string())) for i, n in enumerate(names)})
    fs, path = storage.filesystem(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=rows_per_group)
    return max(1, -(-len(todo) // rows_per_group))


class ReadAndDecode(beam.DoFn):
    """Item (or tar shard) -> ((image_id, uri, label, source, warned), (RGB array, original
    (width, height))), or failure records; `source` is the (size, version, hash) of the object
    read, `warned` what the decoder warned of.
    Decoded and shrunk as every query is (runtime/images.py). Tar members of images taken
    down (`blocked`) are skipped."""

    def __init__(self, kind, max_side, max_pixels, blocked=frozenset(), progress_folder=None):
        self.kind, self.max_side, self.max_pixels, self.blocked = kind, max_side, max_pixels, blocked
        self.read = counter("images_read")
        self.progress_folder = progress_folder

    def setup(self):
        # images are counted here, as they go into the fused read-decode-extract stage; a
        # counting step after the records' Flatten would run only once every image was done
        self.done = progress.Counter(self.progress_folder)

    def finish_bundle(self):
        self.done.flush()

    def process(self, item):
        if self.kind == "tar":
            shard, *source = item
            try:
                for name, data in inputs.iter_tar(shard):
                    if name not in self.blocked:
                        yield from self._decode(name, f"{shard}#{name}", None, tuple(source), data)
            except inputs.TruncatedShard as e:
                record = table_schema.failure_record(f"{shard}#rest", shard, "read", e, tuple(source))
                yield beam.pvalue.TaggedOutput("errors", record)
            return
        image_id, uri, label, *source = item
        source = tuple(source)
        try:
            data = storage.read_bytes(uri)
            if source[2] is None:  # the store keeps no hash (local files): the record keeps this one
                source = (*source[:2], inputs.content_hash(data))
        except Exception as e:  # missing object, permissions, network after retries
            self.read.inc()
            self.done.add()
            record = table_schema.failure_record(image_id, uri, "read", f"{type(e).__name__}: {e}", source)
            yield beam.pvalue.TaggedOutput("errors", record)
            return
        yield from self._decode(image_id, uri, label, source, data)

    def _decode(self, image_id, uri, label, source, data):
        self.read.inc()
        self.done.add()
        warned = []
        try:
            prepared = decode_for_extraction(data, self.max_side, self.max_pixels, noted=warned)
        except ImageError as e:
            yield beam.pvalue.TaggedOutput("errors", table_schema.failure_record(image_id, uri, e.stage, e, source))
            return
        yield (image_id, uri, label, source, tuple(warned)), prepared


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


class ToRecords(beam.DoFn):
    """(key, Features) -> an ``extracted`` record."""

    def __init__(self, descriptor_dtype):
        self.descriptor_dtype = descriptor_dtype
        self.extracted = counter("images_extracted")
        self.features = counter("features_extracted")

    def setup(self):
        self.count, self.start, self.last_log = 0, time.time(), 0.0

    def process(self, element):
        (image_id, uri, label, source, warned), features = element
        self.extracted.inc()
        self.features.inc(len(features))
        self.count += 1
        now = time.time()
        if now - self.last_log > 30:
            self.last_log = now
            rate = self.count / max(now - self.start, 1e-9)
            log.info("worker %d: %d images extracted (%.2f images/s)", os.getpid(), self.count, rate)
        yield table_schema.feature_record(image_id, uri, label, features, self.descriptor_dtype, source, warned)


def failed_batches_to_errors(failed):
    """RunInference's dead letters, (batch, exception), to one failure record per image."""
    batch, exception = failed
    for (image_id, uri, _, source, _), _ in batch:
        yield table_schema.failure_record(image_id, uri, "extract", f"{type(exception).__name__}: {exception}", source)


class ListInputs(beam.DoFn):
    """--input -> its items (`inputs.list_input`); a lookup that failed becomes a failure record."""

    def process(self, spec):
        items, unreadable = inputs.list_input(spec)
        log.info("input %s: %d items", spec, len(items) + len(unreadable))
        yield from items
        for item, reason in unreadable:
            yield beam.pvalue.TaggedOutput(
                "errors", table_schema.failure_record(str(item[0]), str(item[1]), "read", reason)
            )


def list_inputs(p, input):
    """The items of `input` listed inside a pipeline (batch search lists its queries so), and
    failure records of the manifest rows whose object could not be looked up."""
    listed = (
        p
        | "Input" >> beam.Create([input])
        | "ListInputs" >> beam.ParDo(ListInputs()).with_outputs("errors", main="items")
    )
    return listed.items, listed.errors


def extract_features(items, kind, conf, model=None, threads=None, blocked=frozenset(), progress_folder=None):
    """Items (of one input kind) -> ((image_id, uri, label, source, warned), Features), in
    original-image pixels, and failure records of the images that could not be read,
    decoded or extracted (conf: as `run` resolves it)."""
    handler = KeyedModelHandler(DelfModelHandler(model, conf["extractor"], threads, batch_size=conf["batch_size"]))
    decoded = (
        items
        | "Redistribute" >> beam.Reshuffle()
        | "ReadAndDecode"
        >> beam.ParDo(
            ReadAndDecode(kind, conf["extractor"]["max_image_size"], conf["max_pixels"], blocked, progress_folder)
        ).with_outputs("errors", main="images")
    )
    extracted, dead_letters = decoded.images | "Extract" >> RunInference(handler).with_exception_handling()
    features = extracted | "Features" >> beam.MapTuple(lambda key, result: (key, result.inference))
    extract_errors = dead_letters.failed_inferences | "FailedToErrors" >> beam.FlatMap(failed_batches_to_errors)
    return features, (decoded.errors, extract_errors) | "AllErrors" >> beam.Flatten()


class CountProgress(beam.DoFn):
    """Elements pass through; the worker's count goes to the job's progress folder
    (runtime/progress.py), which the launching process shows."""

    def __init__(self, folder, weigh=None):
        self.folder, self.weigh = folder, weigh  # weigh(element): the units it stands for (1)

    def setup(self):
        self.counter = progress.Counter(self.folder)

    def process(self, element):
        self.counter.add(1 if self.weigh is None else self.weigh(element))
        yield element

    def finish_bundle(self):
        self.counter.flush()


def build(p, plan_uri, groups, kind, conf, records_schema, run, model=None, threads=None, blocked=frozenset()):
    """Add the extraction steps to pipeline `p`: the items of the plan file -> the run's data
    files in the table. Returns the PCollection of their `file_entry`s."""
    items = (
        p
        | "Plan" >> beam.Create([(plan_uri, g) for g in range(groups)])
        | "SpreadPlan" >> beam.Reshuffle()
        | "ReadPlan" >> beam.ParDo(ReadPlan())
    )
    folder = posixpath.join(posixpath.dirname(plan_uri), "progress")
    features, errors = extract_features(items, kind, conf, model, threads, blocked, folder)
    extracted = features | "Records" >> beam.ParDo(ToRecords(conf["descriptor_dtype"]))
    records = (extracted, errors) | "AllRecords" >> beam.Flatten()
    folder = plan_uri.rsplit("/_runs/", 1)[0]
    written = records | "WriteRecords" >> WriteShardedParquet(
        folder, "part", records_schema, run, conf["rows_per_shard"]
    )
    duplicates = written.duplicates | "WriteDuplicates" >> WriteShardedParquet(
        folder, "duplicates", records_schema, run
    )
    return (written.written, duplicates.written) | "Written" >> beam.Flatten()


# -- 3. the run ---------------------------------------------------------------------------------
def gpu_workers(flags):
    """Whether the job's workers have GPUs: a Beam option that attaches an accelerator (Dataflow's
    worker_accelerator), else whether this machine has one (a local run)."""
    return True if any("accelerator" in flag for flag in flags) else None


def check_table(snap, uri, fingerprint, settings, descriptor_dtype):
    """Refuse to add to a table of another model, other settings or another descriptor type."""
    props = snap.properties
    if (props["model_fingerprint"], props["extractor"]) != (fingerprint, settings):
        raise UserError(
            f"{uri} holds features of model {props['model_fingerprint'][:12]} with other extraction settings "
            f"({props['extractor']}); extract into a new --output (this run: model {fingerprint[:12]}, {settings})"
        )
    if props["descriptor_dtype"] != descriptor_dtype:
        raise UserError(
            f"{uri} holds {props['descriptor_dtype']} descriptors, this run writes {descriptor_dtype}: extract into a "
            "new --output, or with the same --descriptor-dtype"
        )


def what_to_write(output, conf, model, flags):
    """What this run writes into the table `output`: {model (the file), fingerprint, settings
    (the extractor's, as recorded), properties (the table's), records_schema}. A table keeps
    the model it was made with; a new one gets int8 on CPU workers, float32 on GPUs."""
    made_with = tables.snapshot(output).properties["model_fingerprint"] if tables.exists(output) else None
    model = model_of(made_with, model, gpu=gpu_workers(flags))
    _, model_metadata, fingerprint = load_model(model)
    settings = recorded_settings(conf["extractor"])
    return {
        "model": model,
        "fingerprint": fingerprint,
        "settings": settings,
        "properties": table_schema.table_properties(fingerprint, model_metadata, settings, conf["descriptor_dtype"]),
        "records_schema": table_schema.records_schema(conf["descriptor_dtype"], model_metadata["descriptor_dim"]),
    }


def current_table(output, target, descriptor_dtype):
    """The table's current snapshot (None: a new table), refused when it holds features of
    another model, settings or descriptor type, or is an extract output of an earlier version."""
    snap = tables.snapshot(output) if tables.exists(output) else None
    if snap is None and tables.is_legacy(output):
        raise tables.missing_table(output)
    if snap is not None:
        check_table(snap, output, target["fingerprint"], target["settings"], descriptor_dtype)
    return snap


def run_summary(run_id, input, output, snap, target, conf, options, counts, todo, hashed, live):
    """The run's summary as planned (its counts of work done are added as it ends)."""
    return {
        "run": run_id,
        "delf_index_version": __version__,
        "input": input,
        "output": output,
        "table_version_before": None if snap is None else snap.version,
        "model_fingerprint": target["fingerprint"],
        "schema_version": table_schema.SCHEMA_VERSION,
        "extractor": target["settings"],
        "descriptor_dtype": conf["descriptor_dtype"],
        "full": bool(options["full"]),
        "retry_errors": bool(options["retry_errors"]),
        **{k: counts.get(k, 0) for k in ("listed", *DECISIONS)},
        "to_extract": todo,
        "hashed": hashed,  # files read for their content hash: size as recorded, mtime not
        "live_before": live,
    }


def extract_planned(todo, kind, state, runs, run_id, conf, target, flags, threads, test_pipeline):
    """Run the Beam job on the images `todo`: their records written as data files of the run
    (not yet committed); returns the files' entries."""
    plan_uri = posixpath.join(runs, "plan.parquet")
    groups = write_plan(plan_uri, todo, kind)
    blocked = frozenset(i for s in state.values() for i in s["blocked"]) if kind == "tar" else frozenset()
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
    file_schema = target["records_schema"].with_metadata({**target["properties"], "delf_index.run": run_id})
    total = None if kind == "tar" else len(todo)  # a shard's images are counted as they come
    with progress.watching(posixpath.join(runs, "progress"), total, "extract", "images"), pipeline as p:
        entries = build(
            p, plan_uri, groups, kind, conf, file_schema, run_id, target["model"],
            threads if test_pipeline is None else None, blocked,
        )  # fmt: skip
        (
            entries
            | "Collect" >> beam.combiners.ToList()
            | "Finalize" >> beam.Map(storage_json, posixpath.join(runs, "written.json"))
        )
    log.info("counters: %s", read_counters(getattr(p, "result", None)))
    return json.loads(storage.read_bytes(posixpath.join(runs, "written.json")))


def describe_run(summary, committed):
    """The run's summary line."""
    version = f"table version {summary['table_version']}" if committed else "nothing to commit"
    warned = (
        summary.get("decoder_warnings") and f" ({summary['decoder_warnings']} with decoder warnings in their records)"
    )
    return (
        f"extract: run {summary['run']}: {describe_plan(summary)}; {summary['images']} images: {summary['extracted']} "
        f"extracted{warned or ''}, {summary['failed']} failed; {summary['features']} features; {version} of "
        f"{summary['output']} ({summary['seconds']}s)"
    )


def run(
    input,
    output,
    conf=None,
    model=None,
    beam_options=None,
    test_pipeline=None,
    full=False,
    retry_errors=False,
    keep_unlisted=False,
    dry_run=False,
    wait=False,
):
    """Extract the features of the images of `input` (glob, directory, tar shards or manifest,
    any fsspec URI) into the features table `output` (created by the first run); returns the
    run's summary (also in `output`/_runs/RUN.json and _SUMMARY.json). `model`: an exported
    .onnx (default: the shipped one).

    A table that holds features of the same model and settings is updated: only new and
    changed images are extracted (by image_id, and the content hash, or size and generation /
    ETag / mtime, of their object); images no longer listed are recorded as deleted, unless
    `keep_unlisted`. `retry_errors`: also retry images whose newest attempt failed; `full`:
    extract everything again. `dry_run`: plan only. `wait`: wait for another writer of the
    table instead of failing."""
    conf = resolve_conf(conf, default_conf, "extract", presets, EXTRACTOR)
    if conf["descriptor_dtype"] not in table_schema.DESCRIPTOR_DTYPES:
        raise UserError(f"descriptor_dtype must be one of {sorted(table_schema.DESCRIPTOR_DTYPES)}")
    conf["extractor"] = {**extractor_defaults, **(conf["extractor"] or {})}  # complete: tables record every setting
    flags, threads = cli.beam_flags(beam_options)
    output = output.rstrip("/")
    target = what_to_write(output, conf, model, flags)
    kind = inputs.input_kind(input)
    with lease.writing(output, f"extract --input {input}", wait=wait) as held:
        start = time.time()
        snap = current_table(output, target, conf["descriptor_dtype"])
        state, newest = table_state(snap, kind)
        run_id = tables.new_run_id(newest)
        items, unreadable = inputs.list_input(input)
        items, hashed = hash_touched(items, kind, state)
        todo, records, counts, affected = plan(items, unreadable, kind, state, full, retry_errors, keep_unlisted)
        live = sum(len(s["features"]) for s in state.values())
        options = {"full": full, "retry_errors": retry_errors}
        summary = run_summary(run_id, input, output, snap, target, conf, options, counts, len(todo), hashed, live)
        if not full:
            check_change(counts, affected, live, conf["max_change"], f"extract run {run_id}")
        if dry_run:
            log.info(f"extract: dry run {run_id}: {describe_plan(summary)}; nothing written", extra=console.SUMMARY)
            return summary
        failpoints.reach("extract:planned")
        entries, runs = [], posixpath.join(output, "_runs", run_id)
        if todo:
            entries = extract_planned(todo, kind, state, runs, run_id, conf, target, flags, threads, test_pipeline)
            if kind == "tar":
                changed = {item[0] for item in todo if state.get(item[0])}
                records += tar_deletions(entries, changed, state)
                counts["deleted"] = summary["deleted"] = sum(r["status"] == "deleted" for r in records)
        if records:
            entries.append(tables.write_records(output, f"part-{run_id}-plan.parquet", records,
                                                target["records_schema"], target["properties"], run_id))  # fmt: skip
        summary.update(tally(entries))
        summary["seconds"] = round(time.time() - start, 1)
        if entries:
            failpoints.reach("extract:written")
            held.check()
            summary["table_version"] = tables.commit(output, entries, target["properties"], snap, run_id, "extract",
                                                     counts)  # fmt: skip
            failpoints.reach("extract:committed")
        else:
            summary["table_version"] = None if snap is None else snap.version
        for name in (posixpath.join("_runs", f"{run_id}.json"), "_SUMMARY.json"):
            storage_json(summary, posixpath.join(output, name))
        storage.remove(runs)
    log.info(describe_run(summary, bool(entries)), extra=console.SUMMARY)
    return summary


def describe_plan(summary):
    decided = ", ".join(f"{summary[k]} {k}" for k in DECISIONS if summary.get(k)) or "nothing"
    hashed = f"; {summary['hashed']} hashed: their mtime changed, not their size" if summary.get("hashed") else ""
    return f"{summary['listed']} listed ({decided}{hashed})"


def tally(entries):
    """The run's counts from the files it wrote: images extracted and failed, features, and
    images the decoder warned of (their records say what)."""
    counts = {"extracted": 0, "failed": 0, "features": 0, "decoder_warnings": 0}
    for entry in entries:
        table = tables.read_columns(entry["path"], ["status", "num_features", "warnings"])
        status = table.column("status").to_pylist()
        counts["extracted"] += status.count("extracted")
        counts["failed"] += status.count("failed")
        counts["features"] += int(pc.sum(table.column("num_features")).as_py() or 0)
        counts["decoder_warnings"] += table.num_rows - table.column("warnings").null_count
    return {**counts, "images": counts["extracted"] + counts["failed"], "records": sum(e["rows"] for e in entries)}


def storage_json(value, uri):
    storage.write_bytes(uri, json.dumps(value, indent=1, sort_keys=True, default=str).encode())


def main(argv=None):
    parser = cli.Parser("extract", __doc__)
    parser.add_argument("--input", required=True, help="glob, directory, tar shards or manifest (any fsspec URI)")
    parser.add_argument("--output", required=True, help="the features table (any fsspec URI; created by the first run)")
    parser.add_argument("--preset", choices=sorted(presets), default="default", help="named configuration")
    parser.add_argument("--full", action="store_true", help="extract every image again, not only new and changed")
    parser.add_argument("--retry-errors", action="store_true", help="also retry the images that failed before")
    add_run_arguments(parser)
    parser.add_argument("--descriptor-dtype", choices=sorted(table_schema.DESCRIPTOR_DTYPES))
    parser.add_argument("--rows-per-shard", type=int, help=f"images per file ({default_conf['rows_per_shard']})")
    parser.add_argument("--batch-size", type=int, help=f"images per inference batch ({default_conf['batch_size']})")
    parser.add_argument("--max-pixels", type=int, help="refuse larger images (decompression bombs; 100 Mpx)")
    cli.add_extractor_arguments(parser)
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    conf = {k: v for k, v in presets[args.preset].items()}
    for key in ("descriptor_dtype", "rows_per_shard", "batch_size", "max_pixels", "max_change"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    conf["extractor"] = {**conf.get("extractor", {}), **cli.extractor_conf_from_args(args)}
    summary = run(
        args.input,
        args.output,
        conf,
        args.model,
        beam_options,
        full=args.full,
        retry_errors=args.retry_errors,
        keep_unlisted=args.keep_unlisted,
        dry_run=args.dry_run,
        wait=args.wait,
    )
    if summary.get("images") and not summary["extracted"]:
        raise UserError(
            f"every one of the {summary['images']} images failed; their records say why (status 'failed' in "
            f"{args.output.rstrip('/')}, docs/tables.md)"
        )


def add_run_arguments(parser):
    """The options of a run over a listing (extract, update): its guards and its lease."""
    group = parser.add_argument_group("guards")
    group.add_argument(
        "--max-change",
        type=float,
        help=f"refuse to delete or replace more than this share of the live images ({default_conf['max_change']})",
    )
    group.add_argument(
        "--keep-unlisted", action="store_true", help="the listing is partial: do not delete images it leaves out"
    )
    group.add_argument("--dry-run", action="store_true", help="list and plan, print what would happen, write nothing")
    group.add_argument("--wait", action="store_true", help="wait for another writer of the table instead of failing")
