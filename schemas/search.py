"""Arrow schemas of the tables `delf-index search` and `delf-index match` write, version 1
(docs/tables.md shows them with DuckDB queries).

search: ``results`` (one row per query and rank; a query with nothing to rank has one row of
rank 0 and a null image_id) and ``errors`` (image_id, uri, stage, error: the stages of a
features table's failures, and ``search`` for a query that failed after extraction). Every
query is in exactly one of them.

match: ``pairs`` (each unordered pair of images verified in at least one direction, once),
``clusters`` (every image of the index: its connected component over pairs with at least
`min_inliers` inliers), and, when the images have labels, ``label_images`` (per image, what
its verified neighbours' labels say) and ``labels`` (per label, its images that verify
against nothing of their own label).

File metadata of every table: ``delf_index.table``, ``delf_index.schema_version``,
``delf_index.index`` (the index version searched), ``delf_index.model_fingerprint`` and
``delf_index.conf`` (the query settings, JSON).
"""

import json

import pyarrow as pa

SCHEMA_VERSION = 1

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query_uri", pa.string()),
        pa.field("rank", pa.int32()),  # 1 = best; 0: the query had nothing to rank
        pa.field("image_id", pa.string()),
        pa.field("score", pa.float32()),  # fused: global + local_weight * votes
        pa.field("global_score", pa.float32()),
        pa.field("local_score", pa.float32()),
        pa.field("inliers", pa.int32()),  # verified inliers; 0: not verified or under min_inliers
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string()),  # list | read | decode | size | extract | search
        pa.field("error", pa.string()),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("image_a", pa.string(), nullable=False),  # image_a < image_b
        pa.field("image_b", pa.string(), nullable=False),
        pa.field("inliers_ab", pa.int32()),  # found as a result of querying with image_a (0: not)
        pa.field("inliers_ba", pa.int32()),
        pa.field("score_ab", pa.float32()),  # null when b was not among a's results
        pa.field("score_ba", pa.float32()),
        pa.field("inliers", pa.int32()),  # the larger of the two directions
    ]
)

CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("cluster", pa.int64()),  # 0 = the largest component; ties by smallest image_id
        pa.field("cluster_size", pa.int64()),
    ]
)

LABEL_IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("neighbours", pa.int32()),  # verified neighbours with a label
        pa.field("same_label", pa.int32()),  # of them, carrying this image's label
        pa.field("same_label_share", pa.float32()),  # null without neighbours
        pa.field("voted_label", pa.string()),  # the neighbours' most frequent label
        pa.field("voted_share", pa.float32()),
        pa.field("suspicion", pa.float32()),  # share of neighbours voting for one other label; 0 when own wins
        pa.field("suspect_rank", pa.int32()),  # 1 = the most suspicious label
    ]
)

LABELS_SCHEMA = pa.schema(
    [
        pa.field("label", pa.string(), nullable=False),
        pa.field("images", pa.int32()),
        pa.field("verified_within", pa.int32()),  # images with a verified neighbour of their label
        pa.field("alone", pa.int32()),  # images that verify against nothing of their label
        pa.field("alone_ids", pa.list_(pa.string())),
    ]
)


def table_metadata(table, index_version, model_fingerprint, conf):
    return {
        "delf_index.table": table,
        "delf_index.schema_version": str(SCHEMA_VERSION),
        "delf_index.index": index_version,
        "delf_index.model_fingerprint": model_fingerprint,
        "delf_index.conf": json.dumps(conf, sort_keys=True, default=str),
    }
