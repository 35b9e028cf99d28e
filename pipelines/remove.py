"""`delf-index remove` and `delf-index restore`: take images down, and lift takedowns.

    delf-index remove --features gs://bucket/features --ids takedown.csv --index gs://bucket/index
    delf-index remove --features gs://bucket/features --ids paris/0001.jpg,paris/0002.jpg --note "request 1234"
    delf-index restore --features gs://bucket/features --ids takedown.csv

From Python:

    from delf_index.pipelines import build, remove
    remove.run("gs://bucket/features", ["paris/0001.jpg"], note="request 1234")
    build.run("gs://bucket/features", "gs://bucket/index", append=True)   # what --index does

A removal is a record in the features table (status `removed`, one commit), not a flag of
one index: every later extract skips the image even while its file is still listed, every
build and append leaves it out, until a restoration (status `restored`) lifts it. The same
commit rewrites the data files that held the image's records without them, and once it is
committed those files are deleted, with any other data file in the table's folder that
holds them (of earlier versions, or of runs that never committed): when `remove` ends, the
image's features are gone from the table's storage (docs/tables.md, "Takedowns"). A
restored image is extracted again by the next extract run that lists it. With `--index`,
the index gets a new version without the removed images at once (`build --append`; a
match graph it holds keeps the edges of the images that stay); without it, every index
built from the table serves them until its next append or update, and the command says so.
Ids the table never held (a typo) are refused before anything is written; `--allow-unknown`
takes them down anyway (a takedown list ahead of the collection: they will never be
extracted).
"""

import functools
import logging

from delf_index.errors import UserError
from delf_index.indexing import artifact as art
from delf_index.indexing.versions import current_entry, current_manifest
from delf_index.pipelines import build, cli, match
from delf_index.pipelines.extract import DEFAULT_MAX_CHANGE
from delf_index.runtime import console, failpoints, tables
from delf_index.runtime.inputs import read_ids

log = logging.getLogger(__name__)


def run(features, ids, restore=False, note=None, wait=False, max_change=DEFAULT_MAX_CHANGE, index=None,
        allow_unknown=False):  # fmt: skip
    """Record the removal (or, with `restore`, the restoration) of `ids` in the features table
    `features`, as one commit; a removal leaves no other record of the images on storage
    (tables.take_down). With `index`, its next version leaves them out at once (an append;
    its match graph kept without their edges). Ids the table never held are refused unless
    `allow_unknown`. Everything is checked before anything is written: the ids, and that
    `index` was built from this table. Returns the counts (tables.take_down)."""
    if not ids:
        raise UserError("no image_ids given")
    if index is not None:
        check_index(index, features)
    counts = tables.take_down(features, ids, restore, note, max_change, wait, allow_unknown)
    verb = "restored" if restore else "removed"
    left = f" ({counts['unchanged']} {'not taken down' if restore else 'already down'})" if counts["unchanged"] else ""
    purged = "" if restore else f"; {counts['files_rewritten']} data files rewritten, {counts['files_deleted']} deleted"
    log.info(f"{'restore' if restore else 'remove'}: {counts[verb]} images {verb}{left}; {features} version "
            f"{counts['table_version']}{purged}", extra=console.SUMMARY)  # fmt: skip
    if index is not None:
        # an augmented index keeps its match graph, without the removed images' edges
        refresh = functools.partial(match.refresh_graph, index)
        build.run(features, index, append=True, wait=wait, before_publish=refresh)
    elif counts.get("removed"):
        log.warning(
            "the %d images are out of %s, but every index built from it serves them until its next `build --append` "
            "or `update` (pass --index to leave them out of one at once)",
            counts["removed"],
            features,
        )
    return counts


def check_index(index, features):
    """Refuse, before anything is written, an `--index` that holds no index or was built from
    another table (or a newer version of this one than `features` holds)."""
    if current_entry(index) is None:
        raise UserError(f"no index at {index}: check --index (nothing was taken down)")
    if tables.exists(features) and not failpoints.broken("append-table-check"):
        art.check_source(index, current_manifest(index), tables.snapshot(features))


def main(argv=None, restore=False):
    verb = "restore" if restore else "remove"
    parser = cli.Parser(verb, __doc__)
    parser.add_argument("--features", required=True, help="the features table")
    parser.add_argument("--ids", required=True, help="image_ids: a CSV (image_id or id column) or text file, or a,b,c")
    parser.add_argument("--note", help="why (kept in the records: a request number, a reason)")
    parser.add_argument("--wait", action="store_true", help="wait for another writer instead of failing")
    parser.add_argument(
        "--allow-unknown",
        action="store_true",
        help="ids the table never held are " + ("skipped" if restore else "taken down too (a list ahead of the table)"),
    )
    if not restore:
        parser.add_argument("--index", help="then append to this index, so that it leaves them out at once")
        parser.add_argument("--max-change", type=float, default=DEFAULT_MAX_CHANGE, help="refuse above this share")
    args = parser.parse_args(argv)
    run(args.features, read_ids(args.ids), restore, args.note, args.wait, getattr(args, "max_change", None),
        getattr(args, "index", None), args.allow_unknown)  # fmt: skip


def restore_main(argv=None):
    return main(argv, restore=True)
