"""The codebooks folder that `delf-index fit` writes (PCA, the trained quantizers, ASMK's
words): writing it, and loading it, or the codebooks an index version was built with. What
the folder holds is in schemas/artifact.py.
"""

import json
import os
import tempfile

import faiss
import numpy as np

from delf_index.indexing import pca as pca_lib
from delf_index.indexing import versions
from delf_index.indexing.manifests import fetch_manifested, file_entries, read_folder_manifest, verify_files
from delf_index.runtime import storage
from delf_index.schemas.artifact import ARTIFACT_FORMAT, ARTIFACT_READS, CODEBOOKS_FORMAT, CODEBOOKS_VERSION
from delf_index.version import __version__

WORDS_FILE = "asmk_words.npy"


def write_codebooks(uri, pca, trained, info, words=None):
    """Save PCA + trained index (+ ASMK word centroids) + codebooks.json (info: fingerprint,
    parameters, sample stats)."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "pca.npz"), "wb") as f:
            f.write(pca_lib.pca_to_bytes(pca))
        faiss.write_index(trained, os.path.join(tmp, "trained.faiss"))
        names = ["pca.npz", "trained.faiss"]
        if words is not None:
            np.save(os.path.join(tmp, WORDS_FILE), np.ascontiguousarray(words, np.float32))
            names.append(WORDS_FILE)
        manifest = {
            "format": CODEBOOKS_FORMAT,
            "format_version": CODEBOOKS_VERSION,
            **info,
            "delf_index_version": __version__,
            "files": file_entries(tmp, names),
        }
        with open(os.path.join(tmp, "codebooks.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        storage.upload_folder(tmp, uri, names + ["codebooks.json"])
    return manifest


def codebooks_folder(uri):
    """(local folder, manifest name, manifest) of a codebooks folder, or of the current version
    of an index (whose pca.npz and trained.faiss are the codebooks it was built with)."""
    if versions.is_index(uri):
        uri, name, expected = versions.current_version(uri), "manifest.json", (ARTIFACT_FORMAT, ARTIFACT_READS)
    else:
        name, expected = "codebooks.json", (CODEBOOKS_FORMAT, CODEBOOKS_VERSION)
    folder = fetch_manifested(uri, name, expected[0])
    return folder, name, read_folder_manifest(folder, name, *expected)


def load_codebooks(uri, verify=True):
    """(pca, trained index, manifest) of a codebooks folder, or of an index's codebooks."""
    folder, _, manifest = codebooks_folder(uri)
    if verify:
        files = {n: e for n, e in manifest["files"].items() if n in ("pca.npz", "trained.faiss")}
        verify_files(folder, {"files": files})
    with open(os.path.join(folder, "pca.npz"), "rb") as f:
        pca = pca_lib.pca_from_bytes(f.read())
    return pca, faiss.read_index(os.path.join(folder, "trained.faiss")), manifest


def load_words(uri):
    """The ASMK word centroids [words, d] of a codebooks folder or an index, or None."""
    folder, _, manifest = codebooks_folder(uri)
    if WORDS_FILE not in manifest["files"]:
        return None
    verify_files(folder, {"files": {WORDS_FILE: manifest["files"][WORDS_FILE]}})
    return np.load(os.path.join(folder, WORDS_FILE), allow_pickle=False)
