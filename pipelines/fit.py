"""`delf-index fit`: feature tables -> PCA and PQ codebooks (the Beam reduce stage).

    delf-index fit --features gs://bucket/features --output gs://bucket/codebooks
    delf-index fit --features '/data/features/features/*.parquet' --output /data/codebooks \
        --sample 500000 --pca-dim 40 --pq PQ10x8 --nlist 4096

Steps: Tables -> Redistribute -> SampleTable (each table's bottom-k by a seeded hash of
(image_id, feature index)) -> Sample (the global bottom-k: a uniform sample that does not
depend on how the work was split) -> Fit (PCA in DELF's order, then faiss coarse quantizer
and PQ on the reduced sample) -> codebooks folder (indexing/artifact.py).
"""

import argparse
import hashlib
import logging
import os
import sys
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from indexing import artifact as art
from indexing import codebooks as cb
from indexing import pca as pca_lib
from pipelines.extract import local_options
from pipelines.tables import iter_batches, list_tables, same_model, table_info
from schemas.features import descriptors_of

log = logging.getLogger(__name__)


def splitmix64(x):
    """A fast, well-mixed 64-bit hash of uint64 values (numpy, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(image_id, count, seed):
    """Pseudo-random uint64 keys of an image's descriptors, fixed by (seed, image_id, index)."""
    base = int.from_bytes(hashlib.md5(f"{seed}:{image_id}".encode()).digest()[:8], "big")
    return splitmix64(np.uint64(base) + np.arange(count, dtype=np.uint64))


def bottom_k(keys, descriptors, k):
    """The k descriptors with the smallest keys, sorted by key."""
    if len(keys) > k:
        part = np.argpartition(keys, k - 1)[:k]
        keys, descriptors = keys[part], descriptors[part]
    order = np.argsort(keys, kind="stable")
    return keys[order], descriptors[order]


class SampleTable(beam.DoFn):
    """One features table -> its bottom-k descriptors by key, and its counts."""

    def __init__(self, k, seed):
        self.k, self.seed = k, seed
        self.descriptors_read = Metrics.counter("delf_index", "descriptors_read")

    def process(self, uri):
        keys, descriptors, images, total = [], [], 0, 0
        for table in iter_batches(uri, ["image_id", "num_features", "descriptors"]):
            counts = table.column("num_features").to_numpy()
            ids = table.column("image_id").to_pylist()
            keys.append(np.concatenate([sample_keys(i, c, self.seed) for i, c in zip(ids, counts)] or [[]]))
            descriptors.append(descriptors_of(table))
            images += len(ids)
            total += int(counts.sum())
            if sum(len(k) for k in keys) > 4 * self.k:  # keep memory near the sample size
                merged = bottom_k(np.concatenate(keys).astype(np.uint64), np.concatenate(descriptors), self.k)
                keys, descriptors = [merged[0]], [merged[1]]
        self.descriptors_read.inc(total)
        merged_keys, merged_desc = bottom_k(np.concatenate(keys).astype(np.uint64), np.concatenate(descriptors), self.k)
        yield {"keys": merged_keys, "descriptors": merged_desc, "images": images, "descriptors_total": total}


class BottomKSample(beam.CombineFn):
    """Merge per-table samples into the corpus' bottom-k: a seeded uniform sample."""

    def __init__(self, k):
        self.k = k

    def create_accumulator(self):
        return None

    def add_input(self, acc, part):
        return self.merge_accumulators([acc, part])

    def merge_accumulators(self, accumulators):
        parts = [a for a in accumulators if a is not None]
        if not parts:
            return None
        keys, descriptors = bottom_k(
            np.concatenate([p["keys"] for p in parts]), np.concatenate([p["descriptors"] for p in parts]), self.k
        )
        return {
            "keys": keys,
            "descriptors": descriptors,
            "images": sum(p["images"] for p in parts),
            "descriptors_total": sum(p["descriptors_total"] for p in parts),
        }

    def extract_output(self, acc):
        return acc


def fit_codebooks(sample, conf):
    """(pca, trained faiss index, info) from a sample dict of BottomKSample."""
    descriptors = sample["descriptors"].astype(np.float32)
    if len(descriptors) < 1000:
        raise ValueError(f"only {len(descriptors)} descriptors to fit on; fit needs at least 1000")
    start = time.time()
    pca = pca_lib.fit_pca(descriptors, conf["pca_dim"], conf["whiten"])
    reduced = pca_lib.apply_pca(descriptors, pca)
    nlist = conf["nlist"] or cb.auto_nlist(sample["descriptors_total"], len(reduced))
    spec = cb.index_string(conf["pca_dim"], nlist, conf["pq"], conf["opq"])
    log.info("training %s on %d descriptors", spec, len(reduced))
    trained = cb.train_index(reduced, spec, conf["seed"])
    info = {
        "conf": {**conf, "nlist": nlist},
        "index_string": spec,
        "code_bytes": cb.code_bytes(trained),
        "pca_explained_variance": pca["explained_variance"],
        "sample_descriptors": len(reduced),
        "corpus_images": sample["images"],
        "corpus_descriptors": sample["descriptors_total"],
        "fit_seconds": round(time.time() - start, 1),
    }
    return pca, trained, info


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="delf-index fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True, help="extract output folder, its features/ folder, or a glob")
    parser.add_argument("--output", required=True, help="codebooks folder (any fsspec URI)")
    parser.add_argument("--sample", type=int, default=cb.default_conf["sample"], help="descriptors to train on")
    parser.add_argument("--pca-dim", type=int, default=cb.default_conf["pca_dim"])
    parser.add_argument("--whiten", action="store_true", help="PCA whitening (DELF v1: off)")
    parser.add_argument("--pq", default=cb.default_conf["pq"], help="PQ{sub-vectors}x{bits}, e.g. PQ10x8, PQ10x5")
    parser.add_argument("--opq", action="store_true", help="learn an OPQ rotation before PQ")
    parser.add_argument("--nlist", type=int, help="coarse cells (default: about 4 sqrt(descriptors))")
    parser.add_argument("--seed", type=int, default=cb.default_conf["seed"])
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="local worker processes")
    return parser.parse_known_args(argv)


def run(argv=None, test_pipeline=None):
    """Run the fit job; returns the codebooks manifest."""
    args, beam_args = parse_args(argv)
    conf = {
        "pca_dim": args.pca_dim,
        "whiten": args.whiten,
        "pq": args.pq,
        "opq": args.opq,
        "nlist": args.nlist,
        "sample": args.sample,
        "seed": args.seed,
    }
    cb.index_string(args.pca_dim, 1, args.pq, args.opq)  # validate the shapes before any work
    uris = list_tables(args.features)
    footers = [(uri, *table_info(uri)) for uri in uris]
    if not any(rows for _, rows, _ in footers):
        raise ValueError(
            f"{args.features}: the feature tables hold no images; if extraction failed for every image, "
            "its errors table (next to the features folder) says why"
        )
    uris = [uri for uri, rows, _ in footers if rows]  # tables of failed shards are empty
    infos = [(uri, meta) for uri, _, meta in footers]
    fingerprint = same_model(infos)
    model = infos[0][1]["model"]
    if args.pca_dim > model["descriptor_dim"]:
        raise ValueError(f"--pca-dim {args.pca_dim} exceeds the descriptor dimension {model['descriptor_dim']}")
    log.info("fit on %d feature tables of model %s", len(uris), fingerprint[:12])

    def fit_and_write(sample):
        pca, trained, info = fit_codebooks(sample, conf)
        info.update(model_fingerprint=fingerprint, model=model, features=args.features)
        art.write_codebooks(args.output, pca, trained, info)

    pipeline = test_pipeline or beam.Pipeline(options=local_options(args, beam_args))
    with pipeline as p:
        (
            p
            | "Tables" >> beam.Create(uris)
            | "Redistribute" >> beam.Reshuffle()
            | "SampleTable" >> beam.ParDo(SampleTable(args.sample, args.seed))
            | "Sample" >> beam.CombineGlobally(BottomKSample(args.sample))
            | "Fit" >> beam.Map(fit_and_write)
        )
    pca, trained, manifest = art.load_codebooks(args.output)
    print(
        f"fit: {manifest['index_string']} on {manifest['sample_descriptors']} of {manifest['corpus_descriptors']} "
        f"descriptors ({manifest['corpus_images']} images), PCA keeps {manifest['pca_explained_variance']:.1%} "
        f"of the variance, {manifest['code_bytes']}-byte codes -> {args.output}"
    )
    return manifest


def main(argv=None):
    run(argv)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
