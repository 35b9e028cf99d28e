"""Building the index artifact in two steps that bound memory (schemas/artifact.py has the layout).

1. `encode_shard`: one features table (or any iterator of rows) -> shard files: an IVF-PQ
   index of its descriptors (k-NN voting), their geometry, its images and global
   descriptors, and with ASMK its aggregated word codes and a compact code per descriptor
   for verification. Shards are independent, so Beam runs them in parallel; each holds one
   table's descriptors at most.
2. `merge_shards`: all shards (and, to append, a previous artifact) -> the artifact. The
   inverted lists are merged into an on-disk file through faiss's memory-mapped readers, and
   geometry is copied shard by shard into a memory-mapped array, so no step holds the
   corpus' descriptors in memory. The global-descriptor index (float16, one row per image)
   is the one part held in RAM while it is written: 2.5 KB per image with the default model.
   Images of the previous artifact that the new rows replace, or that were removed, are its
   dead rows, listed in dead.npy; queries skip them, and the next full build leaves them out.
"""

import logging
import os
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_index.indexing import artifact as art
from delf_index.indexing import asmk
from delf_index.indexing import pca as pca_lib
from delf_index.indexing.manifests import ArtifactError
from delf_index.runtime import console
from delf_index.schemas.artifact import DEAD_ROWS, IMAGES_SCHEMA, MAX_COORDINATE, MAX_FEATURES, dead_rows_file
from delf_index.schemas.features import descriptors_of

SHARD_SUFFIXES = ("ivf.faiss", "geometry.npy", "images.parquet", "global.npy", "codes.npy")
# ASMK entries of a shard, sorted by (word, image): words int32, images int32, packed signatures
ASMK_SHARD_SUFFIXES = ("asmk-words.npy", "asmk-images.npy", "asmk-signatures.npy")
log = logging.getLogger(__name__)
METHODS = ("knn", "asmk", "both")  # what a build writes: k-NN voting's lists, ASMK's inverted file, or both
ASMK_FILES = tuple(f"asmk_{key}.npy" for key in asmk.LIST_KEYS)


def shard_files(prefix):
    return {suffix: f"{prefix}.{suffix}" for suffix in SHARD_SUFFIXES + ASMK_SHARD_SUFFIXES}


class WordAssigner:
    """ASMK's words for a build: the centroids and the index that assigns descriptors to them."""

    def __init__(self, centroids, index=None):
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.index = asmk.word_index(self.centroids) if index is None else index


def image_rows(table, first_id):
    """The shard's image table rows of a features-table chunk, ids consecutive from `first_id`
    (without geometry offsets: the merge sets them)."""
    runs = table.column("run") if "run" in table.column_names else pa.array([""] * len(table), pa.string())
    return pa.table(
        {
            "id": pa.array(np.arange(first_id, first_id + len(table)), pa.int64()),
            "image_id": table.column("image_id"),
            "uri": table.column("uri"),
            "label": table.column("label"),
            "width": table.column("width"),
            "height": table.column("height"),
            "num_features": table.column("num_features"),
            "run": runs,
        }
    )


def encode_shard(tables, pca, trained, first_id, prefix, method="knn", words=None, timings=None):
    """Encode feature-table chunks (pyarrow Tables) into shard files `prefix`.*; image int ids
    are consecutive from `first_id` in row order. `method` (METHODS) says which local index to
    encode; ASMK needs `words` (a WordAssigner). Returns {"images", "descriptors", "files"};
    `timings` (a dict) receives the seconds of each step (benchmarks/local_scale.py)."""
    timings = {} if timings is None else timings
    clock = Clock(timings)
    knn, use_asmk = method in ("knn", "both"), method in ("asmk", "both")
    if use_asmk and words is None:
        raise ArtifactError("an ASMK index needs ASMK visual words: fit the codebooks with --asmk-words")
    index = faiss.clone_index(trained)
    geometry, globals_, images, entries, codes = [], [], [], [], []
    next_id = first_id
    dim = pca["components"].shape[0]  # of the reduced descriptors: bits of an ASMK signature
    for table in tables:
        clock.lap("read_s")  # producing the table: reading a features file (here, or a generator)
        counts = table.column("num_features").to_numpy().astype(np.int64)
        descriptors = descriptors_of(table)
        assert len(descriptors) == counts.sum()
        check_ranges(table, counts)
        reduced = pca_lib.apply_pca(descriptors, pca) if len(descriptors) else np.zeros((0, dim))
        encoded = trained.sa_encode(np.ascontiguousarray(reduced, np.float32)) if len(descriptors) else None
        clock.lap("encode_s")  # PCA, coarse assignment and PQ codes, shared by both methods
        if knn and len(descriptors):
            # the codes are the lists' entries: one coarse assignment serves both stores
            ids = np.concatenate([art.feature_ids(next_id + i, c) for i, c in enumerate(counts)])
            # IndexPreTransform (OPQ) has no add_sa_codes; its codes are its IVF's codes
            lists = faiss.extract_index_ivf(index)
            lists.add_sa_codes(encoded, ids)
            index.ntotal = lists.ntotal
            clock.lap("knn_lists_s")
        if use_asmk and len(descriptors):
            codes.append(encoded)
            assigned = asmk.assign(words.index, reduced, 1)
            clock.lap("asmk_assign_s")
            starts = np.concatenate([[0], np.cumsum(counts)])
            for i in range(len(counts)):
                if counts[i]:
                    mine = slice(starts[i], starts[i + 1])
                    found, signatures = asmk.aggregate(reduced[mine], assigned[mine], words.centroids)
                    entries.append((found, np.full(len(found), next_id + i), signatures))
            clock.lap("asmk_aggregate_s")
        x = table.column("x").combine_chunks().flatten().to_numpy()
        y = table.column("y").combine_chunks().flatten().to_numpy()
        scale = table.column("scale").combine_chunks().flatten().to_numpy()
        geometry.append(art.pack_geometry(x, y, scale))
        glob = table.column("global_descriptor").combine_chunks()
        globals_.append(glob.flatten().to_numpy().reshape(len(table), -1).astype(np.float16))
        images.append(image_rows(table, next_id))
        next_id += len(table)
        clock.lap("tables_s")  # geometry, global descriptors, image table
    files = shard_files(prefix)
    written = ["geometry.npy", "global.npy", "images.parquet"]
    np.save(files["geometry.npy"], np.concatenate(geometry) if geometry else np.zeros((0, 3), np.uint16))
    np.save(files["global.npy"], np.concatenate(globals_) if globals_ else np.zeros((0, 0), np.float16))
    schema = IMAGES_SCHEMA.remove(IMAGES_SCHEMA.get_field_index("geometry_offset"))
    pq.write_table(pa.concat_tables(images).cast(schema) if images else schema.empty_table(), files["images.parquet"])
    if knn:
        faiss.write_index(index, files["ivf.faiss"])
        written.append("ivf.faiss")
    if use_asmk:
        code_size = trained.sa_code_size()
        np.save(files["codes.npy"], np.concatenate(codes) if codes else np.zeros((0, code_size), np.uint8))
        found, owners, signatures = (
            (np.concatenate(parts) for parts in zip(*entries))
            if entries
            else (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, (dim + 7) // 8), np.uint8))
        )
        order = np.lexsort((owners, found))  # sorted, so the merge streams word ranges
        for suffix, array in zip(ASMK_SHARD_SUFFIXES, (found, owners, signatures)):
            np.save(files[suffix], array[order].astype(np.int32) if array.ndim == 1 else array[order])
        written += ["codes.npy", *ASMK_SHARD_SUFFIXES]
    clock.lap("write_s")
    descriptors = sum(len(g) for g in geometry)
    return {"images": next_id - first_id, "descriptors": int(descriptors), "files": sorted(written)}


class Clock:
    """Adds the seconds since the last lap to timings[name]."""

    def __init__(self, timings):
        self.timings, self.last = timings, time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def check_ranges(table, counts):
    """The geometry packs a feature's index in 16 bits of its id and x, y in uint16 pixels:
    refuse what does not fit, naming the image, rather than wrap or clip silently."""
    ids = table.column("image_id").to_pylist()
    too_many = np.nonzero(counts > MAX_FEATURES)[0]
    if len(too_many):
        raise ArtifactError(
            f"{ids[too_many[0]]} has {counts[too_many[0]]} features; an index holds at most {MAX_FEATURES} per "
            "image: extract with a lower max_features"
        )
    for column in ("x", "y"):
        values = table.column(column).combine_chunks().flatten().to_numpy()
        bad = np.nonzero((values < -0.5) | (values > MAX_COORDINATE + 0.49))[0]
        if len(bad):
            image = np.searchsorted(np.cumsum(counts), bad[0], side="right")
            raise ArtifactError(
                f"{ids[image]} has a keypoint at {column} = {values[bad[0]]:.1f}, beyond the index's pixel range "
                f"0..{MAX_COORDINATE}: such images cannot be indexed (shrink them first)"
            )


def merge_shards(prefixes, trained, out_dir, previous=None, newly_dead=(), method="knn", words=None, timings=None):
    """Shards (local prefixes, in id order) [+ a previous local artifact folder] -> artifact
    files in `out_dir`: images.parquet, geometry.npy, global.faiss, dead.npy (the previous
    artifact's dead rows and the int ids in `newly_dead`), and per `method` the k-NN lists
    (index.faiss + index.ivfdata) and ASMK's inverted file, word index and codes (`words`: a
    WordAssigner). Returns the counts {"images", "descriptors", "dead"}; `timings` (a dict)
    receives the seconds of each step."""
    clock = Clock({} if timings is None else timings)
    listed = merge_lists(prefixes, trained, out_dir, previous) if method in ("knn", "both") else None
    clock.lap("knn_lists_s")

    # image table, with where each image's geometry starts
    tables = [pq.read_table(os.path.join(previous, "images.parquet")).drop(["geometry_offset"])] if previous else []
    tables += [pq.read_table(shard_files(p)["images.parquet"]) for p in prefixes]
    images = pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table().drop(["geometry_offset"])
    ids = images.column("id").to_numpy()
    if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
        raise ArtifactError("image ids of the shards are not consecutive: shards missing or out of order")
    image_ids = images.column("image_id").to_pylist()
    dead = set(np.load(os.path.join(previous, dead_rows_file(os.listdir(previous)))).tolist()) if previous else set()
    dead.update(int(row) for row in newly_dead)
    live = [image_id for row, image_id in enumerate(image_ids) if row not in dead]
    if len(set(live)) != len(live):
        seen, dup = set(), []
        for image_id in live:
            if image_id in seen:
                dup.append(image_id)
            seen.add(image_id)
        raise ArtifactError(f"{len(dup)} image_ids occur twice, e.g. {dup[:3]}: an image can be indexed once")
    np.save(os.path.join(out_dir, DEAD_ROWS), np.array(sorted(dead), np.int64))
    counts = images.column("num_features").to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
    images = images.append_column("geometry_offset", pa.array(offsets, pa.int64())).cast(IMAGES_SCHEMA)
    pq.write_table(images, os.path.join(out_dir, "images.parquet"))
    descriptors = int(counts.sum())
    if listed is not None and listed != descriptors:
        raise ArtifactError(f"{listed} indexed descriptors but the image table counts {descriptors}")
    clock.lap("images_s")

    # geometry (and ASMK's per-descriptor codes), copied piece by piece into memory-mapped arrays
    def concatenate(name):  # the previous version's rows, then the shards', in image id order
        earlier = [os.path.join(previous, name)] if previous else []
        concatenate_arrays(earlier, [shard_files(p)[name] for p in prefixes], os.path.join(out_dir, name), descriptors)

    concatenate("geometry.npy")
    clock.lap("geometry_s")
    if method in ("asmk", "both"):
        if previous and not os.path.exists(os.path.join(previous, "codes.npy")):
            raise ArtifactError("the index has no ASMK codes to append to: build it with --method asmk or both")
        concatenate("codes.npy")
        clock.lap("codes_s")
        write_asmk(prefixes, previous, out_dir, len(image_ids), words)
        clock.lap("asmk_lists_s")

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
    clock.lap("global_s")
    return {"images": len(image_ids) - len(dead), "descriptors": descriptors, "dead": len(dead)}


def merge_lists(prefixes, trained, out_dir, previous=None):
    """k-NN voting's inverted lists: memory-mapped sources merged into one on-disk file.
    Returns the number of entries."""
    sources, keep_alive = [], []
    if previous is not None:
        if not os.path.exists(os.path.join(previous, "index.faiss")):
            raise ArtifactError("the index has no k-NN lists to append to: build it with --method knn or both")
        with console.c_output() as said:  # and that it re-points the lists at their file
            old = faiss.read_index(os.path.join(previous, "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
        log.debug("faiss: %s", said[0].strip())
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
    with console.c_output() as said:  # faiss reports each resize of the on-disk file
        ntotal = invlists.merge_from_multiple(vector.data(), vector.size(), False) if sources else 0
    log.debug("faiss: %s", said[0].strip())
    index.ntotal = ivf.ntotal = ntotal
    # the header stores the data file's name: a bare name keeps index.faiss identical across
    # builds (readers find the file next to it, IO_FLAG_ONDISK_SAME_DIR)
    invlists.filename = "index.ivfdata"
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    faiss.write_index(index, os.path.join(out_dir, "index.faiss"))
    return int(ntotal)


def concatenate_arrays(previous, pieces, path, rows):
    """The .npy files `previous` + `pieces`, row after row, into one memory-mapped array."""
    first = np.load((previous + pieces)[0], mmap_mode="r")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=first.dtype, shape=(rows,) + first.shape[1:])
    start = 0
    for piece in previous + pieces:
        part = np.load(piece, mmap_mode="r")
        out[start : start + len(part)] = part
        start += len(part)
    assert start == rows, (path, start, rows)
    out.flush()


def append_bits(carry, carry_bits, words, bits):
    """Bits [0, bits) of the uint64 array `words` appended to the `carry_bits` low bits of the
    uint64 `carry` (the bits above them 0): (the complete uint64 words, the new carry and its
    bit count)."""
    words = np.asarray(words[: (bits + 63) // 64], np.uint64)
    if carry_bits == 0:
        joined = np.concatenate([words, np.zeros(1, np.uint64)])
    else:
        up, down = np.uint64(carry_bits), np.uint64(64 - carry_bits)
        joined = np.zeros(len(words) + 1, np.uint64)
        joined[0] = carry
        joined[: len(words)] |= words << up
        joined[1:] |= words >> down
    complete, rest = divmod(carry_bits + bits, 64)
    return joined[:complete], joined[complete], rest


def raw_to_npy(raw_path, path, dtype, size):
    """The raw file of `size` values of `dtype` as a .npy file, copied in chunks."""
    if os.path.getsize(raw_path) != size * dtype.itemsize:
        raise RuntimeError(f"{raw_path}: {os.path.getsize(raw_path)} bytes, {size * dtype.itemsize} expected")
    out = np.lib.format.open_memmap(path, "w+", dtype, (size,))
    with open(raw_path, "rb") as raw:
        for start in range(0, size, 1 << 22):
            chunk = np.fromfile(raw, dtype, count=min(1 << 22, size - start))
            out[start : start + len(chunk)] = chunk
    out.flush()


def write_asmk(prefixes, previous, out_dir, num_images, words, block_words=4096):
    """ASMK's inverted file of the previous version's entries and the shards', its IDF and
    image norms over all images (dead rows are masked at query time), and the word index.
    Streams: every source is sorted by (word, image) and memory-mapped, and the output is
    written `block_words` words at a time, so memory holds one block of entries, not the
    corpus (tests/test_asmk.py checks it against the file built in memory)."""
    if num_images >= 2**31:
        raise ArtifactError(f"{num_images} images: ASMK's inverted file holds int32 image ids, at most 2**31 - 1")
    num_words = len(words.centroids)
    sources = []  # per source, in image id order: a previous version's lists, or a shard's sorted entries
    if previous:
        sources.append(asmk.open_lists(previous))
    for prefix in prefixes:
        files = shard_files(prefix)
        keys = ("words", "images", "signatures")  # of ASMK_SHARD_SUFFIXES
        sources.append({key: np.load(files[s], mmap_mode="r") for key, s in zip(keys, ASMK_SHARD_SUFFIXES)})

    def block(source, first, last):  # (words, images, signatures) of one source's words [first, last)
        if "offsets" in source:  # a previous version: CSR, its words implied by the offsets
            offsets = source["offsets"]
            found = np.repeat(np.arange(first, last, dtype=np.int32), np.diff(offsets[first : last + 1]))
            owners = asmk.entry_images(source, first, last)
            return found, owners, np.asarray(source["signatures"][offsets[first] : offsets[last]])
        lo, hi = np.searchsorted(source["words"], [first, last])
        return tuple(np.asarray(source[key][lo:hi]) for key in ("words", "images", "signatures"))

    counts = np.zeros(num_words, np.int64)
    for source in sources:
        previous_lists = "offsets" in source
        counts += np.diff(source["offsets"]) if previous_lists else np.bincount(source["words"], minlength=num_words)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    idf = np.log(max(num_images, 1) / np.maximum(counts, 1)).astype(np.float32)
    total, code_bytes = int(offsets[-1]), sources[0]["signatures"].shape[1]
    signatures_out = np.lib.format.open_memmap(
        os.path.join(out_dir, "asmk_signatures.npy"), "w+", np.uint8, (total, code_bytes)
    )
    # the coded ids' size is known only once coded: blocks go to a raw file, bit after bit (a
    # block's last bits wait in `carry` for the next), copied into the .npy at the end
    ids_raw = os.path.join(out_dir, "asmk_ids.raw")
    low_bits, id_sizes = np.zeros(num_words, np.uint8), np.zeros(num_words, np.int64)
    squared_norms = np.zeros(num_images, np.float64)
    carry, carry_bits = np.uint64(0), 0
    try:
        with open(ids_raw, "wb") as raw:
            for first in range(0, num_words, block_words):
                last = min(first + block_words, num_words)
                found, owners, signatures = (np.concatenate(p) for p in zip(*(block(s, first, last) for s in sources)))
                order = np.argsort(found, kind="stable")  # stable: images stay in source (= id) order
                block_offsets = offsets[first : last + 1] - offsets[first]
                ids, low_bits[first:last], block_id_offsets = asmk.encode_ids(owners[order], block_offsets)
                complete, carry, carry_bits = append_bits(carry, carry_bits, ids, int(block_id_offsets[-1]))
                raw.write(complete.astype("<u8").tobytes())
                id_sizes[first:last] = np.diff(block_id_offsets)
                signatures_out[offsets[first] : offsets[last]] = signatures[order]
                squared_norms += np.bincount(owners, weights=idf[found].astype(np.float64) ** 2, minlength=num_images)
            raw.write(np.array([carry, 0], "<u8")[: 2 if carry_bits else 1].tobytes())  # + a uint64 of padding
        id_offsets = np.concatenate([[0], np.cumsum(id_sizes)]).astype(np.int64)
        raw_to_npy(ids_raw, os.path.join(out_dir, "asmk_ids.npy"), np.dtype("<u8"), int(id_offsets[-1] + 63) // 64 + 1)
    finally:
        if os.path.exists(ids_raw):
            os.remove(ids_raw)
    signatures_out.flush()
    del signatures_out
    np.save(os.path.join(out_dir, "asmk_low_bits.npy"), low_bits)
    np.save(os.path.join(out_dir, "asmk_id_offsets.npy"), id_offsets)
    np.save(os.path.join(out_dir, "asmk_offsets.npy"), offsets)
    np.save(os.path.join(out_dir, "asmk_idf.npy"), idf)
    np.save(os.path.join(out_dir, "asmk_norms.npy"), np.sqrt(squared_norms).astype(np.float32))
    faiss.write_index(words.index, os.path.join(out_dir, "asmk_words.faiss"))
