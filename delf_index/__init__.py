"""delf-index: DELF local features at scale, a compact index, and verified retrieval.

The Python API of the runtime and the query module (no Beam, no torch)::

    from delf_index import Extractor, Index

    features = Extractor().extract_image("photo.jpg")      # DELF features of one image
    index = Index.load("gs://bucket/index")                  # an index built by `delf-index build`
    for result in index.search("photo.jpg", top_k=5):
        print(result.image_id, result.inliers, result.score)

The batch jobs are plain functions of their modules, each with a `default_conf` and named
`presets` (docs/architecture.md)::

    from delf_index.pipelines import build, evaluate, extract, fit
    extract.run("gs://bucket/photos/*.jpg", "gs://bucket/features")
"""

import logging

from delf_index.errors import UserError
from delf_index.indexing.artifact import Artifact
from delf_index.indexing.manifests import ArtifactError
from delf_index.indexing.retrieval import Index, QueryError, Result
from delf_index.runtime.extractor import Extractor, load_model
from delf_index.runtime.features import Features
from delf_index.runtime.images import ImageError
from delf_index.runtime.storage import StorageError
from delf_index.version import __version__

__all__ = [
    "__version__",
    "Artifact",
    "ArtifactError",
    "Extractor",
    "Features",
    "ImageError",
    "Index",
    "QueryError",
    "Result",
    "StorageError",
    "UserError",
    "load_model",
]

# The jobs log through the `delf_index` logger and its children (a summary line at INFO, marked
# runtime.console.SUMMARY) and print nothing: without a handler of the user's, Python's
# last-resort handler would print their warnings; the command line sets its own (pipelines/cli.py)
logging.getLogger(__name__).addHandler(logging.NullHandler())
