import contextlib
import importlib.util
import io
import os
import shutil
import socket

import numpy as np
import pytest

from delf_index.pipelines import build, demo_corpus, evaluate, extract, fit
from delf_index.runtime import tables

ONE_WORKER = {"workers": 1}  # beam_options of the jobs in tests: one local worker process

LANDMARKS = os.environ.get(
    "LANDMARKS_DEV", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "landmarks-dev")
)
LANDMARKS_TRAIN = os.environ.get(
    "LANDMARKS_TRAIN", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "landmarks-train")
)


def chromium():
    """Debian's Chromium, which tests/test_pages.py drives (no browser download), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def playwright():
    """True where Playwright, which drives Chromium, is installed (the dev extras)."""
    return importlib.util.find_spec("playwright") is not None


def missing_here():
    """{fixture: (why its tests skip on this machine, the one command that enables them)} of
    what the dev extras do not install: said before the run, not in one line of the summary."""
    missing, pages = {}, "the HTML reports are not opened in a browser"
    if chromium() is None:
        missing["browser"] = (f"no Chromium: {pages}", "sudo apt-get install chromium")
    elif not playwright():
        missing["browser"] = (f"no Playwright: {pages}", "pip install -e '.[dev]'")
    if not os.path.exists(os.path.join(LANDMARKS, "groups.csv")):
        missing["landmarks_dir"] = (f"no landmarks-dev data set at {LANDMARKS}",
                                    "LANDMARKS_DEV=/path/to/landmarks-dev ./run_local.sh test")  # fmt: skip
    return missing


def pytest_collection_finish(session):
    """Before the first test runs: which of the collected tests will skip here, why, and how to
    run them (even under -q)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = []
    for fixture, (why, fix) in missing_here().items():
        skipped = [item.nodeid.split("::")[0] for item in session.items if fixture in item.fixturenames]
        if skipped:
            files = ", ".join(dict.fromkeys(skipped))
            lines.append(f"{len(skipped)} tests of {files} will skip: {why}; to run them: {fix}")
    if lines and reporter is not None:
        reporter.write_sep("!", "tests skipped on this machine", yellow=True, bold=True)
        for line in lines:
            reporter.write_line(line, yellow=True, bold=True)
        reporter.write_sep("!", yellow=True, bold=True)


@pytest.fixture(scope="session")
def landmarks_dir():
    """../shared/data/landmarks-dev, or skip when it is not there (outside users, CI forks)."""
    if not os.path.exists(os.path.join(LANDMARKS, "groups.csv")):
        pytest.skip("landmarks-dev data set not available")
    return LANDMARKS


@pytest.fixture(scope="session")
def landmarks_train_dir():
    """../shared/data/landmarks-train (GLDv2 photos for training), or skip when it is not there."""
    if not os.path.exists(os.path.join(LANDMARKS_TRAIN, "train.csv")):
        pytest.skip("landmarks-train data set not available")
    return LANDMARKS_TRAIN


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


def jpeg(array, quality=90):
    """The JPEG bytes of an RGB array (any strides)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def pictures(photos):
    """Eight small distinct images (four photos and their mirrors)."""
    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        small = np.ascontiguousarray(rgb(photos[name])[::3, ::3])
        out[f"{name}.jpg"], out[f"{name}-mirror.jpg"] = jpeg(small), jpeg(small[:, ::-1])
    return out


def put(folder, pictures, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(pictures[name])


@pytest.fixture(scope="session")
def built(pictures, tmp_path_factory):
    """A features table of `pictures`, its codebooks and an index of it (images, features,
    codebooks, index under the folder returned), which tests copy before they change them."""
    root = tmp_path_factory.mktemp("built")
    images = str(root / "images")
    put(images, pictures, list(pictures))
    extract.run(images, str(root / "features"), beam_options=ONE_WORKER)
    fit.run(str(root / "features"), str(root / "codebooks"), {"nlist": 8, "sample": 20000}, beam_options=ONE_WORKER)
    build.run(str(root / "features"), str(root / "index"), codebooks=str(root / "codebooks"), beam_options=ONE_WORKER)
    return root


def free_port():
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def environment(values):
    """os.environ with `values` set, as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_bucket():
    """A real GCS HTTP server (gcp-storage-emulator) on loopback; gcsfs and the pipelines
    reach it through STORAGE_EMULATOR_HOST. Yields the bucket name."""
    pytest.importorskip("gcsfs")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    port = free_port()
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket="delf-test")
    server.start()
    # without the HNS switch off gcsfs stalls ~60 s per bucket
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    with environment(env):
        import fsspec

        fsspec.filesystem("gs").invalidate_cache()
        yield "delf-test"
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket():
    """A moto S3 server on loopback; s3fs reaches it through AWS_ENDPOINT_URL_S3."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
    }
    with environment(env):
        boto3.client("s3").create_bucket(Bucket="delf-test")
        yield "delf-test"
        server.stop()


def live_rows(out, version=None):
    """{image_id: record} of what a features table holds per image: its live features
    (status extracted) or, for an image without them whose newest attempt failed, that
    failure. Checks that no image is live twice."""
    records, resolved = _resolved(out, version)
    live = tables.live_records(records, resolved).to_pylist()
    ids = [r["image_id"] for r in live]
    assert len(ids) == len(set(ids)), "an image is live twice"
    rows = {r["image_id"]: r for r in live}
    for image_id, record in failing_rows(out, version, (records, resolved)).items():
        rows.setdefault(image_id, record)
    return rows


def failing_rows(out, version=None, resolved=None):
    """{image_id: record} of the images whose newest attempt failed (with or without features)."""
    records, resolved = resolved or _resolved(out, version)
    failing = {r["image_id"]: r["failed"] for r in resolved.to_pylist() if r["failed"] is not None}
    return {
        r["image_id"]: r
        for r in records.to_pylist()
        if r["status"] == "failed" and failing.get(r["image_id"]) == r["run"]
    }


def _resolved(out, version):
    records = tables.snapshot(out, version).read([*tables.schema.STATE_COLUMNS, "stage", "error", "num_features",
                                                  "label", "width", "height"])  # fmt: skip
    return records, tables.resolve(records)


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
