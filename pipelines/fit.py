"""`delf-index fit`: the features table -> PCA and PQ codebooks (the Beam reduce stage).

    delf-index fit --features gs://bucket/features --output gs://bucket/codebooks
    delf-index fit --features '/data/features/features/*.parquet' --output /data/codebooks \
        --sample 500000 --pca-dim 40 --pq PQ10x8 --nlist 4096

From Python (`conf` overrides indexing.codebooks.default_conf, or names a preset):

    from delf_index.pipelines import fit
    manifest = fit.run("gs://bucket/features", "gs://bucket/codebooks", conf={"seed": 1})

Steps: Tables -> Redistribute -> SampleTable (each table's bottom-k by a seeded hash of
(image_id, feature index)) -> Sample (the global bottom-k: a uniform sample that does not
depend on how the work was split) -> Fit (PCA in DELF's order, then faiss coarse quantizer
and PQ on the reduced sample) -> codebooks folder (indexing/codebooks_io.py).
"""

import logging

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from delf_index.errors import UserError
from delf_index.indexing import codebooks as cb
from delf_index.indexing.codebooks_io import load_codebooks, write_codebooks
from delf_index.pipelines import cli
from delf_index.runtime import console
from delf_index.runtime.conf import resolve_conf
from delf_index.runtime.tables import iter_batches, live_tables
from delf_index.schemas.features import descriptors_of

log = logging.getLogger(__name__)


class SampleTable(beam.DoFn):
    """One features table -> its bottom-k descriptors by key, and its counts."""

    def __init__(self, k, seed):
        self.k, self.seed = k, seed
        self.descriptors_read = Metrics.counter("delf_index", "descriptors_read")

    def process(self, element):
        uri, stale = element
        parts = []
        for table in iter_batches(uri, ["image_id", "num_features", "descriptors"], skip=stale):
            counts = table.column("num_features").to_numpy()
            ids = table.column("image_id").to_pylist()
            keys = [cb.sample_keys(i, c, self.seed) for i, c in zip(ids, counts)]
            parts.append(
                {
                    "keys": np.concatenate(keys or [np.zeros(0, np.uint64)]),
                    "descriptors": descriptors_of(table),
                    "images": len(ids),
                    "descriptors_total": int(counts.sum()),
                }
            )
            if sum(len(p["keys"]) for p in parts) > 4 * self.k:  # keep memory near the sample size
                parts = [cb.merge_samples(parts, self.k)]
        sample = cb.merge_samples(parts, self.k)
        self.descriptors_read.inc(sample["descriptors_total"])
        yield sample


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
        return cb.merge_samples(parts, self.k) if parts else None

    def extract_output(self, acc):
        return acc


def run(features, output, conf=None, beam_options=None, test_pipeline=None):
    """Fit PCA and PQ codebooks on a sample of the live descriptors of the features table
    `features` (at its current version); write them to `output`. Returns the codebooks
    manifest."""
    conf = resolve_conf(conf, cb.default_conf, "fit", cb.presets)
    cb.index_string(conf["pca_dim"], 1, conf["pq"], conf["opq"])  # check the shapes before any work
    flags, _ = cli.beam_flags(beam_options)
    snap, files = live_tables(features)
    if not files:
        raise UserError(
            f"{features}: the features table holds no live images; if extraction failed for every image, its "
            "records with status 'failed' say why (docs/tables.md)"
        )
    fingerprint, model = snap.properties["model_fingerprint"], snap.properties["model"]
    elements = [(uri, stale) for uri, _, stale in files]
    if conf["pca_dim"] > model["descriptor_dim"]:
        raise UserError(f"pca_dim {conf['pca_dim']} exceeds the descriptor dimension {model['descriptor_dim']}")
    log.info("fit on %d files of %s version %d (model %s)", len(elements), features, snap.version, fingerprint[:12])

    table_version = snap.version

    def fit_and_write(sample):
        pca, trained, words, info = cb.fit_codebooks(sample, conf)
        info.update(model_fingerprint=fingerprint, model=model, features=features, table_version=table_version)
        write_codebooks(output, pca, trained, info, words)

    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(flags))
    with pipeline as p:
        (
            p
            | "Tables" >> beam.Create(elements)
            | "Redistribute" >> beam.Reshuffle()
            | "SampleTable" >> beam.ParDo(SampleTable(conf["sample"], conf["seed"]))
            | "Sample" >> beam.CombineGlobally(BottomKSample(conf["sample"]))
            | "Fit" >> beam.Map(fit_and_write)
        )
    _, _, manifest = load_codebooks(output)
    log.info(
        f"fit: {manifest['index_string']} on {manifest['sample_descriptors']} of {manifest['corpus_descriptors']} "
        f"descriptors ({manifest['corpus_images']} images), PCA keeps {manifest['pca_explained_variance']:.1%} "
        f"of the variance, {manifest['code_bytes']}-byte codes -> {output}",
        extra=console.SUMMARY,
    )
    return manifest


def main(argv=None):
    parser = cli.Parser("fit", __doc__)
    parser.add_argument("--features", required=True, help="the features table (extract's --output)")
    parser.add_argument("--output", required=True, help="codebooks folder (any fsspec URI)")
    parser.add_argument("--preset", choices=sorted(cb.presets), default="default", help="named configuration")
    parser.add_argument("--sample", type=int, help=f"descriptors to train on ({cb.default_conf['sample']})")
    parser.add_argument("--pca-dim", type=int, help=f"reduced dimension ({cb.default_conf['pca_dim']})")
    parser.add_argument("--whiten", action="store_true", default=None, help="PCA whitening (DELF v1: off)")
    parser.add_argument("--pq", help="PQ{sub-vectors}x{bits}, e.g. PQ10x8 (default), PQ10x5")
    parser.add_argument("--opq", action="store_true", default=None, help="learn an OPQ rotation before PQ")
    parser.add_argument("--nlist", type=int, help="coarse cells (default: about 4 sqrt(descriptors))")
    parser.add_argument("--seed", type=int, help="seed of the sample and the k-means (0)")
    parser.add_argument(
        "--asmk-words",
        type=lambda v: v if v == "auto" else int(v),
        help="ASMK visual words: a number or auto (0: none)",
    )
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    conf = dict(cb.presets[args.preset])
    conf.update({k: getattr(args, k) for k in cb.default_conf if getattr(args, k) is not None})
    run(args.features, args.output, conf, beam_options=beam_options)
