"""The DELF network: backbone, attention head and a GeM global descriptor in one pass.

Input is what image decoders produce, uint8 RGB in NHWC layout, with height and width
multiples of the backbone's `input_multiple`; normalisation happens inside the network so
that the exported ONNX model is self-contained. Outputs:

- ``features``: dense local descriptors, float32 [B, C, H/16, W/16], not normalised;
- ``attention``: keypoint scores, float32 [B, H/16, W/16];
- ``global_descriptor``: GeM (p=3) of the last feature map, L2-normalised, float32 [B, G].

Until a trained attention head exists (``attention=None``), ``attention`` is the L2 norm of
each local descriptor, the usual fallback for untrained DELF-style selection; the model's
metadata says which one it is.
"""

import torch
import torch.nn.functional as F
from torch import nn

from delf_index.model import geometry
from delf_index.model.backbones import build_backbone

# Mean and std of the input, in uint8 units, with which each backbone was trained.
NORMALISATION = {
    "efficientnet_lite0": ([127.5] * 3, [128.0] * 3),
    "efficientnet_lite1": ([127.5] * 3, [128.0] * 3),
    "efficientnet_lite2": ([127.5] * 3, [128.0] * 3),
    "resnet50": ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),
}


class AttentionHead(nn.Module):
    """DELF's attention: conv1x1(C->512) -> BatchNorm -> ReLU -> conv1x1(512->1) -> softplus."""

    def __init__(self, channels, hidden=512):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def logits(self, x):
        """Scores before the softplus, [B, H, W] (what training's ranking losses compare)."""
        return self.conv2(F.relu(self.bn(self.conv1(x)))).squeeze(1)

    def forward(self, x):
        return F.softplus(self.logits(x))


def gem(x, p=3.0, eps=1e-6):
    """Generalised mean pooling over H and W: [B, C, H, W] -> [B, C]."""
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class DELF(nn.Module):
    def __init__(self, backbone="efficientnet_lite0", feature_layer=None, attention=False, gem_p=3.0):
        super().__init__()
        self.backbone = build_backbone(backbone, feature_layer)
        self.attention = AttentionHead(self.backbone.local_dim) if attention else None
        self.gem_p = gem_p
        mean, std = NORMALISATION[backbone]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def input_multiple(self):
        return self.backbone.input_multiple

    def normalise(self, images):
        """uint8 (or float 0..255) NHWC RGB -> normalised float NCHW."""
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def forward_normalised(self, x):
        local, last = self.backbone(x)
        if self.attention is not None:
            scores = self.attention(local)
        else:
            scores = torch.linalg.vector_norm(local, dim=1)
        return local, scores, F.normalize(gem(last, self.gem_p), dim=1)

    def forward(self, images):
        if not torch.compiler.is_exporting():
            h, w = images.shape[1:3]
            m = self.input_multiple
            if h % m or w % m:
                raise ValueError(f"input height and width must be multiples of {m}, got {h}x{w}")
        return self.forward_normalised(self.normalise(images))

    def geometry(self):
        """Receptive field, stride, padding and centre offset of the local features."""
        rf, stride, pad = geometry.receptive_field(self.backbone.conv_path())
        return {
            "receptive_field": rf,
            "stride": stride,
            "padding": pad,
            "centre_offset": geometry.centre_offset(rf, pad),
        }
