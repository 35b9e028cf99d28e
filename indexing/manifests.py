"""A folder described by its manifest (codebooks.json, an index version's manifest.json): the
size and sha256 of each of its files, checked before the folder is used. What the folders
hold is in schemas/artifact.py.
"""

import hashlib
import json
import os
import posixpath

from delf_index.errors import UserError
from delf_index.runtime import cache, storage


class ArtifactError(UserError):
    """An artifact or codebooks folder that cannot be used as it is; the message says why and what to do."""


def file_entries(folder, names):
    return {
        n: {"sha256": storage.sha256_of(os.path.join(folder, n)), "bytes": os.path.getsize(os.path.join(folder, n))}
        for n in names
    }


def read_folder_manifest(folder, name, expected_format, expected_version):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise ArtifactError(f"{folder} has no {name}: not a finished {expected_format} folder (did the job complete?)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != expected_format:
        raise ArtifactError(f"{path} is a {manifest.get('format')!r}, expected {expected_format!r}")
    readable = expected_version if isinstance(expected_version, tuple) else (expected_version,)
    if manifest.get("format_version") not in readable:
        raise ArtifactError(
            f"{path} has format version {manifest.get('format_version')}; this delf-index reads version "
            f"{' or '.join(map(str, readable))}. Rebuild it with this version (delf-index fit / build)"
        )
    return manifest


def verify_files(folder, manifest):
    """Refuse missing, truncated or altered files, naming them. Each file is hashed once: the
    cache's files are verified when fetched, a local folder's digests are remembered
    (runtime/cache.py, `verified_sha256`)."""
    bad, present = [], []
    for name, entry in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            bad.append(f"{name} is missing")
        elif os.path.getsize(path) != entry["bytes"]:
            bad.append(f"{name} has {os.path.getsize(path)} bytes, expected {entry['bytes']} (truncated?)")
        else:
            present.append(name)
    digests = cache.verified_sha256(folder, present)
    bad += [
        f"{name} does not match its sha256 (altered or corrupted)"
        for name in present
        if digests[name] != manifest["files"][name]["sha256"]
    ]
    if bad:
        raise ArtifactError(f"{folder}: " + "; ".join(bad) + ". Rebuild it, or copy it again from its source")


def fetch_manifested(uri, name, what):
    """The local folder of `uri` (cache.fetch_folder), with a clear error when it holds no
    manifest `name`."""
    try:
        return cache.fetch_folder(uri, name)
    except FileNotFoundError as e:
        raise ArtifactError(f"{uri} has no {name}: not a finished {what} folder (did the job complete?)") from e


def read_file(version, manifest, name):
    """One file of a version, checked against its manifest (no other file fetched)."""
    data = storage.read_bytes(posixpath.join(version, name))
    entry = manifest["files"][name]
    if (len(data), hashlib.sha256(data).hexdigest()) != (entry["bytes"], entry["sha256"]):
        raise ArtifactError(f"{version}/{name} does not match its manifest (altered or corrupted): rebuild it")
    return data


def check_fingerprint(expected, actual, what):
    if expected != actual:
        raise ArtifactError(
            f"{what} come from model {actual[:12]}, but the index/codebooks were made for model {expected[:12]}: "
            "extract them with the same model, or fit new codebooks for this model"
        )
