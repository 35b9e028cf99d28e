"""What the codebooks folder (`delf-index fit`) and the index artifact (`delf-index build`)
hold (docs/index.md shows how they are used).

Codebooks folder, version 1::

    codebooks.json   format, model fingerprint, PCA / quantizer parameters, sample, sha256 of files
    pca.npz          mean, components, eigenvalues (indexing/pca.py)
    trained.faiss    the trained, empty faiss index (coarse quantizer + PQ)
    asmk_words.npy   float32 [words, pca dim]: ASMK's visual words (fit --asmk-words; optional)

Index artifact, version 7: a folder of versions and a log whose newest entry names the
current one (indexing/versions.py)::

    _log/<sequence>.json     {"sequence", "version", "previous", "manifest_sha256", "time", ...}:
                             created once, only if absent, when a build or append has finished
                             (indexes written before the log have a CURRENT object instead)
    _pins/<id>.json          a long reader's claim on a version, that pruning honours
    versions/<version>/      one complete, immutable version:
        manifest.json        format, model fingerprint, extraction settings, codebook
                             parameters, counts, source tables, sha256 of every file
        pca.npz, trained.faiss   the codebooks it was built with (append reuses them)
        index.faiss          IVF-PQ index header; its inverted lists live in index.ivfdata
        index.ivfdata        on-disk inverted lists: PQ code + 8-byte id per descriptor
                             (both absent when built with --method asmk)
        images.parquet       IMAGES_SCHEMA: int id <-> image_id, uri, label, size, features,
                             geometry_offset, the extract run of its row
        geometry.npy         uint16 [descriptors, 3]: x, y (rounded pixels), scale (float16 bits)
        global.faiss         global descriptors, float16, inner product, row = int image id
        dead.npy             int64 ids of dead rows: images the version holds but no longer
                             serves (changed, deleted or taken down since they were indexed);
                             queries skip them, a rebuild leaves them out. Versions before 7
                             name it hidden.npy, still read (BEFORE_7)
      with --method asmk or both (indexing/asmk.py; docs/index.md, "ASMK"):
        asmk_offsets.npy     int64 [words + 1]: where each word's entries start (CSR)
        asmk_signatures.npy  uint8 [entries, bits / 8]: packed binarized residual of each entry
        asmk_ids.npy         uint64 [...]: each entry's image int id (ascending within a
                             word), Elias-Fano coded per word (indexing/asmk.py encode_ids):
                             the low bits of each id packed, then the high parts in unary;
                             the words' parts bit after bit, then a uint64 of padding
        asmk_low_bits.npy    uint8 [words]: the low bits per id of each word
        asmk_id_offsets.npy  int64 [words + 1]: where each word's ids start, in bits
        asmk_idf.npy         float32 [words]: log(images / images of the word)
        asmk_norms.npy       float32 [images]: each image's self-similarity, sqrt(sum of idf^2)
        asmk_words.faiss     the index that assigns query descriptors to words (exact; above
                             8192 words an HNSW graph, its words in float16; earlier
                             indexes' float32 graphs are read as well)
        asmk_words.npy       the word centroids (an append assigns with them)
        codes.npy            uint8 [descriptors, code bytes]: each descriptor's IVF-PQ code (coarse
                             cell + PQ), decoded for the verification of a shortlist
    _staging/<version>/      shards of a build in progress (never inside a version)

A version folder is itself a complete artifact and can be loaded or copied on its own.
A descriptor's faiss id is ``image_int_id << FEATURE_BITS | feature_index``; its geometry
row is ``geometry_offset[image] + feature_index``.
"""

import pyarrow as pa

CODEBOOKS_FORMAT, CODEBOOKS_VERSION = "delf-index-codebooks", 1
# version 3 added ASMK's files, 4 codes their image ids in a byte per entry, 5 holds the HNSW
# word index's words in float16 (a reader of 4 would search that graph at faiss's default
# breadth, so it must refuse it), 6 codes the ids in Elias-Fano (--method knn wrote 2 until
# then), 7 names the dead rows dead.npy (was hidden.npy: a reader of 6 would miss it, so every
# build writes 7); this one reads all
ARTIFACT_FORMAT, ARTIFACT_VERSION = "delf-index-artifact", 7
ARTIFACT_READS = (2, 6, 7)  # 3 to 5 were never released
DEAD_ROWS = "dead.npy"
# names of versions before 7, still read: the dead rows' file and the manifest's count of them
BEFORE_7 = {"dead_rows": "hidden.npy", "dead_count": "hidden"}
POINTER, VERSIONS, STAGING = "CURRENT", "versions", "_staging"
FEATURE_BITS = 16  # features per image < 65536
MAX_FEATURES = (1 << FEATURE_BITS) - 1
MAX_COORDINATE = 65535  # geometry stores x and y as uint16 pixels

IMAGES_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_features", pa.int32()),
        ("run", pa.string()),
        ("geometry_offset", pa.int64()),
    ]
)


def dead_rows_file(names):
    """The file of a version's dead rows among its file `names` (its manifest's files, or its
    folder's listing): dead.npy, or in versions before 7 hidden.npy."""
    return DEAD_ROWS if DEAD_ROWS in names else BEFORE_7["dead_rows"]


def dead_count(counts):
    """The number of dead rows in a version's manifest `counts` (named otherwise before 7)."""
    return counts.get("dead", counts.get(BEFORE_7["dead_count"], 0))
