"""What the codebooks folder (`delf-index fit`) and the index artifact (`delf-index build`)
hold, version 1 (docs/index.md shows how they are used).

Codebooks folder::

    codebooks.json   format, model fingerprint, PCA / quantizer parameters, sample, sha256 of files
    pca.npz          mean, components, eigenvalues (indexing/pca.py)
    trained.faiss    the trained, empty faiss index (coarse quantizer + PQ)

Index artifact folder::

    manifest.json    format, model fingerprint, codebook parameters, counts, sha256 of every file
    pca.npz, trained.faiss   the codebooks it was built with (append reuses them)
    index.faiss      IVF-PQ index header; its inverted lists live in index.ivfdata (same folder)
    index.ivfdata    on-disk inverted lists: PQ code + 8-byte id per descriptor
    images.parquet   IMAGES_SCHEMA: int id <-> image_id, uri, label, size, features, geometry_offset
    geometry.npy     uint16 [descriptors, 3]: x, y (rounded pixels), scale (float16 bits)
    global.faiss     global descriptors, float16, inner product, row = int image id

A descriptor's faiss id is ``image_int_id << FEATURE_BITS | feature_index``; its geometry
row is ``geometry_offset[image] + feature_index``.
"""

import pyarrow as pa

CODEBOOKS_FORMAT, ARTIFACT_FORMAT, FORMAT_VERSION = "delf-index-codebooks", "delf-index-artifact", 1
FEATURE_BITS = 16  # features per image < 65536

IMAGES_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_features", pa.int32()),
        ("geometry_offset", pa.int64()),
    ]
)
