"""`delf-index update`: the scheduled run over a growing collection. Extracts what is new or
changed, adds it to the index as a new version, hides what changed or disappeared.

    delf-index update --input 'gs://bucket/photos/**/*.jpg' --features gs://bucket/features \
        --index gs://bucket/index
    delf-index update --input train.csv --features /data/features --index /data/index \
        --codebooks /data/codebooks --retry-errors

From Python:

    from delf_index.pipelines import update
    counts = update.run("gs://bucket/photos/**/*.jpg", "gs://bucket/features", "gs://bucket/index")

Steps: extract (incremental: only new and changed images, docs/pipelines.md) -> build
--append (the new tables; changed and removed images hidden) -> a new current version. The
first run, with no index yet, fits codebooks (unless --codebooks names them) and builds.
When hidden images pass `compact_above` of the index, the run rebuilds it from the live
rows with its own codebooks, so that hidden entries do not pile up. Readers keep loading the
previous version until the new one is complete.
"""

import argparse
import logging
import posixpath
import time

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.pipelines import build, cli, extract, fit

log = logging.getLogger(__name__)

default_conf = {
    "extract": {},  # overrides of extract.default_conf (the settings must stay those of the features)
    "fit": {},  # overrides of indexing.codebooks.default_conf, for the first run's codebooks
    "compact_above": 0.25,  # rebuild when this share of the indexed images is hidden; None: never
    "keep": build.DEFAULT_KEEP,  # index versions kept
}


def run(input, features, index, codebooks=None, conf=None, model=None, beam_options=None, retry_errors=False):
    """One scheduled update of `index` from the images of `input`, through the extract output
    `features`. Returns the counts of what it did (also printed on one line)."""
    unknown = set(conf or {}) - set(default_conf)
    if unknown:
        raise UserError(f"unknown update options {sorted(unknown)}; known: {sorted(default_conf)}")
    conf = {**default_conf, **(conf or {})}
    start = time.time()
    extracted = extract.run(input, features, conf["extract"], model, beam_options, retry_errors=retry_errors)
    if extracted["images"] and not extracted["extracted"]:
        raise UserError(f"every one of the {extracted['images']} images failed; see {features}/errors")
    counts = {
        "run": extracted["run"],
        **{k: extracted[k] for k in ("listed", *extract.DECISIONS, "extracted", "failed")},
    }
    if art.read_pointer(index) is None and not art.storage_has(index, "manifest.json"):
        if codebooks is None:
            codebooks = posixpath.join(index.rstrip("/"), "codebooks")
            fit.run(features, codebooks, conf["fit"], beam_options)
        manifest = build.run(features, index, codebooks=codebooks, keep=conf["keep"], beam_options=beam_options)
        action = "built"
    else:
        manifest = build.run(features, index, append=True, keep=conf["keep"], beam_options=beam_options)
        action = "appended"
        hidden, images = manifest["counts"].get("hidden", 0), manifest["counts"]["images"]
        if conf["compact_above"] is not None and hidden > conf["compact_above"] * (images + hidden):
            log.info(
                "%d of %d indexed images are hidden: rebuilding %s from the live rows", hidden, hidden + images, index
            )
            manifest = build.run(features, index, codebooks=index, keep=conf["keep"], beam_options=beam_options)
            action = "rebuilt"
    counts.update(
        index=action,
        version=manifest["version"],
        images=manifest["counts"]["images"],
        hidden=manifest["counts"].get("hidden", 0),
        seconds=round(time.time() - start, 1),
    )
    print("update: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index update", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob, directory, tar shards or manifest (any fsspec URI)")
    parser.add_argument("--features", required=True, help="the extract output it keeps up to date")
    parser.add_argument("--index", required=True, help="the index it keeps up to date")
    parser.add_argument("--codebooks", help="codebooks for the first build (default: fit them into INDEX/codebooks)")
    parser.add_argument("--model", help="exported .onnx model (default: the shipped one)")
    parser.add_argument("--retry-errors", action="store_true", help="also retry the images that failed before")
    parser.add_argument("--compact-above", type=float, help="rebuild above this share of hidden images (0.25)")
    parser.add_argument("--keep", type=int, help=f"index versions kept ({build.DEFAULT_KEEP})")
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    conf = {k: getattr(args, k) for k in ("compact_above", "keep") if getattr(args, k) is not None}
    run(args.input, args.features, args.index, args.codebooks, conf, args.model, beam_options, args.retry_errors)
