"""The DELF network: backbone, attention head and a GeM global descriptor in one pass.

Input is what image decoders produce, uint8 RGB in NHWC layout, with height and width
multiples of the backbone's `input_multiple`; normalisation happens inside the network so
that the exported ONNX model is self-contained. Outputs:

- ``features``: dense local descriptors, float32 [B, C, H/16, W/16], not normalised;
- ``attention``: keypoint scores, float32 [B, H/16, W/16];
- ``global_descriptor``: GeM (p=3) of the last feature map (or, with ``global_from="local"``,
  of the local features, and the network stops there), L2-normalised, float32 [B, G].

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
    """DELF's attention: conv1x1(C->512) -> BatchNorm -> ReLU -> conv1x1(512->1) -> softplus.

    With `norm_weight` (a number: its initial value) the head learns a correction to the
    untrained ranking instead: its output is added to norm_weight x log(descriptor L2 norm),
    a learned scalar, before the softplus, and its last layer starts at zero, so that an
    untrained head ranks exactly as the L2 norm does (a departure from DELF, measured in
    benchmarks/README.md, "Learned keypoint selection")."""

    def __init__(self, channels, hidden=512, norm_weight=None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 1)
        if norm_weight is not None:
            self.norm_weight = nn.Parameter(torch.tensor(float(norm_weight)))
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def logits(self, x):
        """Scores before the softplus, [B, H, W] (what training's ranking losses compare)."""
        out = self.conv2(F.relu(self.bn(self.conv1(x)))).squeeze(1)
        if hasattr(self, "norm_weight"):
            out = out + self.norm_weight * torch.log(torch.linalg.vector_norm(x, dim=1).clamp(min=1e-6))
        return out

    def forward(self, x):
        return F.softplus(self.logits(x))


def gem(x, p=3.0, eps=1e-6):
    """Generalised mean pooling over H and W: [B, C, H, W] -> [B, C]."""
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


GLOBAL_FROM = ("final", "local")  # the layer the global descriptor pools: the network's last, or the local one


class DELF(nn.Module):
    def __init__(
        self, backbone="efficientnet_lite0", feature_layer=None, attention=False, gem_p=3.0, global_from="final"
    ):
        super().__init__()
        if global_from not in GLOBAL_FROM:
            raise ValueError(f"global_from must be one of {GLOBAL_FROM}, got {global_from!r}")
        self.global_from = global_from
        self.backbone = build_backbone(backbone, feature_layer)
        # attention: False (rank by L2 norm), True (DELF's head) or {"norm_weight": w} (a learned
        # correction of the L2 norm ranking, AttentionHead)
        options = attention if isinstance(attention, dict) else {}
        self.attention = AttentionHead(self.backbone.local_dim, **options) if attention else None
        self.gem_p = gem_p
        mean, std = NORMALISATION[backbone]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def input_multiple(self):
        return self.backbone.input_multiple

    def normalise(self, images):
        """uint8 (or float 0..255) NHWC RGB -> normalised float NCHW. Once the normalisation is
        folded into the stem, the raw pixels, with the stem's padding in the mean colour."""
        x = images.permute(0, 3, 1, 2)
        if not self.folded:
            return (x.float() - self.mean) / self.std
        stem = self.backbone._conv_stem
        p0, p1 = stem.pad_before, stem.pad_after
        # padded while still uint8 (a quarter of the bytes); the mean rounded to a pixel value
        return F.pad(x, (p0, p1, p0, p1), value=self.folded).float()

    folded = 0  # once folded: the pixel value the stem pads with (the mean, rounded)

    @torch.no_grad()
    def fold_normalisation(self):
        """Fold the input normalisation into the stem convolution and its batch norm, exactly:
        (W / std) x, the batch norm's mean moved by W (mean / std), the padding made of the
        mean colour. An int8 model then quantizes raw pixels (scale 1, no loss) and runs no
        float Sub and Div over every input pixel. Needs one mean and std for all channels
        (EfficientNet-Lite's); returns self."""
        stem, bn = getattr(self.backbone, "_conv_stem", None), getattr(self.backbone, "_bn0", None)
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        if stem is None or len(set(mean)) != 1 or len(set(std)) != 1:
            raise ValueError(f"{self.backbone.name}: only a stem after one mean and std per channel can be folded")
        bn.running_mean += (stem.weight.sum(dim=(1, 2, 3)) * mean[0] / std[0]).to(bn.running_mean.dtype)
        stem.weight /= std[0]
        stem.padded_before = True  # normalise() pads, before the float conversion
        self.folded = round(mean[0])
        return self

    @property
    def global_dim(self):
        return self.backbone.global_dim if self.global_from == "final" else self.backbone.local_dim

    def forward_normalised(self, x):
        local, last = self.backbone(x, with_last=self.global_from == "final")
        last = local if last is None else last
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
