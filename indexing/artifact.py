"""The codebooks (`delf-index fit`) and the index artifact (`delf-index build`) on disk:
writing, checking and loading them. What the folders hold is in schemas/artifact.py.
Folders live on any fsspec filesystem; they are loaded from a local copy
(runtime/storage.py, `fetch_folder`).
"""

import hashlib
import json
import os
import tempfile

import faiss
import numpy as np
import pyarrow.parquet as pq

from delf_index.errors import UserError
from delf_index.indexing import pca as pca_lib
from delf_index.runtime import storage
from delf_index.schemas.artifact import (
    ARTIFACT_FORMAT,
    CODEBOOKS_FORMAT,
    FEATURE_BITS,
    FORMAT_VERSION,
)


class ArtifactError(UserError):
    """An artifact or codebooks folder that cannot be used as it is; the message says why and what to do."""


def feature_ids(image_id, count):
    return (np.int64(image_id) << FEATURE_BITS) | np.arange(count, dtype=np.int64)


def split_ids(ids):
    ids = np.asarray(ids, np.int64)
    return ids >> FEATURE_BITS, ids & ((1 << FEATURE_BITS) - 1)


def pack_geometry(x, y, scale):
    """[N, 3] uint16: x and y rounded to pixels, scale as float16 bits."""
    out = np.empty((len(x), 3), np.uint16)
    out[:, 0] = np.clip(np.rint(x), 0, 65535)
    out[:, 1] = np.clip(np.rint(y), 0, 65535)
    out[:, 2] = np.asarray(scale, np.float16).view(np.uint16)
    return out


def unpack_geometry(rows):
    """[N, 3] uint16 -> (xy [N, 2] float32, scale [N] float32)."""
    rows = np.asarray(rows)
    return rows[:, :2].astype(np.float32), rows[:, 2].copy().view(np.float16).astype(np.float32)


def sha256_of(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder, names):
    return {
        n: {"sha256": sha256_of(os.path.join(folder, n)), "bytes": os.path.getsize(os.path.join(folder, n))}
        for n in names
    }


# -- codebooks --------------------------------------------------------------------------------
def write_codebooks(uri, pca, trained, info):
    """Save PCA + trained index + codebooks.json (info: fingerprint, parameters, sample stats)."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "pca.npz"), "wb") as f:
            f.write(pca_lib.pca_to_bytes(pca))
        faiss.write_index(trained, os.path.join(tmp, "trained.faiss"))
        names = ["pca.npz", "trained.faiss"]
        manifest = {
            "format": CODEBOOKS_FORMAT,
            "format_version": FORMAT_VERSION,
            **info,
            "files": file_entries(tmp, names),
        }
        with open(os.path.join(tmp, "codebooks.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        storage.upload_folder(tmp, uri, names + ["codebooks.json"])
    return manifest


def read_manifest(folder, name, expected_format):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise ArtifactError(f"{folder} has no {name}: not a finished {expected_format} folder (did the job complete?)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != expected_format:
        raise ArtifactError(f"{path} is a {manifest.get('format')!r}, expected {expected_format!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {manifest.get('format_version')}; this delf-index reads version "
            f"{FORMAT_VERSION}. Rebuild it with this version (delf-index fit / build)"
        )
    return manifest


def verify_files(folder, manifest):
    """Refuse missing, truncated or altered files, naming them."""
    bad = []
    for name, entry in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            bad.append(f"{name} is missing")
        elif os.path.getsize(path) != entry["bytes"]:
            bad.append(f"{name} has {os.path.getsize(path)} bytes, expected {entry['bytes']} (truncated?)")
        elif sha256_of(path) != entry["sha256"]:
            bad.append(f"{name} does not match its sha256 (altered or corrupted)")
    if bad:
        raise ArtifactError(f"{folder}: " + "; ".join(bad) + ". Rebuild it, or copy it again from its source")


def load_codebooks(uri, verify=True):
    """(pca, trained index, manifest) of a codebooks folder, or of an artifact's copy of them."""
    folder = storage.fetch_folder(uri)
    if os.path.exists(os.path.join(folder, "codebooks.json")) or not os.path.exists(
        os.path.join(folder, "manifest.json")
    ):
        manifest = read_manifest(folder, "codebooks.json", CODEBOOKS_FORMAT)
    else:
        manifest = read_manifest(folder, "manifest.json", ARTIFACT_FORMAT)
    if verify:
        files = {n: e for n, e in manifest["files"].items() if n in ("pca.npz", "trained.faiss")}
        verify_files(folder, {"files": files})
    with open(os.path.join(folder, "pca.npz"), "rb") as f:
        pca = pca_lib.pca_from_bytes(f.read())
    return pca, faiss.read_index(os.path.join(folder, "trained.faiss")), manifest


def check_fingerprint(expected, actual, what):
    if expected != actual:
        raise ArtifactError(
            f"{what} come from model {actual[:12]}, but the index/codebooks were made for model {expected[:12]}: "
            "extract them with the same model, or fit new codebooks for this model"
        )


# -- the index artifact ---------------------------------------------------------------------
class Artifact:
    """A loaded index artifact: faiss indexes memory-mapped, image table and geometry."""

    def __init__(self, folder, manifest):
        self.folder, self.manifest = folder, manifest
        with open(os.path.join(folder, "pca.npz"), "rb") as f:
            self.pca = pca_lib.pca_from_bytes(f.read())
        # IO_FLAG_ONDISK_SAME_DIR: index.ivfdata is found next to index.faiss wherever the
        # folder was copied; MMAP keeps the inverted lists out of RAM
        self.index = faiss.read_index(
            os.path.join(folder, "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        )
        self.global_index = faiss.read_index(os.path.join(folder, "global.faiss"))
        images = pq.read_table(os.path.join(folder, "images.parquet"))
        self.image_ids = images.column("image_id").to_pylist()
        self.uris = images.column("uri").to_pylist()
        self.labels = images.column("label").to_pylist()
        self.sizes = np.stack([images.column("width").to_numpy(), images.column("height").to_numpy()], axis=1)
        self.num_features = images.column("num_features").to_numpy()
        self.geometry_offset = images.column("geometry_offset").to_numpy()
        self.geometry = np.load(os.path.join(folder, "geometry.npy"), mmap_mode="r")
        self.row_of = {image_id: i for i, image_id in enumerate(self.image_ids)}

    @classmethod
    def load(cls, uri, verify=True, model_fingerprint=None):
        """Load (a local copy of) an artifact; checks format, checksums and, when given, that
        it was built from `model_fingerprint`'s features."""
        folder = storage.fetch_folder(uri)
        manifest = read_manifest(folder, "manifest.json", ARTIFACT_FORMAT)
        if verify:
            verify_files(folder, manifest)
        if model_fingerprint is not None:
            check_fingerprint(manifest["model_fingerprint"], model_fingerprint, "query features")
        try:
            return cls(folder, manifest)
        except RuntimeError as e:  # faiss refuses a damaged file it was asked to read unverified
            raise ArtifactError(f"{folder}: cannot read the index ({e}); rebuild it") from e

    def __len__(self):
        return len(self.image_ids)

    @property
    def fingerprint(self):
        return self.manifest["model_fingerprint"]

    def geometry_of(self, image, features):
        """(xy [N, 2], scale [N]) of features (indices) of one image (row)."""
        rows = self.geometry[self.geometry_offset[image] + np.asarray(features, np.int64)]
        return unpack_geometry(rows)
