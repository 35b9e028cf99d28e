"""ONNX export: onnxruntime against torch eager, metadata, weight loading errors."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from delf_index.model.delf import DELF
from delf_index.model.export import build_model, export_onnx, metadata
from delf_index.model.export import main as export_main
from delf_index.model.torch_engine import TorchEngine
from delf_index.runtime.extractor import Extractor, shipped_model_path
from tests.conftest import rgb

FLOAT32 = shipped_model_path("float32")  # what the torch model computes; the CPU default is int8


def _torch_outputs(model, batch):
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(batch))]


def _real_batches(photos, landmarks=None):
    """Real photos resized to several multiple-of-32 sizes, as the pyramid feeds them."""
    import cv2

    sizes = [(64, 96), (224, 224), (320, 480), (512, 384)]
    images = [rgb(p) for p in photos.values()]
    for (h, w), image in zip(sizes, images):
        yield cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)[None]
    yield np.stack([cv2.resize(im, (256, 192)) for im in images])  # batch of 4


@pytest.mark.parametrize("which", ["fresh", "shipped"])
def test_onnxruntime_matches_torch_eager(which, exported_default, photos):
    path, model = exported_default
    if which == "shipped":
        path = shipped_model_path("float32")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in _real_batches(photos):
        expected = _torch_outputs(model, batch)
        actual = session.run(["features", "attention", "global_descriptor"], {"image": batch})
        for name, e, a in zip(["features", "attention", "global"], expected, actual):
            assert a.shape == e.shape, name
            scale = np.abs(e).max()
            np.testing.assert_allclose(a, e, atol=2e-4 * scale, rtol=1e-3, err_msg=f"{name} {batch.shape}")


def test_shipped_model_is_the_default_export(exported_default):
    """The committed .onnx carries the metadata today's code would write for the default."""
    shipped = Extractor(FLOAT32).metadata
    fresh = Extractor(exported_default[0]).metadata
    for key in fresh:
        if key != "exported_with":
            assert shipped[key] == fresh[key], key
    # nothing in the graph names where this checkout lives (the exporter's stack traces did):
    # a fresh clone elsewhere exports the same fingerprint
    graph = onnx.load(exported_default[0]).graph
    assert not any(node.metadata_props or node.doc_string for node in graph.node)
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert checkout.encode() not in onnx.load(exported_default[0]).SerializeToString()


def test_torch_engine_gives_the_same_features(photos):
    image = rgb(photos["astronaut"])
    onnx_features = Extractor(FLOAT32)(image)
    torch_extractor = Extractor(engine=TorchEngine.from_onnx(device="cpu", bf16=False))
    assert torch_extractor.fingerprint == Extractor(FLOAT32).fingerprint
    torch_features = torch_extractor(image)
    # the same cells are selected (scores agree to float precision, so the order does too)
    same = (onnx_features.x == torch_features.x) & (onnx_features.y == torch_features.y)
    assert same.mean() > 0.99
    np.testing.assert_allclose(onnx_features.descriptors[same], torch_features.descriptors[same], atol=1e-4)
    np.testing.assert_allclose(onnx_features.global_descriptor, torch_features.global_descriptor, atol=1e-5)


def test_resnet50_loads_a_user_state_dict_and_exports(tmp_path):
    from delf_index.model.backbones import ResNet50

    # a torchvision-layout state dict; random values: this checks loading and export, not quality
    state = ResNet50().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)  # classifier keys are ignored, as in torchvision files
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "r50.pth")
    out = tmp_path / "r50.onnx"
    assert export_main(["--backbone", "resnet50", "--weights", str(tmp_path / "r50.pth"), "--output", str(out)]) == 0
    meta = Extractor(str(out)).metadata
    assert (meta["descriptor_dim"], meta["global_dim"], meta["receptive_field"]) == (1024, 2048, 267)
    assert meta["weights"]["source"] == "user-supplied file"


def test_wrong_weights_file_names_the_missing_keys(tmp_path):
    from delf_index.model.backbones import ResNet50

    state = ResNet50().state_dict()
    del state["layer3.0.conv1.weight"]
    state["layer3.0.bn1.weight"] = torch.zeros(7)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing 1 keys: layer3.0.conv1.weight") as e:
        build_model("resnet50", str(tmp_path / "broken.pth"))
    assert "layer3.0.bn1.weight: file (7,) vs model (256,)" in str(e.value)
    with pytest.raises(ValueError, match="no packaged weights"):
        build_model("resnet50")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        build_model("resnet50", str(tmp_path / "junk.pth"))


def test_attention_head_file_is_exported_as_learned(tmp_path):

    head = {f"attention.{k}": v for k, v in DELF(attention=True).attention.state_dict().items()}
    torch.save(head, tmp_path / "head.pt")
    model, provenance = build_model(attention=str(tmp_path / "head.pt"))
    meta = metadata(model, provenance)
    assert meta["attention"]["type"] == "learned"
    export_onnx(model, str(tmp_path / "m.onnx"), meta)
    assert Extractor(str(tmp_path / "m.onnx")).metadata["attention"]["sha256"] == provenance["attention"]["sha256"]


def test_default_attention_is_the_shipped_head_or_the_l2_norm(tmp_path, monkeypatch):
    import delf_index.model.export as export

    # no head ships yet: the default and "l2norm" both rank by the descriptor norm
    assert export.default_attention_path("efficientnet_lite0") is None
    for attention in ("default", "l2norm", None):
        model, provenance = build_model(attention=attention)
        assert metadata(model, provenance)["attention"]["type"] == "l2norm"
    # a head shipped for the backbone and layer is taken by default, never for other weights

    torch.save(DELF(attention=True).attention.state_dict(), tmp_path / "head.pt")
    monkeypatch.setattr(export, "default_attention_path", lambda backbone, layer=None: str(tmp_path / "head.pt"))
    model, provenance = build_model()
    assert metadata(model, provenance)["attention"]["type"] == "learned"
    model, provenance = build_model(attention="l2norm")
    assert metadata(model, provenance)["attention"]["type"] == "l2norm"


def test_folding_the_normalisation_into_the_stem_is_exact():
    model, _ = build_model()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 96, 128, 3), dtype=np.uint8))
    with torch.no_grad():
        before = model(images)
        geometry = model.geometry()
        model.fold_normalisation()
        after = model(images)
    assert model.geometry() == geometry  # the stem's padding moved, not its geometry
    for b, a in zip(before, after):
        # padding with pixel 128 instead of the mean 127.5 moves the border cells a little
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=0.05 * float(b.abs().max()))
    with pytest.raises(ValueError, match="one mean and std"):
        DELF("resnet50").fold_normalisation()  # per-channel means: not foldable into one padding colour


def test_int8_export_agrees_with_float32(tmp_path, photos):
    out = tmp_path / "int8.onnx"
    assert export_main(["--precision", "int8", "--output", str(out)]) == 0
    int8, fp32 = Extractor(str(out)), Extractor(FLOAT32)
    precision = int8.metadata["precision"]
    assert precision["type"] == "int8" and precision["raw_pixel_input"] and len(precision["calibration"]) == 8
    assert int8.fingerprint != fp32.fingerprint  # tables and indexes never mix the two
    image = rgb(photos["chelsea"])
    agree(fp32(image), int8(image), keypoints=0.85, cosine=0.98)
    # the shipped int8 model (the CPU default) is what this export makes: the same settings
    # and calibration, the same features. Not bit for bit: calibration runs the float32 model,
    # whose last bits differ between CPUs, and the quantization ranges move with them (CI's
    # fresh export has another fingerprint than this machine's); the float32 graph it starts
    # from serialises differently with other onnx / onnxscript releases (its fingerprint too)
    shipped = Extractor(shipped_model_path("int8"))
    settings = lambda p: {k: v for k, v in p.items() if k != "fp32_fingerprint"}  # noqa: E731
    assert settings(shipped.metadata["precision"]) == settings(precision)
    agree(shipped(image), int8(image), keypoints=0.9, cosine=0.99)


def agree(a, b, keypoints, cosine):
    """Two extractions of one image: most keypoints at the same place and scale, with close descriptors."""
    d = np.hypot(a.x[:, None] - b.x[None], a.y[:, None] - b.y[None]) + 1e9 * (a.scale[:, None] != b.scale[None])
    near = d.min(axis=1) <= 1.0
    assert near.mean() > keypoints
    similarity = (a.descriptors[near] * b.descriptors[d.argmin(axis=1)[near]]).sum(axis=1)
    assert np.median(similarity) > cosine
    assert float(a.global_descriptor @ b.global_descriptor) > cosine


def test_global_descriptor_from_the_local_layer(tmp_path, photos):
    out = tmp_path / "local.onnx"
    assert export_main(["--global", "local", "--output", str(out)]) == 0
    local, final = Extractor(str(out)), Extractor(FLOAT32)
    meta = local.metadata
    assert meta["global_dim"] == meta["descriptor_dim"] == 112 and meta["global_pooling"]["layer"] == "local"
    image = rgb(photos["rocket"])
    a, b = final(image), local(image)
    np.testing.assert_array_equal(a.x, b.x)  # the local features are the same network's
    np.testing.assert_allclose(a.descriptors, b.descriptors, atol=1e-4)
    assert b.global_descriptor.shape == (112,)
