"""`delf-index build`: feature tables + codebooks -> a new version of the index (Beam).

    delf-index build --features gs://bucket/features --codebooks gs://bucket/codebooks \
        --output gs://bucket/index
    delf-index build --features gs://bucket/features --output gs://bucket/index --append
    delf-index build --features gs://bucket/features --output gs://bucket/index --append --remove gone.csv

From Python:

    from delf_index.pipelines import build
    manifest = build.run("gs://bucket/features", "gs://bucket/index", codebooks="gs://bucket/codebooks")
    build.run("gs://bucket/features", "gs://bucket/index", append=True)

Steps: Tables -> Redistribute -> EncodeShard (one features table -> an IVF-PQ shard, its
geometry, images and global descriptors, staged under `_staging/`; in parallel) -> Merge (one
worker: on-disk merge of the inverted lists, memory-mapped geometry; indexing/shards.py) ->
a new version of the index (indexing/artifact.py): complete, then made current by one write
of the pointer. Readers never see a half-built index; `--keep N` prunes old versions.

A build reads the live rows of the feature tables (rows that later extract runs superseded
are left out). Image int ids follow the sorted table files and the rows in them, so a
rebuild from the same tables gives the same ids. `--append` adds exactly the tables the
index does not list yet, with the index's own codebooks: an image that changed is hidden
and added again, images that extract found removed (or that `--remove` lists) are hidden;
queries skip hidden images, and the next full build leaves them out.
"""

import argparse
import csv
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing import shards as shards_lib
from delf_index.pipelines import cli
from delf_index.runtime import storage
from delf_index.runtime.tables import iter_batches, live_tables, same_model, superseded
from delf_index.schemas.artifact import ARTIFACT_VERSION, STAGING

log = logging.getLogger(__name__)
DEFAULT_KEEP = 2  # versions kept: the current one and the one before (for readers still on it)


def word_assigner(codebooks_uri, method):
    """ASMK's words of the codebooks when the method needs them, else None."""
    if method == "knn":
        return None
    words = art.load_words(codebooks_uri)
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
        self.pca, self.trained, _ = art.load_codebooks(self.codebooks_uri)
        self.words = word_assigner(self.codebooks_uri, self.method)

    def process(self, element):
        shard, uri, first_id, skip = element
        name = f"shard-{shard:05d}"
        with tempfile.TemporaryDirectory() as tmp:
            tables = iter_batches(uri, None, skip=skip)
            counts = shards_lib.encode_shard(
                tables, self.pca, self.trained, first_id, os.path.join(tmp, name), self.method, self.words
            )
            storage.upload_folder(tmp, self.staging, os.listdir(tmp))
        self.images.inc(counts["images"])
        self.descriptors.inc(counts["descriptors"])
        log.info("encoded %s: %d images, %d descriptors", uri, counts["images"], counts["descriptors"])
        yield {"shard": shard, "name": name, "table": uri, **counts}


def merge_and_publish(_, shards, output, version, staging, codebooks_uri, previous_uri, hide, info, keep, method):
    """Merge the staged shards (and the previous version) into a new version of `output`,
    then make it current."""
    shards = sorted(shards, key=lambda s: s["shard"])
    start = time.time()
    out = art.version_work_folder(output, version)
    with tempfile.TemporaryDirectory() as work:
        shard_dir = os.path.join(work, "shards")
        os.makedirs(shard_dir)
        for shard in shards:
            for suffix in shard["files"]:
                name = f"{shard['name']}.{suffix}"
                storage.download(posixpath.join(staging, name), os.path.join(shard_dir, name))
        previous = art.fetch_manifested(previous_uri, "manifest.json", "index") if previous_uri else None
        codebooks_dir, _, _ = art.codebooks_folder(codebooks_uri)  # an append's: the previous version's
        _, trained, _ = art.load_codebooks(codebooks_dir)
        prefixes = [os.path.join(shard_dir, s["name"]) for s in shards]
        words = word_assigner(codebooks_dir, method)
        steps = {}
        counts = shards_lib.merge_shards(prefixes, trained, out, previous, hide, method, words, timings=steps)
    # the codebooks travel with the index: an append encodes with them
    for name in ("pca.npz", "trained.faiss") + ((art.WORDS_FILE,) if method != "knn" else ()):
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
        "format": art.ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION if method != "knn" else 2,  # 2: readable by earlier versions
        **info,
        "version": version,
        "method": method,
        "counts": counts,
        "bytes": stored,
        # what each descriptor costs on disk: its k-NN list entry and/or code, and its geometry
        "bytes_per_descriptor": round(
            (stored["knn_lists"] + stored["codes"] + stored["geometry"]) / max(counts["descriptors"], 1), 2
        ),
        "tables": (info.get("tables") or []) + [s["table"] for s in shards],
        "merge_seconds": round(time.time() - start, 1),
        "merge_steps_seconds": {k: round(v, 1) for k, v in steps.items()},
        "files": art.file_entries(out, names),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    art.publish_version(out, output, version, keep)
    storage.remove(posixpath.join(output, STAGING))  # this build's staging and any left by interrupted ones


def read_ids(uri):
    """image_ids of a CSV (an `image_id` or `id` column, else the first) or a text file, one per line."""
    text = storage.read_bytes(uri).decode()
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    column = next((header.index(c) for c in ("image_id", "id") if c in header), None)
    body = rows[1:] if column is not None else rows
    return [row[column or 0].strip() for row in body if row and row[column or 0].strip()]


def plan_append(previous, tables, replaced, remove):
    """What an append does to the previous version: (tables to add, int ids to hide, counts).

    Tables the index lists are skipped. An indexed image is hidden when a later extract run
    superseded its row (changed, removed, retried), when a new row has its image_id (changed
    without a record, e.g. tables written elsewhere), or when `remove` lists it."""
    indexed = set(previous.manifest.get("tables", []))
    new = [t for t in tables if t[0] not in indexed]
    hide, reasons = set(), {"replaced": 0, "superseded": 0, "removed": 0}
    for row, (image_id, run) in enumerate(zip(previous.image_ids, previous.runs)):
        if previous.live[row] and image_id in replaced.get(run or "", ()):
            hide.add(row)
            reasons["superseded"] += 1
    new_ids = set()
    for uri, _, _, stale in new:
        for table in iter_batches(uri, ["image_id"], rows=100_000, skip=stale):
            new_ids.update(table.column("image_id").to_pylist())
    for image_id in new_ids:
        row = previous.row_of.get(image_id)
        if row is not None and row not in hide:
            hide.add(row)
            reasons["replaced"] += 1
    unknown = []
    for image_id in remove or ():
        row = previous.row_of.get(image_id)
        if row is None:
            unknown.append(image_id)
        elif row not in hide:
            hide.add(row)
            reasons["removed"] += 1
    if unknown:
        log.warning("%d image_ids to remove are not in the index, e.g. %s", len(unknown), unknown[:3])
    return new, sorted(hide), reasons


def check_new_image_ids(tables):
    """Refuse, before any work, image_ids that occur twice among the live rows to index."""
    seen, repeated = set(), []
    for uri, _, _, stale in tables:
        for table in iter_batches(uri, ["image_id"], rows=100_000, skip=stale):
            for image_id in table.column("image_id").to_pylist():
                if image_id in seen:
                    repeated.append(image_id)
                seen.add(image_id)
    if repeated:
        raise art.ArtifactError(
            f"{len(repeated)} image_ids occur twice in the tables, e.g. {repeated[:3]}: an image can be indexed "
            "once; give build one extract output (its runs are merged), not copies of the same tables"
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
):
    """Build a new version of the index at `output` from the live rows of the feature tables of
    `features` with the codebooks of `fit`; with `append`, add the tables the index does not
    list yet to its current version, with its own codebooks, and hide what changed or was
    removed (`remove`: image_ids, or the URI of a CSV of them). `method`: the local index,
    shards.METHODS (default: the index's own when appending to or rebuilding one, else
    "knn"). Returns the new version's manifest (the current one, unchanged, when an append
    finds nothing to do)."""
    flags, _ = cli.beam_flags(beam_options)
    output = output.rstrip("/")
    if isinstance(remove, str):
        remove = read_ids(remove)
    tables = live_tables(features)
    fingerprint = same_model([(uri, meta) for uri, _, meta, _ in tables], "the feature tables")
    extractor = tables[0][2]["extractor"]
    previous_uri, first_id, hide, info, reasons = None, 0, [], {}, {}
    if append:
        if codebooks:
            raise UserError("append builds with the index's own codebooks: leave out --codebooks")
        previous = art.Artifact.load(output, verify=False)
        art.check_fingerprint(previous.fingerprint, fingerprint, "the feature tables")
        if previous.manifest.get("extractor") != extractor:
            raise art.ArtifactError(
                f"the feature tables were extracted with other settings than the index ({extractor} against "
                f"{previous.manifest.get('extractor')}): extract with the index's settings, or build a new index"
            )
        tables, hide, reasons = plan_append(previous, tables, superseded(features), remove)
        previous_uri, codebooks_uri, first_id = previous.uri, output, previous.num_rows
        # what describes this version alone is not carried over; nor is an augmentation, whose
        # graph and DBA files an append drops
        dropped = ("files", "counts", "format", "format_version", "augmented")
        info = {k: v for k, v in previous.manifest.items() if k not in dropped}
        built_with = previous.manifest.get("method", "knn")
        if method not in (None, built_with):
            raise UserError(
                f"--append keeps the index's local method ({built_with}); rebuild it to use --method {method}"
            )
        method = built_with
        if not tables and not hide:
            print(f"build: nothing to append to {output}: every table is indexed and nothing was removed")
            return previous.manifest
    else:
        if not codebooks:
            raise UserError("--codebooks is required (the output of `delf-index fit`), unless --append")
        if remove:
            raise UserError(
                "--remove hides images of an existing index: use it with --append (a build indexes the live rows)"
            )
        _, _, codebooks_manifest = art.load_codebooks(codebooks)  # of fit, or an index's own (a rebuild)
        if method is None:  # a rebuild (update's compaction too) keeps the index's local method
            current = art.current_manifest(output) if art.read_pointer(output) is not None else {}
            method = current.get("method", "knn")
        art.check_fingerprint(codebooks_manifest["model_fingerprint"], fingerprint, "the feature tables")
        codebooks_uri = codebooks
        info = {
            "model_fingerprint": fingerprint,
            "model": codebooks_manifest["model"],
            "codebooks": codebooks_manifest.get("codebooks")
            or {k: codebooks_manifest[k] for k in ("conf", "index_string", "code_bytes")},
            "extractor": extractor,
        }
    check_new_image_ids(tables)
    rows = [n for _, n, _, _ in tables]
    offsets = first_id + np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    elements = [(k, uri, int(offset), stale) for k, ((uri, _, _, stale), offset) in enumerate(zip(tables, offsets))]
    version = art.new_version_name(output)
    staging = posixpath.join(output, STAGING, version)
    log.info(
        "build %s %s from %d tables (%d images)%s",
        output,
        version,
        len(tables),
        sum(rows),
        " appending" if append else "",
    )
    start = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
    with pipeline as p:
        shards = (
            p
            | "Tables" >> beam.Create(elements)
            | "Redistribute" >> beam.Reshuffle()
            | "EncodeShard" >> beam.ParDo(EncodeShard(codebooks_uri, staging, method))
        )
        (
            p
            | "Done" >> beam.Create([None])
            | "Merge"
            >> beam.Map(
                merge_and_publish,
                shards=beam.pvalue.AsList(shards),
                output=output,
                version=version,
                staging=staging,
                codebooks_uri=codebooks_uri,
                previous_uri=previous_uri,
                hide=hide,
                info=info,
                keep=keep,
                method=method,
            )
        )
    manifest = art.Artifact.load(output).manifest
    counts = manifest["counts"]
    hidden = f", {len(hide)} hidden ({', '.join(f'{n} {k}' for k, n in reasons.items() if n)})" if hide else ""
    print(
        f"build: version {version}: {counts['images']} images, {counts['descriptors']} descriptors, "
        f"{manifest['bytes_per_descriptor']} bytes/descriptor with geometry; {sum(rows)} images added{hidden} "
        f"-> {output} ({time.time() - start:.1f}s)"
    )
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True, help="extract output folder, its features/ folder, or a glob")
    parser.add_argument("--codebooks", help="codebooks folder from `delf-index fit` (not with --append)")
    parser.add_argument("--output", required=True, help="index folder (any fsspec URI)")
    parser.add_argument("--append", action="store_true", help="add the tables the index does not hold yet")
    parser.add_argument("--remove", metavar="IDS.csv", help="with --append: hide these image_ids (CSV or one per line)")
    parser.add_argument(
        "--keep", type=int, default=DEFAULT_KEEP, help=f"versions to keep ({DEFAULT_KEEP}); 0 keeps all"
    )
    parser.add_argument(
        "--method",
        choices=shards_lib.METHODS,
        help="local index: k-NN voting, ASMK (needs codebooks fitted with --asmk-words), or both "
        "(default: the index's when rebuilding one, else knn)",
    )
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
    )
