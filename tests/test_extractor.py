"""The runtime extractor (numpy + onnxruntime) on the shipped default model."""

import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest

from delf_index.indexing import verify
from delf_index.runtime.extractor import Extractor, nms, shipped_model_path
from delf_index.runtime.features import Features
from tests.conftest import rgb


def test_runtime_needs_no_torch():
    code = (
        "import sys, numpy as np; from delf_index.runtime.extractor import Extractor; "
        "f = Extractor()(np.full((64, 96, 3), 100, np.uint8)); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_model_metadata_describes_what_the_network_computes(default_extractor, photos):
    meta = default_extractor.metadata
    assert meta["backbone"] == "efficientnet_lite0" and "ImageNet" in meta["weights"]["trained_on"]
    assert len(default_extractor.fingerprint) == 64
    image = cv2.resize(rgb(photos["coffee"]), (160, 96))  # multiples of input_multiple (32)
    features, attention, glob = default_extractor.engine(image[None])
    stride = meta["stride"]
    assert features.shape == (1, meta["descriptor_dim"], 96 // stride, 160 // stride)
    assert attention.shape == (1, 96 // stride, 160 // stride) and glob.shape == (1, meta["global_dim"])
    # "l2norm" attention (recorded, never hidden) is the L2 norm of each cell's descriptor
    assert meta["attention"]["type"] == "l2norm"
    np.testing.assert_allclose(attention[0], np.linalg.norm(features[0], axis=0), rtol=1e-4)


def test_features_of_a_real_photo(default_extractor, photos):
    image = rgb(photos["astronaut"])
    f = default_extractor(image)
    assert len(f) == 1000
    assert f.descriptors.shape == (1000, default_extractor.metadata["descriptor_dim"])
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(f.global_descriptor), 1, atol=1e-5)
    assert np.all(np.diff(f.attention) <= 0), "sorted by score, best first"
    assert (f.x >= 0).all() and (f.x < image.shape[1]).all()
    assert (f.y >= 0).all() and (f.y < image.shape[0]).all()
    # every pyramid level contributes and scale is 1 / pyramid scale (image under 1024 px)
    np.testing.assert_allclose(np.unique(1 / f.scale), [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0], rtol=2e-3)


def test_deterministic_and_batch_equals_single(default_extractor, photos):
    a, b = rgb(photos["coffee"]), rgb(photos["chelsea"])
    single = [default_extractor(a), default_extractor(b)]
    batched = default_extractor.extract_batch([a, b, a])
    for s, t in zip(single + [single[0]], batched):
        np.testing.assert_array_equal(s.x, t.x)
        np.testing.assert_allclose(s.descriptors, t.descriptors, atol=1e-5)
    again = default_extractor(a)
    np.testing.assert_array_equal(single[0].descriptors, again.descriptors)


def test_same_size_levels_share_forward_passes(photos):
    image = rgb(photos["coffee"])
    batched = Extractor(conf={"max_batch": 8})
    batched.extract_batch([image] * 4)
    assert batched.stats["levels"] == 28
    assert batched.stats["forward_passes"] == 7  # one batch of 4 per pyramid level
    on_cpu = Extractor()  # batching is slower on CPUs: one level per pass
    on_cpu.extract_batch([image] * 4)
    assert (on_cpu.max_batch, on_cpu.stats["forward_passes"]) == (1, 28)


@pytest.mark.parametrize("factor,interpolation", [(0.5, cv2.INTER_AREA), (2.0, cv2.INTER_LINEAR)])
def test_keypoints_are_in_original_pixels(default_extractor, photos, factor, interpolation):
    """Extract from a photo and from a resized crop of it, then match: keypoints must obey
    the known pixel mapping exactly. This checks the mapping of cell centres back through
    pyramid resizing, padding and cropping, with pixel centres at integer coordinates."""
    image = rgb(photos["astronaut"])
    x0, y0 = 64, 32  # multiples of the stride, so the two feature grids coincide
    crop = np.ascontiguousarray(cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)[y0:, x0:])
    fa, fb = default_extractor(image), default_extractor(crop)
    m = verify.mutual_matches(fa.descriptors, fb.descriptors)
    expected = (fa.keypoints[m[:, 0]] + 0.5) * factor - 0.5 - np.array([x0, y0])
    residual = np.linalg.norm(expected - fb.keypoints[m[:, 1]], axis=1)
    assert (residual < 1).sum() > 150
    assert np.median(residual) < 0.05


def test_options(photos):
    image = rgb(photos["rocket"])
    few = Extractor(conf={"max_features": 50, "scales": (1.0,)})(image)
    assert len(few) == 50 and np.allclose(few.scale, 1.0)
    strict = Extractor(conf={"score_threshold": 1e9})
    high = strict(image)
    assert len(high) == 0 and high.descriptors.shape == (0, strict.metadata["descriptor_dim"])
    big = np.ascontiguousarray(np.tile(image, (3, 3, 1)))  # 1281 x 1800
    capped = Extractor(conf={"max_image_size": 900, "scales": (1.0,)})(big)
    assert capped.width == big.shape[1] and capped.height == big.shape[0]
    assert np.allclose(capped.scale, big.shape[1] / 900, rtol=1e-3)  # features in original pixels
    assert capped.x.max() > 1500
    with pytest.raises(ValueError, match="unknown extractor options"):
        Extractor(conf={"max_feature": 5})


def test_nms_keeps_separated_boxes():
    x = np.array([0.0, 1.0, 100.0, 101.0])
    y = np.zeros(4)
    size = np.full(4, 10.0)
    assert nms(x, y, size, 0.5, 10).tolist() == [0, 2]
    assert nms(x, y, size, 0.5, 1).tolist() == [0]
    with_nms = Extractor(conf={"nms_iou": 0.3, "max_features": 200, "scales": (1.0,)})
    f = with_nms(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    d = np.hypot(f.x[:, None] - f.x[None], f.y[:, None] - f.y[None]) + np.eye(len(f)) * 1e9
    assert d.min() >= 16  # boxes of neighbouring cells overlap by far more than 0.3


def test_small_and_bad_images(default_extractor):
    tiny = default_extractor(np.zeros((12, 12, 3), np.uint8))
    # levels under 10 px are skipped; a cell counts when its centre lies inside the level
    meta = default_extractor.metadata
    sides = [round(12 * s) for s in default_extractor.conf["scales"]]
    cells = [
        sum(i * meta["stride"] + meta["centre_offset"] < side for i in range(side)) for side in sides if side >= 10
    ]
    assert len(tiny) == sum(c * c for c in cells) == 2  # 1.4142 (17 px) and 2.0 (24 px): one cell each
    assert tiny.width == 12 and (tiny.x < 12).all() and (tiny.y < 12).all()
    np.testing.assert_allclose(sorted(1 / tiny.scale), [1.4142, 2.0], rtol=0.02)
    with pytest.raises(ValueError, match="uint8 RGB"):
        default_extractor(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        default_extractor(np.zeros((64, 64, 3), np.float32))


def test_features_npz_round_trip(tmp_path, default_extractor, photos):
    f = default_extractor(rgb(photos["coffee"]))
    f.save(tmp_path / "f.npz")
    g = Features.load(tmp_path / "f.npz")
    np.testing.assert_array_equal(f.descriptors, g.descriptors)
    assert (g.width, g.height) == (f.width, f.height)


def test_altered_or_foreign_models_are_refused(tmp_path):
    proto = onnx.load(shipped_model_path("float32"))
    # change one weight: the stored fingerprint no longer matches
    init = proto.graph.initializer[5]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, tmp_path / "altered.onnx")
    with pytest.raises(ValueError, match="altered after export"):
        Extractor(str(tmp_path / "altered.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "foreign.onnx")
    with pytest.raises(ValueError, match="not a delf-index model"):
        Extractor(str(tmp_path / "foreign.onnx"))
    with pytest.raises(FileNotFoundError):
        Extractor(str(tmp_path / "missing.onnx"))


def test_per_level_top_k_loses_nothing(default_extractor, photos):
    """Levels hand over only their best max_features cells; an NMS that suppresses nothing
    (IoU 0.9999) takes every cell instead and must end with the same features."""
    image = rgb(photos["chelsea"])
    fast = default_extractor(image)
    every_cell = Extractor(conf={"nms_iou": 0.9999})(image)
    np.testing.assert_array_equal(fast.x, every_cell.x)
    np.testing.assert_array_equal(fast.y, every_cell.y)
    np.testing.assert_array_equal(fast.descriptors, every_cell.descriptors)
