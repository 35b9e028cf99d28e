"""Receptive field, stride and padding measured from input gradients, against the constants
the metadata records and the runtime uses to place keypoints."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from delf_index.model import geometry
from delf_index.model.delf import DELF

CONFIGS = [
    ("efficientnet_lite0", "stage4"),
    ("efficientnet_lite0", "stage5"),
    ("efficientnet_lite0", "stage6_expand"),
    ("efficientnet_lite2", "stage5"),
    ("resnet50", "layer3"),
]


def test_receptive_field_formula_matches_known_resnet_numbers():
    # torchvision layer3, as other ports report it: 267 / 16 / 133
    model = DELF("resnet50")
    assert geometry.receptive_field(model.backbone.conv_path()) == (267, 16, 133)
    # one 3x3 conv, stride 1, pad 1: field 3, centred on the pixel
    assert geometry.receptive_field([(3, 1, 1)]) == (3, 1, 1)
    assert geometry.centre_offset(3, 1) == 0


def _linearised(model):
    """Positive weights, identity BatchNorm, no max-pool: every path adds, nothing cancels,
    so the input gradient of a cell is non-zero exactly on its receptive field."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
    if hasattr(model.backbone, "maxpool"):
        # max-pool routes the gradient to one input of each window: average instead
        pool = model.backbone.maxpool
        model.backbone.maxpool = torch.nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding)
    return model.eval()


def _cell_gradient(model, size, cell, monkeypatch):
    monkeypatch.setattr(F, "relu6", lambda x: x)
    monkeypatch.setattr(F, "relu", lambda x: x)
    x = torch.ones(1, 3, size, size, requires_grad=True)
    local, _ = model.backbone(x)
    local[0, :, cell[0], cell[1]].sum().backward()
    return x.grad[0].abs().sum(0).numpy()


def _extent(weights):
    nz = np.nonzero(weights > 1e-12 * weights.max())[0]
    return int(nz.min()), int(nz.max())


@pytest.mark.parametrize("backbone,layer", CONFIGS)
def test_receptive_field_measured_by_gradient(backbone, layer, monkeypatch):
    model = _linearised(DELF(backbone, layer))
    meta = model.geometry()
    rf, stride, pad = meta["receptive_field"], meta["stride"], meta["padding"]
    size = 640
    i = 16
    # an interior cell: its field lies inside the image, so extent and centre are visible
    grad = _cell_gradient(model, size, (i, i + 1), monkeypatch)
    rows, cols = _extent(grad.sum(1)), _extent(grad.sum(0))
    assert rows == (i * stride - pad, i * stride - pad + rf - 1)
    assert cols == ((i + 1) * stride - pad, (i + 1) * stride - pad + rf - 1)
    # the keypoint the runtime places is the centre of that field
    profile = grad.sum(1)
    centroid = (profile * np.arange(size)).sum() / profile.sum()
    assert centroid == pytest.approx(i * stride + meta["centre_offset"], abs=0.5)
    # the corner cell: its field is cut by the image border where the padding starts
    model.zero_grad()
    grad0 = _cell_gradient(model, size, (0, 0), monkeypatch)
    assert _extent(grad0.sum(1)) == (0, rf - 1 - pad)


def test_metadata_geometry_is_what_the_runtime_uses(default_extractor):
    meta = default_extractor.metadata
    model = DELF(meta["backbone"], meta["feature_layer"])
    derived = model.geometry()
    for key in ("receptive_field", "stride", "padding", "centre_offset"):
        assert meta[key] == derived[key], key
    assert default_extractor.centre_offset == derived["centre_offset"]
    assert default_extractor.stride == derived["stride"] == 16
