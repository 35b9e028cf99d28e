"""Which pyramid levels should make the global descriptor? The whole system on landmarks-dev.

    python -m benchmarks.global_scales --workdir /tmp/lm13 --out /tmp/global-scales

`--workdir` is a `delf-index evaluate` workdir of landmarks-dev. Each image's per-level GeM
descriptors are computed once, through the extractor exactly as extract runs it; the local
features do not depend on the choice and stay those of the workdir's tables. For each
candidate set of levels the global descriptors are averaged, the tables rewritten with them,
the index rebuilt with codebooks of seeds 0, 1 and 2, and every grouped image queried
leave-one-out with the default settings (fused ranking + verification). Prints one JSON line
per candidate: global-only and full-ranking mAP per seed.
"""

import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq

from benchmarks.landmarks import LANDMARKS, read_groups
from delf_index.indexing import metrics
from delf_index.indexing.retrieval import Index
from delf_index.pipelines import build, fit
from delf_index.runtime.extractor import Extractor
from delf_index.runtime.features import Features
from delf_index.runtime.images import prepare_for_extraction
from delf_index.runtime.tables import list_tables
from delf_index.schemas.features import rows_to_table

CANDIDATES = [
    (0.7071, 1.0, 1.4142),  # the default until this measurement (DELG's)
    (0.5, 0.7071, 1.0),
    (0.3536, 0.5, 0.7071),
    (0.3536, 0.5, 0.7071, 1.0),
    (0.25,),
    (0.5,),
    (1.0,),
]


def level_globals(extractor, path):
    """{pyramid scale: L2-normalised GeM descriptor} of one image, prepared as extract does."""
    with open(path, "rb") as f:
        image, _ = prepare_for_extraction(f.read(), extractor.conf["max_image_size"])
    levels = extractor.pyramid(image)
    outputs = extractor.run_network([(k, level[1], level[2]) for k, level in enumerate(levels)], 1)
    return {round(level[0], 4): outputs[k][3] for k, level in enumerate(levels)}


def averaged(per_level, scales):
    g = np.mean([per_level[round(s, 4)] for s in scales], axis=0)
    return (g / np.linalg.norm(g)).astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    groups = dict(read_groups())
    source = pq.read_table(list_tables(os.path.join(args.workdir, "features")))
    rows = {r["image_id"]: r for r in source.to_pylist()}
    extractor = Extractor()
    cache = os.path.join(args.out, "levels.npz")
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(cache):
        with np.load(cache) as f:
            levels = {k: dict(zip(f["scales"].tolist(), f[k])) for k in f.files if k != "scales"}
    else:
        levels = {i: level_globals(extractor, os.path.join(LANDMARKS, "images", i)) for i in sorted(rows)}
        scales = sorted(next(iter(levels.values())))
        np.savez(cache, scales=np.array(scales), **{i: np.stack([v[s] for s in scales]) for i, v in levels.items()})
        levels = {i: dict(zip(scales, np.stack([v[s] for s in scales]))) for i, v in levels.items()}
    check = averaged(levels[sorted(rows)[0]], extractor.conf["global_scales"])
    assert np.allclose(check, rows[sorted(rows)[0]]["global_descriptor"], atol=1e-4), "not the extractor's global"
    codebooks = {}
    for seed in (0, 1, 2):
        codebooks[seed] = os.path.join(args.out, f"codebooks-{seed}")
        if not os.path.exists(os.path.join(codebooks[seed], "codebooks.json")):
            fit.run(os.path.join(args.workdir, "features"), codebooks[seed], {"seed": seed})
    queries = [(i, [o for o, g in groups.items() if g == groups[i] and o != i]) for i in sorted(rows) if groups[i]]
    for scales in CANDIDATES:
        name = "-".join(f"{s:g}" for s in scales)
        tables = os.path.join(args.out, name, "features")
        os.makedirs(tables, exist_ok=True)
        new_rows = []
        for image_id, row in sorted(rows.items()):
            descriptor = averaged(levels[image_id], scales)
            new_rows.append({**row, "global_descriptor": descriptor})
        schema = source.schema
        pq.write_table(rows_to_table(new_rows, schema), os.path.join(tables, "features-00000-of-00001.parquet"))
        result = {"global_scales": scales}
        for seed in (0, 1, 2):
            index_uri = os.path.join(args.out, name, f"index-{seed}")
            build.run(tables, index_uri, codebooks=codebooks[seed])
            for config, conf in (("global only", {"use_local": False, "use_verification": False}), ("full", {})):
                if config == "global only" and seed:
                    continue  # does not depend on the codebooks
                index = Index.load(index_uri, conf=conf)
                features = {r["image_id"]: Features.from_row(r) for r in new_rows}
                aps = []
                for image_id, positives in queries:
                    results = index.search(features[image_id], top_k=None, exclude=[image_id], with_matches=False)
                    ranking = [r.image_id for r in results]
                    aps.append(metrics.query_metrics(ranking, positives)["ap"])
                result[f"{config} seed {seed}"] = round(float(np.mean(aps)), 4)
        result["full mean"] = round(np.mean([result[f"full seed {s}"] for s in (0, 1, 2)]), 4)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
