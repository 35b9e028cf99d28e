"""`delf-index build`: feature tables + codebooks -> the index artifact (Beam).

    delf-index build --features gs://bucket/features --codebooks gs://bucket/codebooks \
        --output gs://bucket/index
    delf-index build --features gs://bucket/features-new --output gs://bucket/index --append

Steps: Tables -> Redistribute -> EncodeShard (one features table -> an IVF-PQ shard, its
geometry, images and global descriptors; in parallel) -> Merge (one worker: on-disk merge
of the inverted lists, memory-mapped geometry; indexing/builder.py) -> the artifact folder
(indexing/artifact.py), manifest.json written last.

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
import sys
import tempfile
import time

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.metrics import Metrics

from indexing import artifact as art
from indexing import builder
from pipelines.extract import local_options
from pipelines.tables import iter_batches, list_tables, same_model, table_info

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
            counts = builder.encode_shard(
                iter_batches(uri, None), self.pca, self.trained, first_id, os.path.join(tmp, name)
            )
            art.upload_folder(tmp, self.shards_uri, os.listdir(tmp))
        self.images.inc(counts["images"])
        self.descriptors.inc(counts["descriptors"])
        log.info("encoded %s: %d images, %d descriptors", uri, counts["images"], counts["descriptors"])
        yield {"shard": shard, "name": name, "table": uri, **counts}


def merge_and_publish(_, shards, output, shards_uri, codebooks_uri, previous_uri, info):
    """Merge the shards (and a previous artifact) into the artifact folder at `output`."""
    shards = sorted(shards, key=lambda s: s["shard"])
    start = time.time()
    with tempfile.TemporaryDirectory() as work:
        shard_dir = art.fetch_folder(shards_uri, cache_dir=os.path.join(work, "cache"))
        out = os.path.join(work, "artifact")
        os.makedirs(out)
        codebooks_dir = art.fetch_folder(codebooks_uri, cache_dir=os.path.join(work, "cache"))
        previous = art.fetch_folder(previous_uri, cache_dir=os.path.join(work, "cache")) if previous_uri else None
        _, trained, _ = art.load_codebooks(codebooks_dir)
        counts = builder.merge_shards([os.path.join(shard_dir, s["name"]) for s in shards], trained, out, previous)
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
    fs, root = fsspec.core.url_to_fs(shards_uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def publish(local_dir, output):
    """Put the finished files at `output`; manifest.json goes last, so that a reader never
    finds a manifest next to files of another build."""
    names = os.listdir(local_dir)
    if art.is_local(output):
        target = art.local_path(output)
        os.makedirs(target, exist_ok=True)
        if os.path.exists(os.path.join(target, "manifest.json")):
            os.remove(os.path.join(target, "manifest.json"))
        for name in sorted(names, key=lambda n: n == "manifest.json"):
            shutil.move(os.path.join(local_dir, name), os.path.join(target, name))
    else:
        fs, root = fsspec.core.url_to_fs(output)
        if fs.exists(posixpath.join(root, "manifest.json")):
            fs.rm(posixpath.join(root, "manifest.json"))
        art.upload_folder(local_dir, output, names)


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


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="delf-index build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True, help="extract output folder, its features/ folder, or a glob")
    parser.add_argument("--codebooks", help="codebooks folder from `delf-index fit` (not with --append)")
    parser.add_argument("--output", required=True, help="artifact folder (any fsspec URI)")
    parser.add_argument("--append", action="store_true", help="add the tables to the existing artifact at --output")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="local worker processes")
    return parser.parse_known_args(argv)


def run(argv=None, test_pipeline=None):
    """Run the build job; returns the artifact manifest."""
    args, beam_args = parse_args(argv)
    output = args.output.rstrip("/")
    uris = list_tables(args.features)
    infos = [(uri, *table_info(uri)) for uri in uris]
    fingerprint = same_model([(u, m) for u, _, m in infos], "the feature tables")
    previous_uri, first_id, info = None, 0, {}
    if args.append:
        if args.codebooks:
            raise ValueError("--append builds with the artifact's own codebooks: leave out --codebooks")
        previous = art.Artifact.load(output)
        art.check_fingerprint(previous.fingerprint, fingerprint, "the feature tables")
        # the merge reads the previous artifact and writes the new one elsewhere before it
        # replaces the files; its pca.npz and trained.faiss are the codebooks
        previous_uri, codebooks_uri, first_id = output, output, len(previous)
        info = {k: v for k, v in previous.manifest.items() if k not in ("files", "counts", "format", "format_version")}
    else:
        if not args.codebooks:
            raise ValueError("--codebooks is required (the output of `delf-index fit`), unless --append")
        _, _, codebooks_manifest = art.load_codebooks(args.codebooks)
        art.check_fingerprint(codebooks_manifest["model_fingerprint"], fingerprint, "the feature tables")
        codebooks_uri = args.codebooks
        info = {
            "model_fingerprint": fingerprint,
            "model": codebooks_manifest["model"],
            "codebooks": {k: codebooks_manifest[k] for k in ("conf", "index_string", "code_bytes")},
            "extractor": infos[0][2]["extractor"],
        }
    check_new_image_ids(uris, previous.row_of if args.append else {})
    rows = [n for _, n, _ in infos]
    offsets = first_id + np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    elements = [(k, uri, int(offset)) for k, (uri, offset) in enumerate(zip(uris, offsets))]
    shards_uri = posixpath.join(output, "_shards")
    log.info("build %s from %d tables (%d images)%s", output, len(uris), sum(rows), " appending" if args.append else "")
    start = time.time()
    pipeline = test_pipeline or beam.Pipeline(options=local_options(args, beam_args))
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
    artifact = art.Artifact.load(output)
    manifest = artifact.manifest
    print(
        f"build: {manifest['counts']['images']} images, {manifest['counts']['descriptors']} descriptors, "
        f"{manifest['bytes_per_descriptor']} bytes/descriptor with geometry -> {output} ({time.time() - start:.1f}s)"
    )
    return manifest


def main(argv=None):
    run(argv)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
