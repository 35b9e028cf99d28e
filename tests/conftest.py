import os

import numpy as np
import pytest

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
    from pipelines.extractor import Extractor

    return Extractor()


@pytest.fixture(scope="session")
def exported_default(tmp_path_factory):
    """The default model freshly exported from torch: (path, torch model)."""
    pytest.importorskip("torch")
    from model.export import build_model, export_onnx, metadata

    model, provenance = build_model()
    path = str(tmp_path_factory.mktemp("export") / "default.onnx")
    export_onnx(model, path, metadata(model, provenance))
    return path, model


def rgb(image):
    image = np.asarray(image)
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
