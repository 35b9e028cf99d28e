"""`delf-index update`: the scheduled run over a growing collection. Extracts what is new or
changed, records what was deleted, brings the index up to date as a new version.

    delf-index update --input 'gs://bucket/photos/**/*.jpg' --features gs://bucket/features \
        --index gs://bucket/index
    delf-index update --input train.csv --features /data/features --index /data/index \
        --codebooks /data/codebooks --retry-errors

From Python:

    from delf_index.pipelines import update
    counts = update.run("gs://bucket/photos/**/*.jpg", "gs://bucket/features", "gs://bucket/index")

Steps, holding the table's lease and then the index's (a second update waits with --wait, or
stops naming the first): extract (incremental, one commit; docs/pipelines.md) -> build
--append (the index compared with the table's live records: new and changed images added,
the rows of changed, deleted and removed ones dead) -> a new current version. The first run,
with no index yet, fits codebooks (unless --codebooks names them) and builds. When dead rows
pass `compact_above` of the index, the run rebuilds it from the live records with its own
codebooks; when dead records pass `compact_table_above` of the table, it compacts the table
(`delf-index compact`). When the index holds a match graph (`delf-index match --augment`),
each new version gets it brought up to date before it is published: the old edges among the
images that stay, the new images searched against the new version, DBA computed again where
their neighbours changed (pipelines/match.py, `refresh_graph`; `--no-graph-refresh` drops
it instead). Readers keep loading the previous version until the new one is complete. A
listing that would delete or replace more than `--max-change` of the images stops the run
before any work (extract's guard), and so does a --features that is not the table the index
was built from (another table, an older copy of it, a path where no table is: `check_table`).
"""

import logging
import posixpath
import time

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing.versions import current_entry, current_manifest
from delf_index.pipelines import build, cli, compact, extract, fit, match
from delf_index.runtime import console, failpoints, lease, tables
from delf_index.runtime.conf import resolve_conf
from delf_index.schemas.artifact import dead_count

log = logging.getLogger(__name__)

default_conf = {
    "extract": {},  # overrides of extract.default_conf (the settings must stay those of the features)
    "fit": {},  # overrides of indexing.codebooks.default_conf, for the first run's codebooks
    "compact_above": 0.25,  # rebuild the index when this share of its rows is dead; None: never
    "compact_table_above": 0.25,  # compact the table when this share of its records is dead; None: never
    "keep": build.DEFAULT_KEEP,  # index versions kept
    # seconds an index version outlives its successor, readers may be loading it; None:
    # DELF_INDEX_GRACE_SECONDS, else 600 (indexing/versions.py, grace_seconds)
    "grace": None,
    # bring the match graph and DBA of an augmented index up to date in each new version
    # (its new images searched, not the whole index); False: new versions drop them
    "refresh_graph": True,
}


def run(
    input,
    features,
    index,
    codebooks=None,
    conf=None,
    model=None,
    beam_options=None,
    retry_errors=False,
    keep_unlisted=False,
    dry_run=False,
    wait=False,
):
    """One scheduled update of `index` from the images of `input`, through the features table
    `features`. Returns the counts of what it did (also logged on one line)."""
    conf = resolve_conf(conf, default_conf, "update")
    versions = {"keep": conf["keep"], "grace": conf["grace"]}
    start = time.time()
    check_table(index, features)
    with lease.writing(features, f"update --input {input}", wait=wait), lease.writing(index, "update", wait=wait):
        extracted = extract.run(
            input, features, conf["extract"], model, beam_options, retry_errors=retry_errors,
            keep_unlisted=keep_unlisted, dry_run=dry_run,
        )  # fmt: skip
        if dry_run:
            return extracted
        if extracted["images"] and not extracted["extracted"]:
            raise UserError(
                f"every one of the {extracted['images']} images failed: see the failed records of {features}"
            )
        graph, refreshed = None, []  # the refresh of the match graph, and its counts (graph_refresh)
        counts = {
            "run": extracted["run"],
            **{k: extracted[k] for k in ("listed", *extract.DECISIONS, "hashed", "extracted", "failed")},
        }
        if current_entry(index) is None:
            if codebooks is None:
                codebooks = posixpath.join(index.rstrip("/"), "codebooks")
                fit.run(features, codebooks, conf["fit"], beam_options)
            manifest = build.run(features, index, codebooks=codebooks, beam_options=beam_options, **versions)
            action = "built"
        else:
            graph, refreshed = graph_refresh(index, conf["refresh_graph"], beam_options)
            current = current_entry(index)["version"]
            manifest = build.run(features, index, append=True, beam_options=beam_options, before_publish=graph,
                                 **versions)  # fmt: skip
            action = "appended" if manifest["version"] != current else "unchanged"
            dead_rows, images = dead_count(manifest["counts"]), manifest["counts"]["images"]
            if (
                images
                and conf["compact_above"] is not None
                and dead_rows > conf["compact_above"] * (images + dead_rows)
            ):
                log.info("%d of %d rows of the index are dead: rebuilding %s", dead_rows, dead_rows + images, index)
                # the rebuild numbers the rows anew: the graph follows its images (same image_id and run)
                manifest = build.run(features, index, codebooks=index, beam_options=beam_options,
                                     before_publish=graph, **versions)  # fmt: skip
                action = "rebuilt"
        if conf["compact_table_above"] is not None:
            dead = compact.dead_share(features)
            if dead > conf["compact_table_above"]:
                log.info("%.0f%% of the records of %s are dead: compacting it", 100 * dead, features)
                compact.run(features)
                counts["table"] = "compacted"
    counts.update(
        index=action,
        version=manifest["version"],
        table_version=manifest.get("features", {}).get("table_version"),
        images=manifest["counts"]["images"],
        dead=dead_count(manifest["counts"]),
        seconds=round(time.time() - start, 1),
    )
    if graph is not None:  # the images the match graph's refresh searched: the new ones
        counts["graph_searched"] = refreshed[0]["searched"] if refreshed else 0
    log.info("update: " + ", ".join(f"{k} {v}" for k, v in counts.items()), extra=console.SUMMARY)
    return counts


def check_table(index, features):
    """Refuse, before any work, a features table other than the one the index was built from,
    or an older version of it (artifact.check_source): a mistyped --features would otherwise
    become a new table, extracted from scratch, that the index would follow, taken-down
    images and all. An update creates a table only for an index that names none."""
    if current_entry(index) is None or failpoints.broken("update-table-check"):
        return
    manifest = current_manifest(index)
    source = manifest.get("features")
    if source and not tables.exists(features):
        raise UserError(
            f"no features table at {features}, and {index} was built from {source['uri']}: check --features (update "
            "creates a table only for an index that names none)"
        )
    if source:
        art.check_source(index, manifest, tables.snapshot(features))


def graph_refresh(index, enabled, beam_options):
    """(the refresh of the match graph that an update's builds call before publishing, the list
    it adds each refresh's counts to). No refresh (None) when the index holds no graph, or when
    it is off: the new version then drops the graph, and the build says so."""
    held, refreshed = current_manifest(index).get("augmented"), []
    if not (held and enabled):
        return None, refreshed

    def refresh(version):
        entry = match.refresh_graph(index, version, beam_options)
        if entry:
            refreshed.append(entry["refreshed"])

    return refresh, refreshed


def main(argv=None):
    parser = cli.Parser("update", __doc__)
    parser.add_argument("--input", required=True, help="glob, directory, tar shards or manifest (any fsspec URI)")
    parser.add_argument("--features", required=True, help="the features table it keeps up to date")
    parser.add_argument("--index", required=True, help="the index it keeps up to date")
    parser.add_argument("--codebooks", help="codebooks for the first build (default: fit them into INDEX/codebooks)")
    parser.add_argument("--model", help="int8 or float32 (shipped; default: the table's, else int8 on CPUs), or .onnx")
    parser.add_argument("--retry-errors", action="store_true", help="also retry the images that failed before")
    parser.add_argument("--compact-above", type=float, help="rebuild above this share of dead rows in the index (0.25)")
    parser.add_argument("--keep", type=int, help=f"index versions kept ({build.DEFAULT_KEEP})")
    parser.add_argument(
        "--no-graph-refresh",
        action="store_true",
        help="an augmented index's new version drops its match graph and DBA instead of refreshing them",
    )
    extract.add_run_arguments(parser)
    cli.add_beam_arguments(parser)
    args, beam_options = cli.parse_job_args(parser, argv)
    conf = {k: getattr(args, k) for k in ("compact_above", "keep") if getattr(args, k) is not None}
    if args.no_graph_refresh:
        conf["refresh_graph"] = False
    if args.max_change is not None:
        conf["extract"] = {"max_change": args.max_change}
    run(
        args.input,
        args.features,
        args.index,
        args.codebooks,
        conf,
        args.model,
        beam_options,
        args.retry_errors,
        args.keep_unlisted,
        args.dry_run,
        args.wait,
    )
