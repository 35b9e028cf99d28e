import os

import numpy as np
import pytest

from delf_index.pipelines import demo_corpus, evaluate
from delf_index.runtime.tables import list_tables, open_table, superseded

ONE_WORKER = {"workers": 1}  # beam_options of the jobs in tests: one local worker process

LANDMARKS = os.environ.get(
    "LANDMARKS_DEV", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "landmarks-dev")
)


@pytest.fixture(scope="session")
def landmarks_dir():
    """../shared/data/landmarks-dev, or skip when it is not there (outside users, CI forks)."""
    if not os.path.exists(os.path.join(LANDMARKS, "groups.csv")):
        pytest.skip("landmarks-dev data set not available")
    return LANDMARKS


@pytest.fixture(scope="session")
def photos():
    """Real photos from scikit-image, available everywhere the dev extras are installed."""
    data = pytest.importorskip("skimage.data")
    return {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}


@pytest.fixture(scope="session")
def default_extractor():
    from delf_index.runtime.extractor import Extractor

    return Extractor()


@pytest.fixture(scope="session")
def exported_default(tmp_path_factory):
    """The default model freshly exported from torch: (path, torch model)."""
    pytest.importorskip("torch")
    from delf_index.model.export import build_model, export_onnx, metadata

    model, provenance = build_model()
    path = str(tmp_path_factory.mktemp("export") / "default.onnx")
    export_onnx(model, path, metadata(model, provenance))
    return path, model


def rgb(image):
    image = np.asarray(image)
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]


@pytest.fixture(scope="session")
def gcs_bucket():
    """A real GCS HTTP server (gcp-storage-emulator) on loopback; gcsfs and the pipelines
    reach it through STORAGE_EMULATOR_HOST. Yields the bucket name."""
    pytest.importorskip("gcsfs")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket="delf-test")
    server.start()
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # else gcsfs stalls ~60 s per bucket
    import fsspec

    fsspec.filesystem("gs").invalidate_cache()
    yield "delf-test"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def live_rows(out, table_names=("features", "errors")):
    """{image_id: row} of the live rows of an extract output (features and errors)."""
    replaced = superseded(out)
    rows = {}
    for name in table_names:
        for uri in list_tables(out, name, required=False):
            for row in open_table(uri).read().to_pylist():
                if row["image_id"] not in replaced.get(row["run"], ()):
                    assert row["image_id"] not in rows, f"{row['image_id']} is live twice"
                    rows[row["image_id"]] = {**row, "table": name}
    return rows


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small demo corpus: three places under synthetic changes, three distractors."""
    pytest.importorskip("skimage")
    root = tmp_path_factory.mktemp("corpus")
    demo_corpus.build(str(root), places=["astronaut", "coffee", "rocket"], distractors=["page", "moon", "brick"])
    return root


@pytest.fixture(scope="session")
def evaluated(corpus, tmp_path_factory):
    """`delf-index evaluate` on the corpus: (workdir with features, codebooks, index; summary)."""
    work = tmp_path_factory.mktemp("work")
    summary = evaluate.run(
        str(corpus / "images"), str(work), groups=str(corpus / "groups.csv"), beam_options=ONE_WORKER
    )
    return work, summary
