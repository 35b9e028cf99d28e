"""`delf-index build`: feature tables + codebooks -> the index artifact (Beam).

    delf-index build --features gs://bucket/features --codebooks gs://bucket/codebooks \
        --output gs://bucket/index
    delf-index build --features gs://bucket/features-new --output gs://bucket/index --append

Steps: Tables -> Redistribute -> EncodeShard (one features table -> an IVF-PQ shard, its
geometry, images and global descriptors; in parallel) -> Merge (one worker: on-disk merge
of the inverted lists, memory-mapped geometry; indexing/builder.py) -> the artifact folder
(indexing/artifact.py), manifest.json written last.

From Python:

    from delf_index.pipelines import build
    manifest = build.run("gs://bucket/features", "gs://bucket/index", codebooks="gs://bucket/codebooks")
    build.run("gs://bucket/features-new", "gs://bucket/index", append=True)

Image int ids follow the sorted table files and the rows in them, so a rebuild from the same
tables gives the same ids. `--append` adds tables to an existing artifact with its own
codebooks; the image_ids must be new.
"""

import argparse
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
from delf_index.runtime.tables import iter_batches, list_tables, same_model, table_info

log = logging.getLogger(__name__)


class EncodeShard(beam.DoFn):
    """(shard number, features table URI, first image id) -> shard files under `shards_uri`."""

    def __init__(self, codebooks_uri, shards_uri):
        self.codebooks_uri, self.shards_uri = codebooks_uri, shards_uri
        self.images = Metrics.counter("delf_index", "images_encoded")
        self.descriptors = Metrics.counter("delf_index", "descriptors_encoded")

    def setup(self):
        self.pca, self.trained, _ = art.load_codebooks(self.codebooks_uri)

    def process(self, element):
        shard, uri, first_id = element
        name = f"shard-{shard:05d}"
        with tempfile.TemporaryDirectory() as tmp:
            counts = shards_lib.encode_shard(
                iter_batches(uri, None), self.pca, self.trained, first_id, os.path.join(tmp, name)
            )
            storage.upload_folder(tmp, self.shards_uri, os.listdir(tmp))
        self.images.inc(counts["images"])
        self.descriptors.inc(counts["descriptors"])
        log.info("encoded %s: %d images, %d descriptors", uri, counts["images"], counts["descriptors"])
        yield {"shard": shard, "name": name, "table": uri, **counts}


def merge_and_publish(_, shards, output, shards_uri, codebooks_uri, previous_uri, info):
    """Merge the shards (and a previous artifact) into the artifact folder at `output`."""
    shards = sorted(shards, key=lambda s: s["shard"])
    start = time.time()
    with tempfile.TemporaryDirectory() as work:
        shard_dir = storage.fetch_folder(shards_uri, cache_dir=os.path.join(work, "cache"))
        out = os.path.join(work, "artifact")
        os.makedirs(out)
        codebooks_dir = storage.fetch_folder(codebooks_uri, cache_dir=os.path.join(work, "cache"))
        previous = storage.fetch_folder(previous_uri, cache_dir=os.path.join(work, "cache")) if previous_uri else None
        _, trained, _ = art.load_codebooks(codebooks_dir)
        counts = shards_lib.merge_shards([os.path.join(shard_dir, s["name"]) for s in shards], trained, out, previous)
        for name in ("pca.npz", "trained.faiss"):
            shutil.copy(os.path.join(codebooks_dir, name), os.path.join(out, name))
        names = sorted(os.listdir(out))
        ivf_bytes = os.path.getsize(os.path.join(out, "index.ivfdata"))
        geometry_bytes = os.path.getsize(os.path.join(out, "geometry.npy"))
        manifest = {
            "format": art.ARTIFACT_FORMAT,
            "format_version": art.FORMAT_VERSION,
            **info,
            "counts": counts,
            "bytes_per_descriptor": round((ivf_bytes + geometry_bytes) / max(counts["descriptors"], 1), 2),
            "tables": (info.get("tables") or []) + [s["table"] for s in shards],
            "merge_seconds": round(time.time() - start, 1),
            "files": art.file_entries(out, names),
        }
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        publish(out, output)
    fs, root = storage.filesystem(shards_uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def publish(local_dir, output):
    """Put the finished files at `output`; manifest.json goes last, so that a reader never
    finds a manifest next to files of another build."""
    names = os.listdir(local_dir)
    if storage.is_local(output):
        target = storage.local_path(output)
        os.makedirs(target, exist_ok=True)
        if os.path.exists(os.path.join(target, "manifest.json")):
            os.remove(os.path.join(target, "manifest.json"))
        for name in sorted(names, key=lambda n: n == "manifest.json"):
            shutil.move(os.path.join(local_dir, name), os.path.join(target, name))
    else:
        fs, root = storage.filesystem(output)
        if fs.exists(posixpath.join(root, "manifest.json")):
            fs.rm(posixpath.join(root, "manifest.json"))
        storage.upload_folder(local_dir, output, names)


def check_new_image_ids(uris, indexed):
    """Refuse, before any work, image_ids that occur twice or are already in the artifact."""
    seen, repeated = set(indexed), []
    for uri in uris:
        for table in iter_batches(uri, ["image_id"], rows=100_000):
            for image_id in table.column("image_id").to_pylist():
                if image_id in seen:
                    repeated.append(image_id)
                seen.add(image_id)
    if repeated:
        where = "are already in the index or " if indexed else ""
        raise art.ArtifactError(
            f"{len(repeated)} image_ids {where}occur twice, e.g. {repeated[:3]}: an image can be indexed "
            "once; leave already indexed tables out of --append"
        )


def run(features, output, codebooks=None, append=False, beam_options=None, test_pipeline=None):
    """Build the index artifact at `output` from the feature tables of `features` with the
    codebooks of `fit`; with `append`, add the tables to the artifact at `output` with its
    own codebooks. Returns the artifact manifest."""
    flags, _ = cli.beam_flags(beam_options)
    output = output.rstrip("/")
    uris = list_tables(features)
    infos = [(uri, *table_info(uri)) for uri in uris]
    fingerprint = same_model([(u, m) for u, _, m in infos], "the feature tables")
    previous_uri, first_id, info, indexed = None, 0, {}, {}
    if append:
        if codebooks:
            raise UserError("append builds with the artifact's own codebooks: leave out --codebooks")
        previous = art.Artifact.load(output)
        art.check_fingerprint(previous.fingerprint, fingerprint, "the feature tables")
        # the merge reads the previous artifact and writes the new one elsewhere before it
        # replaces the files; its pca.npz and trained.faiss are the codebooks
        previous_uri, codebooks_uri, first_id, indexed = output, output, len(previous), previous.row_of
        info = {k: v for k, v in previous.manifest.items() if k not in ("files", "counts", "format", "format_version")}
    else:
        if not codebooks:
            raise UserError("--codebooks is required (the output of `delf-index fit`), unless --append")
        _, _, codebooks_manifest = art.load_codebooks(codebooks)
        art.check_fingerprint(codebooks_manifest["model_fingerprint"], fingerprint, "the feature tables")
        codebooks_uri = codebooks
        info = {
            "model_fingerprint": fingerprint,
            "model": codebooks_manifest["model"],
            "codebooks": {k: codebooks_manifest[k] for k in ("conf", "index_string", "code_bytes")},
            "extractor": infos[0][2]["extractor"],
        }
    check_new_image_ids(uris, indexed)
    rows = [n for _, n, _ in infos]
    offsets = first_id + np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    elements = [(k, uri, int(offset)) for k, (uri, offset) in enumerate(zip(uris, offsets))]
    shards_uri = posixpath.join(output, "_shards")
    log.info("build %s from %d tables (%d images)%s", output, len(uris), sum(rows), " appending" if append else "")
    start = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
    with pipeline as p:
        shards = (
            p
            | "Tables" >> beam.Create(elements)
            | "Redistribute" >> beam.Reshuffle()
            | "EncodeShard" >> beam.ParDo(EncodeShard(codebooks_uri, shards_uri))
        )
        (
            p
            | "Done" >> beam.Create([None])
            | "Merge"
            >> beam.Map(
                merge_and_publish,
                shards=beam.pvalue.AsList(shards),
                output=output,
                shards_uri=shards_uri,
                codebooks_uri=codebooks_uri,
                previous_uri=previous_uri,
                info=info,
            )
        )
    manifest = art.Artifact.load(output).manifest
    print(
        f"build: {manifest['counts']['images']} images, {manifest['counts']['descriptors']} descriptors, "
        f"{manifest['bytes_per_descriptor']} bytes/descriptor with geometry -> {output} ({time.time() - start:.1f}s)"
    )
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True, help="extract output folder, its features/ folder, or a glob")
    parser.add_argument("--codebooks", help="codebooks folder from `delf-index fit` (not with --append)")
    parser.add_argument("--output", required=True, help="artifact folder (any fsspec URI)")
    parser.add_argument("--append", action="store_true", help="add the tables to the existing artifact at --output")
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    run(args.features, args.output, args.codebooks, args.append, beam_options=beam_options)
