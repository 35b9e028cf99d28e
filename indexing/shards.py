"""Building the index artifact in two steps that bound memory (schemas/artifact.py has the layout).

1. `encode_shard`: one features table (or any iterator of rows) -> shard files: an IVF-PQ
   index of its descriptors, their geometry, its images and global descriptors. Shards are
   independent, so Beam runs them in parallel; each holds one table's descriptors at most.
2. `merge_shards`: all shards (and, to append, a previous artifact) -> the artifact. The
   inverted lists are merged into an on-disk file through faiss's memory-mapped readers, and
   geometry is copied shard by shard into a memory-mapped array, so no step holds the
   corpus' descriptors in memory. The global-descriptor index (float16, one row per image)
   is the one part held in RAM while it is written: 2.5 KB per image with the default model.
   Images of the previous artifact that the new rows replace, or that were removed, are
   listed in hidden.npy; queries skip them, and the next full build leaves them out.
"""

import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_index.indexing import artifact as art
from delf_index.indexing import pca as pca_lib
from delf_index.schemas.artifact import IMAGES_SCHEMA, MAX_COORDINATE, MAX_FEATURES
from delf_index.schemas.features import descriptors_of

SHARD_SUFFIXES = ("ivf.faiss", "geometry.npy", "images.parquet", "global.npy")


def shard_files(prefix):
    return {suffix: f"{prefix}.{suffix}" for suffix in SHARD_SUFFIXES}


def encode_shard(tables, pca, trained, first_id, prefix):
    """Encode feature-table chunks (pyarrow Tables) into shard files `prefix`.*; image int ids
    are consecutive from `first_id` in row order. Returns {"images", "descriptors"}."""
    index = faiss.clone_index(trained)
    geometry, globals_, images = [], [], []
    next_id = first_id
    for table in tables:
        counts = table.column("num_features").to_numpy().astype(np.int64)
        descriptors = descriptors_of(table)
        assert len(descriptors) == counts.sum()
        check_ranges(table, counts)
        if len(descriptors):
            ids = np.concatenate([art.feature_ids(next_id + i, c) for i, c in enumerate(counts)])
            index.add_with_ids(pca_lib.apply_pca(descriptors, pca), ids)
        x = table.column("x").combine_chunks().flatten().to_numpy()
        y = table.column("y").combine_chunks().flatten().to_numpy()
        scale = table.column("scale").combine_chunks().flatten().to_numpy()
        geometry.append(art.pack_geometry(x, y, scale))
        glob = table.column("global_descriptor").combine_chunks()
        globals_.append(glob.flatten().to_numpy().reshape(len(table), -1).astype(np.float16))
        runs = table.column("run") if "run" in table.column_names else pa.array([""] * len(table), pa.string())
        images.append(
            pa.table(
                {
                    "id": pa.array(np.arange(next_id, next_id + len(table)), pa.int64()),
                    "image_id": table.column("image_id"),
                    "uri": table.column("uri"),
                    "label": table.column("label"),
                    "width": table.column("width"),
                    "height": table.column("height"),
                    "num_features": table.column("num_features"),
                    "run": runs,
                }
            )
        )
        next_id += len(table)
    files = shard_files(prefix)
    faiss.write_index(index, files["ivf.faiss"])
    np.save(files["geometry.npy"], np.concatenate(geometry) if geometry else np.zeros((0, 3), np.uint16))
    np.save(files["global.npy"], np.concatenate(globals_) if globals_ else np.zeros((0, 0), np.float16))
    schema = IMAGES_SCHEMA.remove(IMAGES_SCHEMA.get_field_index("geometry_offset"))
    pq.write_table(pa.concat_tables(images).cast(schema) if images else schema.empty_table(), files["images.parquet"])
    return {"images": next_id - first_id, "descriptors": int(index.ntotal)}


def check_ranges(table, counts):
    """The geometry packs a feature's index in 16 bits of its id and x, y in uint16 pixels:
    refuse what does not fit, naming the image, rather than wrap or clip silently."""
    ids = table.column("image_id").to_pylist()
    too_many = np.nonzero(counts > MAX_FEATURES)[0]
    if len(too_many):
        raise art.ArtifactError(
            f"{ids[too_many[0]]} has {counts[too_many[0]]} features; an index holds at most {MAX_FEATURES} per "
            "image: extract with a lower max_features"
        )
    for column in ("x", "y"):
        values = table.column(column).combine_chunks().flatten().to_numpy()
        bad = np.nonzero((values < -0.5) | (values > MAX_COORDINATE + 0.49))[0]
        if len(bad):
            image = np.searchsorted(np.cumsum(counts), bad[0], side="right")
            raise art.ArtifactError(
                f"{ids[image]} has a keypoint at {column} = {values[bad[0]]:.1f}, beyond the index's pixel range "
                f"0..{MAX_COORDINATE}: such images cannot be indexed (shrink them first)"
            )


def merge_shards(prefixes, trained, out_dir, previous=None, hide=()):
    """Shards (local prefixes, in id order) [+ a previous local artifact folder] -> artifact
    files in `out_dir`: index.faiss + index.ivfdata, images.parquet, geometry.npy, global.faiss,
    hidden.npy (the previous artifact's hidden images and the int ids in `hide`).
    Returns the counts {"images", "descriptors", "hidden"}."""
    # inverted lists: memory-mapped sources merged into one on-disk file
    sources, keep_alive = [], []
    if previous is not None:
        old = faiss.read_index(os.path.join(previous, "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
        keep_alive.append(old)
        sources.append(faiss.extract_index_ivf(old).invlists)
    for prefix in prefixes:
        shard = faiss.read_index(shard_files(prefix)["ivf.faiss"], faiss.IO_FLAG_MMAP)
        keep_alive.append(shard)
        sources.append(faiss.extract_index_ivf(shard).invlists)
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.path.join(out_dir, "index.ivfdata"))
    vector = faiss.InvertedListsPtrVector()
    for source in sources:
        vector.push_back(source)
    ntotal = invlists.merge_from_multiple(vector.data(), vector.size(), False) if sources else 0
    index.ntotal = ivf.ntotal = ntotal
    # the header stores the data file's name: a bare name keeps index.faiss identical across
    # builds (readers find the file next to it, IO_FLAG_ONDISK_SAME_DIR)
    invlists.filename = "index.ivfdata"
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    faiss.write_index(index, os.path.join(out_dir, "index.faiss"))
    del index, keep_alive

    # image table, with where each image's geometry starts
    tables = [pq.read_table(os.path.join(previous, "images.parquet")).drop(["geometry_offset"])] if previous else []
    tables += [pq.read_table(shard_files(p)["images.parquet"]) for p in prefixes]
    images = pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table().drop(["geometry_offset"])
    ids = images.column("id").to_numpy()
    if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
        raise art.ArtifactError("image ids of the shards are not consecutive: shards missing or out of order")
    image_ids = images.column("image_id").to_pylist()
    hidden = set(np.load(os.path.join(previous, "hidden.npy")).tolist()) if previous else set()
    hidden.update(int(h) for h in hide)
    live = [image_id for row, image_id in enumerate(image_ids) if row not in hidden]
    if len(set(live)) != len(live):
        seen, dup = set(), []
        for image_id in live:
            if image_id in seen:
                dup.append(image_id)
            seen.add(image_id)
        raise art.ArtifactError(f"{len(dup)} image_ids occur twice, e.g. {dup[:3]}: an image can be indexed once")
    np.save(os.path.join(out_dir, "hidden.npy"), np.array(sorted(hidden), np.int64))
    counts = images.column("num_features").to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
    images = images.append_column("geometry_offset", pa.array(offsets, pa.int64())).cast(IMAGES_SCHEMA)
    pq.write_table(images, os.path.join(out_dir, "images.parquet"))
    if int(counts.sum()) != ntotal:
        raise art.ArtifactError(f"{ntotal} indexed descriptors but the image table counts {int(counts.sum())}")

    # geometry, copied piece by piece into a memory-mapped array
    pieces = [os.path.join(previous, "geometry.npy")] if previous else []
    pieces += [shard_files(p)["geometry.npy"] for p in prefixes]
    geometry = np.lib.format.open_memmap(
        os.path.join(out_dir, "geometry.npy"), mode="w+", dtype=np.uint16, shape=(int(counts.sum()), 3)
    )
    start = 0
    for piece in pieces:
        rows = np.load(piece, mmap_mode="r")
        geometry[start : start + len(rows)] = rows
        start += len(rows)
    geometry.flush()
    del geometry

    # global descriptors: float16, inner product, row = image int id
    chunks = []
    if previous:
        old = faiss.read_index(os.path.join(previous, "global.faiss"))
        chunks.append(old.reconstruct_n(0, old.ntotal).astype(np.float16))
    chunks += [np.load(shard_files(p)["global.npy"]) for p in prefixes]
    dim = max([c.shape[1] for c in chunks] + [1])
    global_index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for chunk in chunks:
        if len(chunk):
            global_index.add(chunk.astype(np.float32))
    faiss.write_index(global_index, os.path.join(out_dir, "global.faiss"))
    return {"images": len(image_ids) - len(hidden), "descriptors": int(ntotal), "hidden": len(hidden)}
