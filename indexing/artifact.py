"""The index artifact (`delf-index build`): a loaded version (`Artifact`), the int ids of its
descriptors, their packed geometry, and what an append or a query reads of a version alone.
What a version holds is in schemas/artifact.py; the versions of an index and its log are
indexing/versions.py. Remote versions are loaded from a bounded, content-addressed local
cache (runtime/cache.py).
"""

import io
import json
import logging
import os
import posixpath

import faiss
import numpy as np
import pyarrow.parquet as pq

from delf_index.indexing import asmk, expansion, versions
from delf_index.indexing import pca as pca_lib
from delf_index.indexing.codebooks_io import WORDS_FILE
from delf_index.indexing.manifests import (
    ArtifactError,
    check_fingerprint,
    fetch_manifested,
    read_file,
    read_folder_manifest,
    verify_files,
)
from delf_index.runtime import cache, console, storage
from delf_index.schemas.artifact import ARTIFACT_FORMAT, ARTIFACT_READS, FEATURE_BITS, dead_rows_file

log = logging.getLogger(__name__)


def feature_ids(image_id, count):
    return (np.int64(image_id) << FEATURE_BITS) | np.arange(count, dtype=np.int64)


def split_ids(ids):
    ids = np.asarray(ids, np.int64)
    return ids >> FEATURE_BITS, ids & ((1 << FEATURE_BITS) - 1)


def pack_geometry(x, y, scale):
    """[N, 3] uint16: x and y rounded to pixels, scale as float16 bits (range checked by the build)."""
    out = np.empty((len(x), 3), np.uint16)
    out[:, 0] = np.rint(x)
    out[:, 1] = np.rint(y)
    out[:, 2] = np.asarray(scale, np.float16).view(np.uint16)
    return out


def unpack_geometry(rows):
    """[N, 3] uint16 -> (xy [N, 2] float32, scale [N] float32)."""
    rows = np.asarray(rows)
    return rows[:, :2].astype(np.float32), rows[:, 2].copy().view(np.float16).astype(np.float32)


def check_source(index, manifest, snap):
    """Refuse, naming both, a features table other than the one the index was built from, or
    an older version of it (a stale copy, a table restored from a backup), before any work.
    `snap` is a snapshot of the table (runtime/tables.py). Indexes built before tables had an
    id recorded are checked by the table's URI."""
    source = manifest.get("features") or {}
    if not source:
        return
    built = f"{index} was built from {source['uri']} version {source['table_version']}"
    if source.get("table_id") and source["table_id"] != snap.table_id:
        raise ArtifactError(
            f"{snap.uri} is another features table (id {snap.table_id}) than the one {built} (id "
            f"{source['table_id']}): check --features, or build a new index from it with --codebooks"
        )
    if not source.get("table_id") and storage.filesystem(source["uri"])[1] != storage.filesystem(snap.uri)[1]:
        raise ArtifactError(f"{snap.uri} is not the features table {built}: check --features")
    if snap.version < source["table_version"]:
        raise ArtifactError(
            f"{snap.uri} is at version {snap.version}, older than the one {built} (a stale copy, or a table restored "
            "from a backup?): point --features at the table the index follows"
        )


def indexed_images(version, manifest):
    """(image_ids, runs, dead rows) of a version, reading only its image table and dead rows:
    what an append plans with."""
    images = pq.read_table(io.BytesIO(read_file(version, manifest, "images.parquet")), columns=["image_id", "run"])
    dead = np.load(io.BytesIO(read_file(version, manifest, dead_rows_file(manifest["files"]))), allow_pickle=False)
    return images.column("image_id").to_pylist(), images.column("run").to_pylist(), dead


def read_images(uri):
    """(image_ids, uris, labels) of the images a query can find in the current version of an
    index, reading only its manifest, image table and dead rows."""
    version = versions.current_version(uri)
    manifest = json.loads(storage.read_bytes(posixpath.join(version, "manifest.json")))
    images = pq.read_table(io.BytesIO(read_file(version, manifest, "images.parquet")))
    dead = np.load(io.BytesIO(read_file(version, manifest, dead_rows_file(manifest["files"]))), allow_pickle=False)
    live = np.setdiff1d(np.arange(images.num_rows), dead)
    columns = [images.column(c).to_pylist() for c in ("image_id", "uri", "label")]
    return tuple([column[row] for row in live] for column in columns)


# -- the index artifact ---------------------------------------------------------------------
class Artifact:
    """A loaded version of an index: faiss indexes memory-mapped, image table, geometry and
    its dead rows: images it holds but no longer serves (changed or gone since they were indexed)."""

    def __init__(self, folder, manifest, uri=None):
        self.folder, self.manifest, self.uri = folder, manifest, uri or folder
        self._in_use = cache.mark_in_use(folder)  # a cache folder in use is never evicted
        with open(os.path.join(folder, "pca.npz"), "rb") as f:
            self.pca = pca_lib.pca_from_bytes(f.read())
        files = manifest["files"]
        # k-NN voting's lists. IO_FLAG_ONDISK_SAME_DIR: index.ivfdata is found next to
        # index.faiss wherever the folder was copied; MMAP keeps the inverted lists out of RAM
        self.index = None
        if "index.faiss" in files:
            with console.c_output() as said:  # faiss announces the re-pointing on C's stdout
                self.index = faiss.read_index(
                    os.path.join(folder, "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
                )
            log.debug("faiss: %s", said[0].strip())
        # ASMK's inverted file (memory-mapped), word index and per-descriptor codes
        self.asmk, self.asmk_words, self.codes = None, None, None
        if "asmk_offsets.npy" in files:
            self.asmk = asmk.open_lists(folder)
            self.asmk_words = faiss.read_index(os.path.join(folder, "asmk_words.faiss"))
            # exact centroids for the residuals (the word index may hold them in float16)
            self.asmk_centroids = np.load(os.path.join(folder, WORDS_FILE), allow_pickle=False)
            self.codes = np.load(os.path.join(folder, "codes.npy"), mmap_mode="r")
            self.trained = faiss.read_index(os.path.join(folder, "trained.faiss"))
        self.global_index = faiss.read_index(os.path.join(folder, "global.faiss"))
        images = pq.read_table(os.path.join(folder, "images.parquet"))
        self.image_ids = images.column("image_id").to_pylist()
        self.uris = images.column("uri").to_pylist()
        self.labels = images.column("label").to_pylist()
        self.runs = images.column("run").to_pylist()
        self.sizes = np.stack([images.column("width").to_numpy(), images.column("height").to_numpy()], axis=1)
        self.num_features = images.column("num_features").to_numpy()
        self.geometry_offset = images.column("geometry_offset").to_numpy()
        self.geometry = np.load(os.path.join(folder, "geometry.npy"), mmap_mode="r")
        self.dead = np.load(os.path.join(folder, dead_rows_file(files)), allow_pickle=False)
        self.live = np.ones(len(self.image_ids), bool)
        self.live[self.dead] = False
        self.row_of = {image_id: row for row, image_id in enumerate(self.image_ids) if self.live[row]}
        # written by `delf-index match --augment`: the verified neighbour graph and the
        # neighbour-augmented global descriptors (indexing/expansion.py); an append drops them
        self.graph = expansion.read_graph(folder)
        dba = os.path.join(folder, expansion.DBA_FILE)
        self.dba_index = faiss.read_index(dba) if os.path.exists(dba) else None
        # the descriptors of dead rows are skipped inside faiss's search, so that the
        # neighbours and votes are those of an index built without them
        self.selector = None
        if len(self.dead):
            ids = np.concatenate([feature_ids(row, self.num_features[row]) for row in self.dead])
            dead_ids = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            self.selector = faiss.IDSelectorNot(dead_ids)
            self._keep_alive = dead_ids  # IDSelectorNot holds a bare pointer to it

    @classmethod
    def load(cls, uri, verify=True, model_fingerprint=None):
        """Load the current version of an index (or a version folder); checks format, checksums
        and, when given, that it was built from `model_fingerprint`'s features. A version that
        vanished while it was being fetched (pruned after a newer one was published) is
        followed by reading the log once more, also when it vanished while it was being opened
        (a local version is read in place)."""
        for attempt in range(2):
            version = versions.current_version(uri)
            try:
                folder = fetch_manifested(version, "manifest.json", ARTIFACT_FORMAT)
                manifest = read_folder_manifest(folder, "manifest.json", ARTIFACT_FORMAT, ARTIFACT_READS)
                if verify:
                    verify_files(folder, manifest)
                if model_fingerprint is not None:
                    check_fingerprint(manifest["model_fingerprint"], model_fingerprint, "query features")
                return cls.opened(folder, manifest, version)
            except (ArtifactError, FileNotFoundError) as e:
                if attempt or version == uri.rstrip("/") or versions.current_version(uri) == version:
                    fs, path = storage.uncached_filesystem(uri.rstrip("/"))
                    if not fs.exists(path):  # a mistyped path, not an unfinished build
                        raise ArtifactError(f"no index at {uri}: check the path (--index)") from e
                    raise

    @classmethod
    def opened(cls, folder, manifest, version):
        try:
            return cls(folder, manifest, version)
        except RuntimeError as e:  # faiss refuses a damaged file it was asked to read unverified, or a pruned one
            if not os.path.exists(os.path.join(folder, "manifest.json")):
                raise FileNotFoundError(f"{folder} was removed while it was opened") from e
            raise ArtifactError(f"{folder}: cannot read the index ({e}); rebuild it") from e

    @property
    def num_rows(self):
        """Images in the files, dead rows included (int ids are 0 .. num_rows - 1)."""
        return len(self.image_ids)

    def __len__(self):
        """Images that queries can find."""
        return len(self.row_of)

    @property
    def fingerprint(self):
        return self.manifest["model_fingerprint"]

    def reduced_descriptors(self, images):
        """{row: PCA-reduced descriptors [N, d]} of images (rows), decoded from their compact
        codes (an index with ASMK; what its verification matches against). One faiss call
        for all: each call wakes faiss's OpenMP threads, which costs ~10 ms after numpy's BLAS
        has run (measured; decoding one image's codes takes 25 us)."""
        counts = [int(self.num_features[row]) for row in images]
        codes = [
            self.codes[self.geometry_offset[row] : self.geometry_offset[row] + n] for row, n in zip(images, counts)
        ]
        dim = self.pca["components"].shape[0]
        decoded = self.trained.sa_decode(np.concatenate(codes)) if sum(counts) else np.zeros((0, dim), np.float32)
        return dict(zip(images, np.split(decoded, np.cumsum(counts)[:-1])))

    def geometry_of(self, image, features):
        """(xy [N, 2], scale [N]) of features (indices) of one image (row)."""
        rows = self.geometry[self.geometry_offset[image] + np.asarray(features, np.int64)]
        return unpack_geometry(rows)
