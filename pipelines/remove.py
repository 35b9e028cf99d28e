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
build and append leaves it out, and compaction drops its features, until a restoration
(status `restored`) lifts it. A restored image is extracted again by the next extract run
that lists it. With `--index`, the index gets a new version without the removed images at
once (`build --append`; a match graph it holds keeps the edges of the images that stay). An
image not extracted yet can be removed too: it never will be.
"""

import functools

from delf_index.errors import UserError
from delf_index.pipelines import build, cli, match
from delf_index.pipelines.extract import DEFAULT_MAX_CHANGE
from delf_index.runtime import tables
from delf_index.runtime.inputs import read_ids


def run(features, ids, restore=False, note=None, wait=False, max_change=DEFAULT_MAX_CHANGE):
    """Record the removal (or, with `restore`, the restoration) of `ids` in the features table
    `features`, as one commit. Returns the counts (tables.take_down)."""
    if not ids:
        raise UserError("no image_ids given")
    counts = tables.take_down(features, ids, restore, note, max_change, wait)
    verb = "restored" if restore else "removed"
    left = f" ({counts['unchanged']} {'not taken down' if restore else 'already down'})" if counts["unchanged"] else ""
    cli.say(f"{'restore' if restore else 'remove'}: {counts[verb]} images {verb}{left}; {features} version "
          f"{counts['table_version']}")  # fmt: skip
    return counts


def main(argv=None, restore=False):
    verb = "restore" if restore else "remove"
    parser = cli.Parser(verb, __doc__)
    parser.add_argument("--features", required=True, help="the features table")
    parser.add_argument("--ids", required=True, help="image_ids: a CSV (image_id or id column) or text file, or a,b,c")
    parser.add_argument("--note", help="why (kept in the records: a request number, a reason)")
    parser.add_argument("--wait", action="store_true", help="wait for another writer instead of failing")
    if not restore:
        parser.add_argument("--index", help="then append to this index, so that it drops them at once")
        parser.add_argument("--max-change", type=float, default=DEFAULT_MAX_CHANGE, help="refuse above this share")
    args = parser.parse_args(argv)
    run(args.features, read_ids(args.ids), restore, args.note, args.wait, getattr(args, "max_change", None))
    if getattr(args, "index", None):
        # an augmented index keeps its match graph, without the removed images' edges
        refresh = functools.partial(match.refresh_graph, args.index)
        build.run(args.features, args.index, append=True, wait=args.wait, before_publish=refresh)


def restore_main(argv=None):
    return main(argv, restore=True)
