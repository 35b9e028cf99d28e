"""`delf-index query`: which indexed images show the same place as these images?

    delf-index query --index gs://bucket/index photo.jpg
    delf-index query --index /data/index a.jpg b.jpg --top 5 --json
    delf-index query --index /data/index photo.jpg --visualize matches/

Prints the ranked results with their verified inliers; `--visualize DIR` writes one PNG per
result with both images side by side and its strongest inlier correspondences drawn (at most
`--max-lines`, 100: more hide the pictures), and an index.html to open them.
"""

import json
import os
import sys
import time

from delf_index.errors import UserError
from delf_index.indexing.retrieval import Index
from delf_index.pipelines import cli
from delf_index.pipelines.visualize import draw_matches, save_png
from delf_index.runtime.images import read_image


def visualize(query_path, query_image, results, folder, max_lines=100):
    """One PNG per result under `folder`, at most `max_lines` correspondences each (strongest
    first); returns the paths written (unreadable matches skipped)."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(str(query_path)))[0]
    written = []
    for rank, result in enumerate(results, 1):
        try:
            match = read_image(result.uri)
        except (UserError, OSError) as e:
            print(f"  cannot draw {result.image_id}: {e}", file=sys.stderr)
            continue
        title = f"#{rank} {result.image_id}: {result.inliers} inliers, score {result.score:.3f}"
        if result.inliers > max_lines:
            title += f" ({max_lines} strongest drawn)"
        path = os.path.join(folder, f"{stem}-{rank:02d}.png")
        lines = [None if xy is None else xy[:max_lines] for xy in (result.query_xy, result.match_xy)]
        save_png(path, draw_matches(query_image, match, *lines, title))
        written.append(path)
    return written


def main(argv=None):
    parser = cli.Parser("query", __doc__)
    parser.add_argument("images", nargs="+", help="query images (paths or fsspec URIs)")
    parser.add_argument("--index", required=True, help="index artifact folder from `delf-index build`")
    parser.add_argument("--top", type=int, default=10, help="results per query")
    parser.add_argument("--json", action="store_true", help="one JSON line per query")
    parser.add_argument("--visualize", metavar="DIR", help="write a PNG of each result's inlier matches here")
    parser.add_argument("--model", help="the model the index was built from (default: found by its fingerprint)")
    parser.add_argument("--no-global", action="store_true", help="switch off the global descriptor")
    parser.add_argument(
        "--local-method",
        choices=("knn", "asmk", "both"),
        help="local ranking of an index built with both: either, or both fused (default: knn)",
    )
    parser.add_argument("--no-local", action="store_true", help="switch off the local ranking (votes or ASMK)")
    parser.add_argument("--no-verification", action="store_true", help="switch off geometric verification")
    cli.add_ranking_arguments(parser)
    parser.add_argument("--max-lines", type=int, default=100, help="correspondences drawn per match, strongest first")
    cli.add_cache_argument(parser)
    args = parser.parse_args(argv)
    conf = {
        "use_global": not args.no_global,
        "use_local": not args.no_local,
        "use_verification": not args.no_verification,
        "local_method": args.local_method,
        **cli.ranking_conf_from_args(args),
    }
    index = Index.load(args.index, model=args.model, conf=conf)
    failures = 0
    for path in args.images:
        start = time.perf_counter()
        try:
            results = index.search(path, top_k=args.top)  # decoded and shrunk as extract does
            image = read_image(path) if args.visualize else None
        except (UserError, OSError) as e:
            failures += 1
            message = f"{path}: cannot query: {e}"
            print(json.dumps({"query": path, "error": str(e)}) if args.json else message, file=sys.stderr)
            continue
        seconds = time.perf_counter() - start
        if args.json:
            print(json.dumps({"query": path, "seconds": round(seconds, 3), "results": [r.as_dict() for r in results]}))
        else:
            # the order is not the score's: verification decides it (retrieval.py, `verified_first`)
            print(f"{path}: {len(results)} results from {len(index)} images ({seconds:.2f}s), "
                  "most verified inliers first, then by score")  # fmt: skip
            for rank, r in enumerate(results, 1):
                verified = f"{r.inliers:4d} inliers" if r.inliers else "  not verified"
                print(f"  {rank:3d}. {r.image_id:<40} {verified}  score {r.score:.3f}")
        if args.visualize:
            written = visualize(path, image, results, args.visualize, args.max_lines)
            if not args.json:
                print(f"  {len(written)} match images in {args.visualize}/")
    return 1 if failures == len(args.images) else 0
