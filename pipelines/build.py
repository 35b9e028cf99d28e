"""`delf-index build`: a features table + codebooks -> a new version of the index (Beam).

    delf-index build --features gs://bucket/features --codebooks gs://bucket/codebooks \
        --output gs://bucket/index
    delf-index build --features gs://bucket/features --output gs://bucket/index --append
    delf-index build --features gs://bucket/features --output gs://bucket/index --append --remove gone.csv

From Python:

    from delf_index.pipelines import build
    manifest = build.run("gs://bucket/features", "gs://bucket/index", codebooks="gs://bucket/codebooks")
    build.run("gs://bucket/features", "gs://bucket/index", append=True)

Steps: Tables -> Redistribute -> EncodeShard (one data file of the table -> an IVF-PQ shard,
its geometry, images and global descriptors, staged under `_staging/<version>/`; in
parallel) -> Merge (one worker: on-disk merge of the inverted lists, memory-mapped geometry;
indexing/shards.py; the complete version is placed under versions/) -> Publish (here: the
next log entry, created only if no other writer published since this build planned;
indexing/artifact.py). Readers never see a half-built index; `--keep N` prunes old versions.
One build at a time per index: the index's lease (runtime/lease.py).

A build reads the live records of the features table at one version (its current one, or
`--table-version`), and the index's manifest records that version. Image int ids follow the
table's data files and the rows in them, so a rebuild from the same version gives the same
ids. `--append` compares the index with the table's live records, reading only the
manifest, image table and dead rows of the index: the row of an image whose live record
changed dies and the image is added again, the rows of images deleted or taken down die, new
ones are added, all with the index's own codebooks; queries skip dead rows, and the next full
build leaves them out. `--remove` first records takedowns in the table (`delf-index remove`).
"""

import contextlib
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

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import shards as shards_lib
from delf_index.indexing.codebooks_io import WORDS_FILE, codebooks_folder, load_codebooks, load_words
from delf_index.indexing.manifests import ArtifactError, check_fingerprint, fetch_manifested, file_entries
from delf_index.indexing.versions import (
    commit_version,
    current_entry,
    current_manifest,
    current_version,
    new_version_name,
    place_version,
    version_work_folder,
)
from delf_index.pipelines import cli
from delf_index.pipelines.extract import CountProgress
from delf_index.runtime import console, failpoints, lease, progress, storage, tables
from delf_index.runtime.inputs import read_ids
from delf_index.runtime.tables import iter_batches
from delf_index.schemas.artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, STAGING, VERSIONS
from delf_index.schemas.features import complete_settings
from delf_index.version import __version__

log = logging.getLogger(__name__)
DEFAULT_KEEP = 2  # versions kept: the current one and the one before (for readers still on it)


def word_assigner(codebooks_uri, method):
    """ASMK's words of the codebooks when the method needs them, else None."""
    if method == "knn":
        return None
    words = load_words(codebooks_uri)
    if words is None:
        raise UserError(f"--method {method} needs ASMK visual words: fit the codebooks with --asmk-words auto")
    return shards_lib.WordAssigner(words)


class EncodeShard(beam.DoFn):
    """(shard number, features table URI, first image id, stale image_ids) -> shard files
    under `staging`."""

    def __init__(self, codebooks_uri, staging, method):
        self.codebooks_uri, self.staging, self.method = codebooks_uri, staging, method
        self.images = Metrics.counter("delf_index", "images_encoded")
        self.descriptors = Metrics.counter("delf_index", "descriptors_encoded")

    def setup(self):
        self.pca, self.trained, _ = load_codebooks(self.codebooks_uri)
        self.words = word_assigner(self.codebooks_uri, self.method)

    def process(self, element):
        shard, uri, first_id, skip = element
        name = f"shard-{shard:05d}"
        with tempfile.TemporaryDirectory() as tmp:
            chunks = iter_batches(uri, None, skip=skip)
            counts = shards_lib.encode_shard(
                chunks, self.pca, self.trained, first_id, os.path.join(tmp, name), self.method, self.words
            )
            storage.upload_folder(tmp, self.staging, os.listdir(tmp))
        self.images.inc(counts["images"])
        self.descriptors.inc(counts["descriptors"])
        log.info("encoded %s: %d images, %d descriptors", uri, counts["images"], counts["descriptors"])
        yield {"shard": shard, "name": name, "table": uri, **counts}


def weigh_images(shard):
    return shard["images"]


def merge_version(_, shards, output, version, staging, codebooks_uri, previous_uri, newly_dead, info, method):
    """Merge the staged shards (and the previous version) into the new version's folder and
    place it under versions/ (not yet current: the launcher publishes it)."""
    shards = sorted(shards, key=lambda s: s["shard"])
    start = time.time()
    out = version_work_folder(output, version)
    with tempfile.TemporaryDirectory() as work:
        shard_dir = os.path.join(work, "shards")
        os.makedirs(shard_dir)
        for shard in shards:
            for suffix in shard["files"]:
                name = f"{shard['name']}.{suffix}"
                storage.download(posixpath.join(staging, name), os.path.join(shard_dir, name))
        previous = fetch_manifested(previous_uri, "manifest.json", "index") if previous_uri else None
        codebooks_dir, _, _ = codebooks_folder(codebooks_uri)  # an append's: the previous version's
        _, trained, _ = load_codebooks(codebooks_dir)
        prefixes = [os.path.join(shard_dir, s["name"]) for s in shards]
        words = word_assigner(codebooks_dir, method)
        steps = {}
        counts = shards_lib.merge_shards(prefixes, trained, out, previous, newly_dead, method, words, timings=steps)
    # the codebooks travel with the index: an append encodes with them
    for name in ("pca.npz", "trained.faiss") + ((WORDS_FILE,) if method != "knn" else ()):
        shutil.copy(os.path.join(codebooks_dir, name), os.path.join(out, name))
    names = sorted(os.listdir(out))
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in names}
    stored = {  # bytes of the per-descriptor and per-image stores
        "knn_lists": sizes.get("index.ivfdata", 0),
        "asmk_lists": sum(sizes.get(name, 0) for name in shards_lib.ASMK_FILES),
        "codes": sizes.get("codes.npy", 0),
        "geometry": sizes["geometry.npy"],
    }
    manifest = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        **info,
        "delf_index_version": __version__,
        "version": version,
        "method": method,
        "counts": counts,
        "bytes": stored,
        # what each descriptor costs on disk: its k-NN list entry and/or code, and its geometry
        "bytes_per_descriptor": round(
            (stored["knn_lists"] + stored["codes"] + stored["geometry"]) / max(counts["descriptors"], 1), 2
        ),
        "merge_seconds": round(time.time() - start, 1),
        "merge_steps_seconds": {k: round(v, 1) for k, v in steps.items()},
        "files": file_entries(out, names),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    place_version(out, output, version)
    storage.remove(staging)  # this build's staged shards


def check_append(output, base, snap, method):
    """(the current manifest, the local method) of an append, refused before any work when the
    index does not match the table (another table, an older version of it, another model or
    settings) or the method asked for."""
    if base is None:
        raise UserError(f"{output} has no version to append to: build it first with --codebooks")
    manifest, properties = current_manifest(output), snap.properties
    check_fingerprint(manifest["model_fingerprint"], properties["model_fingerprint"], "the features table")
    if complete_settings(manifest.get("extractor")) != properties["extractor"]:
        raise ArtifactError(
            f"the features were extracted with other settings than the index ({properties['extractor']} against "
            f"{manifest.get('extractor')}): extract with the index's settings, or build a new index"
        )
    if not failpoints.broken("append-table-check"):
        art.check_source(output, manifest, snap)
    built_with = manifest.get("method", "knn")
    if method not in (None, built_with):
        raise UserError(f"--append keeps the index's local method ({built_with}); rebuild it to use --method {method}")
    return manifest, built_with


def check_build(output, base, properties, codebooks, method):
    """(what the new version's manifest says of its model and codebooks, the local method) of a
    full build, refused before any work when the codebooks do not fit the table or lack what
    the method needs."""
    _, _, manifest = load_codebooks(codebooks)  # of fit, or an index's own (a rebuild)
    check_fingerprint(manifest["model_fingerprint"], properties["model_fingerprint"], "the features table")
    if method is None:  # a rebuild (update's compaction too) keeps the index's local method
        method = current_manifest(output).get("method", "knn") if base is not None else "knn"
    if method != "knn" and load_words(codebooks) is None:
        raise UserError(f"--method {method} needs ASMK visual words: fit the codebooks with --asmk-words auto")
    info = {
        "model_fingerprint": properties["model_fingerprint"],
        "model": manifest["model"],
        "codebooks": manifest.get("codebooks") or {k: manifest[k] for k in ("conf", "index_string", "code_bytes")},
        "extractor": properties["extractor"],
    }
    return info, method


def check_arguments(features, output, append, remove, codebooks):
    """Refuse, before any lease is taken, what a build cannot do (a mistyped table path must
    not leave a lease behind in a folder of that name)."""
    if remove is not None and not append:
        raise UserError("--remove takes images down from an existing index: use it with --append")
    if append and codebooks:
        raise UserError("append builds with the index's own codebooks: leave out --codebooks")
    if not append and not codebooks:
        raise UserError("--codebooks is required (the output of `delf-index fit`), unless --append")
    if not tables.exists(features):
        raise tables.missing_table(features.rstrip("/"))
    if append and current_entry(output) is None:  # checked again under the lease
        raise UserError(f"{output} has no version to append to: build it first with --codebooks")


def warn_if_dropped(output, manifest):
    """Say so when the new version of an index drops the match graph and DBA of the current one."""
    if manifest.get("augmented"):
        log.warning(
            "the new version of %s drops its match graph and DBA: `delf-index match --augment` makes them again "
            "(`update` and `remove --index` keep them current)",
            output,
        )


def plan_append(indexed, live):
    """What an append does to the index: (live records to add, rows that die, counts). `indexed`
    is the index's (image_ids, runs, dead rows); `live` the table's live records. An indexed
    image's row dies when its live record is another one (changed, extracted again) or it has
    none (deleted, taken down); a live record the index does not hold is added."""
    image_ids, runs, dead = indexed
    shown = np.ones(len(image_ids), bool)
    shown[dead] = False
    now = dict(zip(live.column("image_id").to_pylist(), live.column("run").to_pylist()))
    newly_dead, reasons, held = [], {"changed": 0, "gone": 0}, set()
    for row in np.nonzero(shown)[0]:
        run = now.get(image_ids[row])
        if run == (runs[row] or ""):
            held.add(image_ids[row])
            continue
        newly_dead.append(int(row))
        reasons["changed" if run is not None else "gone"] += 1
    keep = pc.invert(pc.is_in(live.column("image_id"), pa.array(sorted(held), pa.string())))
    return live.filter(keep), newly_dead, reasons


def take_down(features, remove, allow_unknown):
    """Record the takedowns of `remove` (image_ids, or the URI of a CSV of them) in the table
    first: every later build and append honours them."""
    ids = read_ids(remove) if isinstance(remove, str) else list(remove)
    counts = tables.take_down(features, ids, allow_unknown=allow_unknown)
    log.info("took down %d images (%d were already)", counts["removed"], counts["unchanged"])


def plan_version(output, features, snap, live, checked, append, codebooks):
    """What the new version holds, from the table's `live` records: {live records to encode,
    rows that die and why, first new image id, previous version's URI, codebooks' URI,
    manifest info}; `checked` is check_append's manifest or check_build's info. None when an
    append finds nothing to do; a full build of no live image is refused."""
    if append:
        previous_uri = current_version(output)
        indexed = art.indexed_images(previous_uri, checked)
        live, newly_dead, reasons = plan_append(indexed, live)
        if not live.num_rows and not newly_dead:
            return None
        # what describes this version alone is not carried over; nor is an augmentation, whose
        # graph and DBA files an append drops (update refreshes them: before_publish)
        dropped = ("files", "counts", "format", "format_version", "augmented", "tables")
        info = {k: v for k, v in checked.items() if k not in dropped}
        work = {"newly_dead": newly_dead, "reasons": reasons, "first_id": len(indexed[0]), "previous_uri": previous_uri,
                "codebooks_uri": previous_uri}  # fmt: skip
    else:
        if not live.num_rows:
            raise UserError(
                f"{features} version {snap.version} holds no live images: nothing to build (extract some, or "
                "restore taken-down ones)"
            )
        info = checked
        work = {"newly_dead": [], "reasons": {}, "first_id": 0, "previous_uri": None, "codebooks_uri": codebooks}
    info["features"] = {"uri": snap.uri, "table_version": snap.version, "table_id": snap.table_id}
    return {**work, "live": live, "info": info}


def shard_elements(files, first_id):
    """(EncodeShard's elements, one per data file of the table with the image id its rows start
    at, the number of images) of `files` (tables.file_skips)."""
    rows = [n for _, n, _ in files]
    offsets = first_id + np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    elements = [(k, uri, int(offset), stale) for k, ((uri, _, stale), offset) in enumerate(zip(files, offsets))]
    return elements, sum(rows)


def add_build_steps(p, elements, folder, output, version, staging, work, method):
    """Add the build's steps to pipeline `p`: each data file encoded into a shard (in parallel,
    counted into the progress `folder`), then the shards merged into the new version."""
    shards = (
        p
        | "Tables" >> beam.Create(elements)
        | "Redistribute" >> beam.Reshuffle()
        | "EncodeShard" >> beam.ParDo(EncodeShard(work["codebooks_uri"], staging, method))
        | "Progress" >> beam.ParDo(CountProgress(folder, weigh_images))
    )
    (
        p
        | "Done" >> beam.Create([None])
        | "Merge"
        >> beam.Map(
            merge_version,
            shards=beam.pvalue.AsList(shards),
            output=output,
            version=version,
            staging=staging,
            codebooks_uri=work["codebooks_uri"],
            previous_uri=work["previous_uri"],
            newly_dead=work["newly_dead"],
            info=work["info"],
            method=method,
        )
    )


def publish(output, version, base, held, operation, work, keep, grace, before_publish):
    """Make the placed `version` the index's current one (the lease `held` still ours), after
    `before_publish`; prune old versions (keep, grace)."""
    failpoints.reach("build:placed")
    if before_publish is not None:
        before_publish(posixpath.join(output, VERSIONS, version))
    held.check()
    entry = {"operation": operation, **work["info"]["features"]}
    commit_version(output, version, base, keep, grace, entry, published=lambda: failpoints.reach("build:published"))


def describe_build(manifest, features, snap, images, work, output, seconds):
    """The build's summary line."""
    counts, reasons, newly_dead = manifest["counts"], work["reasons"], work["newly_dead"]
    died = f", {len(newly_dead)} dead ({', '.join(f'{n} {k}' for k, n in reasons.items() if n)})" if newly_dead else ""
    return (
        f"build: version {manifest['version']} ({features} version {snap.version}): {counts['images']} images, "
        f"{counts['descriptors']} descriptors, {manifest['bytes_per_descriptor']} bytes/descriptor with geometry; "
        f"{images} images added{died} -> {output} ({seconds:.1f}s)"
    )


def run(
    features,
    output,
    codebooks=None,
    append=False,
    remove=None,
    keep=DEFAULT_KEEP,
    beam_options=None,
    test_pipeline=None,
    method=None,
    table_version=None,
    wait=False,
    grace=None,
    before_publish=None,
    allow_unknown=False,
):
    """Build a new version of the index at `output` from the live records of the features table
    `features` (at `table_version`, default its current one) with the codebooks of `fit`; with
    `append`, bring the current version up to date with the table instead, with its own
    codebooks (`remove`: image_ids, or the URI of a CSV of them, to take down first). `method`:
    the local index, shards.METHODS (default: the index's own when appending to or rebuilding
    one, else "knn"). `wait`: wait for another writer of the index instead of failing.
    `before_publish`: called with the URI of the new version once it is placed, before it is
    published, the lease held (`update` refreshes the match graph there; without it, a match
    graph the index holds is dropped, with a warning). `allow_unknown`: `remove` may name
    images the table never held. Returns the new version's manifest (the current one,
    unchanged, when an append finds nothing to do)."""
    flags, _ = cli.beam_flags(beam_options)
    output = output.rstrip("/")
    check_arguments(features, output, append, remove, codebooks)
    # leases in one order everywhere, the table's before the index's: two jobs never wait on each other
    taking_down = (
        lease.writing(features, "build --remove", wait=wait) if remove is not None else contextlib.nullcontext()
    )
    with (
        taking_down,
        lease.writing(output, f"build{' --append' if append else ''} --features {features}", wait=wait) as held,
    ):
        base = current_entry(output)
        planned = tables.snapshot(features, table_version)
        if append:
            checked, method = check_append(output, base, planned, method)
        else:
            checked, method = check_build(output, base, planned.properties, codebooks, method)
        if remove is not None:
            take_down(features, remove, allow_unknown)
        snap = tables.snapshot(features, table_version)
        records = snap.read(["image_id", "status", "run"])
        work = plan_version(output, features, snap, tables.live_records(records), checked, append, codebooks)
        if work is None:
            log.info(
                f"build: nothing to append to {output}: it holds the live images of {features} already",
                extra=console.SUMMARY,
            )
            return checked
        if base is not None and before_publish is None:
            warn_if_dropped(output, current_manifest(output))
        elements, images = shard_elements(tables.file_skips(snap, records, work["live"]), work["first_id"])
        version = new_version_name(base)
        staging = posixpath.join(output, STAGING, version)
        log.info("build %s %s from %s version %d: %d images", output, version, features, snap.version, images)
        start = time.time()
        pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
        folder = posixpath.join(staging, "progress")
        with progress.watching(folder, images, "build", "images"), pipeline as p:
            add_build_steps(p, elements, folder, output, version, staging, work, method)
        publish(output, version, base, held, "append" if append else "build", work, keep, grace, before_publish)
    manifest = art.Artifact.load(output).manifest
    log.info(describe_build(manifest, features, snap, images, work, output, time.time() - start), extra=console.SUMMARY)
    return manifest


def main(argv=None):
    parser = cli.Parser("build", __doc__)
    parser.add_argument("--features", required=True, help="the features table (extract's --output)")
    parser.add_argument("--codebooks", help="codebooks folder from `delf-index fit` (not with --append)")
    parser.add_argument("--output", required=True, help="index folder (any fsspec URI)")
    parser.add_argument("--append", action="store_true", help="bring the current version up to date with the table")
    parser.add_argument(
        "--remove", metavar="IDS.csv", help="with --append: take these image_ids down first (CSV or one per line)"
    )
    parser.add_argument(
        "--allow-unknown", action="store_true", help="with --remove: take down ids the table has not listed yet"
    )
    parser.add_argument("--table-version", type=int, help="build from this version of the table (default: current)")
    parser.add_argument(
        "--keep", type=int, default=DEFAULT_KEEP, help=f"versions to keep ({DEFAULT_KEEP}); 0 keeps all"
    )
    parser.add_argument("--wait", action="store_true", help="wait for another writer of the index instead of failing")
    parser.add_argument(
        "--method",
        choices=shards_lib.METHODS,
        help="local index: k-NN voting, ASMK (needs codebooks fitted with --asmk-words), or both "
        "(default: the index's when rebuilding one, else knn)",
    )
    cli.add_cache_argument(parser)
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    run(
        args.features,
        args.output,
        args.codebooks,
        args.append,
        args.remove,
        args.keep,
        beam_options,
        method=args.method,
        table_version=args.table_version,
        wait=args.wait,
        allow_unknown=args.allow_unknown,
    )
