"""ASMK's query settings on landmarks-dev: mAP of each ranking stage per configuration.

Runs the leave-one-out queries of a groups.csv against the index of a `delf-index evaluate
--method asmk` (or `both`) workdir, with the index's stored features as queries (no
extraction), once per configuration: the defaults, then each `--conf` (JSON overrides of
indexing/retrieval.py's default_conf, ASMK's own under "asmk"). Prints one JSON line per
configuration: local only, fused, and fused + verification mAP (revisitop AP, as evaluate).

    delf-index evaluate --images .../landmarks-dev/images --groups .../groups.csv \\
        --workdir /tmp/lm --method both --seed 0
    python -m benchmarks.asmk_settings --workdir /tmp/lm --groups .../groups.csv \\
        --conf '{"asmk": {"idf": false}}'
"""

import argparse
import json
import os
import time

import numpy as np

from delf_index.indexing import artifact as art
from delf_index.indexing import metrics
from delf_index.indexing.retrieval import Index
from delf_index.pipelines.evaluate import groups_protocol
from delf_index.runtime import tables

STAGES = {
    "local only": {"use_global": False, "use_verification": False},
    "fused": {"use_verification": False},
    "fused + verification": {},
}


def stage_map(artifact, features, queries, conf):
    """{stage: mAP over the queries} of one configuration, and its seconds per query."""
    out, start = {}, time.perf_counter()
    for stage, switches in STAGES.items():
        index = Index(artifact, {"local_method": "asmk", **conf, **switches})
        aps = []
        for query in queries:
            results = index.search(features[query["id"]], top_k=None, exclude=query["exclude"], with_matches=False)
            aps.append(metrics.query_metrics([r.image_id for r in results], query["positives"]["all"])["ap"])
        out[stage] = round(float(np.mean(aps)), 4)
    return out, (time.perf_counter() - start) / len(queries)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a `delf-index evaluate --method asmk|both` workdir")
    parser.add_argument("--groups", required=True, help="the groups.csv it was evaluated with")
    parser.add_argument("--conf", action="append", default=[], help="JSON overrides of the query configuration")
    args = parser.parse_args(argv)
    _, queries = groups_protocol(args.groups, os.path.dirname(os.path.abspath(args.groups)))
    features = dict(tables.iter_features(os.path.join(args.workdir, "features")))
    artifact = art.Artifact.load(os.path.join(args.workdir, "index"))
    if artifact.asmk is None:
        raise SystemExit(f"{args.workdir}/index has no ASMK lists: evaluate it with --method asmk or both")
    for conf in [{}] + [json.loads(c) for c in args.conf]:
        scores, seconds = stage_map(artifact, features, queries, conf)
        print(json.dumps({"conf": conf, **scores, "s_per_query_all_stages": round(seconds, 3)}), flush=True)


if __name__ == "__main__":
    main()
